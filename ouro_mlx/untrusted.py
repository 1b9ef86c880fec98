"""Checks on files from strangers, shared by the model loader and the adapter loader
(both read directories they did not write): one-line errors naming file and field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says why."""


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in ``file``; anything else is refused naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{file} is nested too deeply to be a config.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds {JSON_TYPES[type(data)]}; expected a JSON object.")
    return data


def lies_inside(path: Path, name: str) -> bool:
    """Whether file ``name`` of directory ``path``, links followed, lies inside it
    (or, in the HF cache, in the ``blobs`` folder its snapshot links point to)."""
    root = path.resolve()
    file = Path(os.path.normpath(root / name))
    if not file.is_relative_to(root):
        return False
    roots = [root] + ([root.parents[1] / "blobs"] if root.parent.name == "snapshots" else [])
    return any(file.resolve().is_relative_to(r) for r in roots)


def check_tensor(file: Path | str, name: str, w: mx.array, shape: tuple) -> None:
    """One tensor from an untrusted file that replaces a float parameter of ``shape``:
    the right shape, floating point, finite (one-line errors naming file and tensor)."""
    if tuple(w.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(w.shape)}, "
                              f"expected {tuple(shape)}.")
    if not mx.issubdtype(w.dtype, mx.floating):
        raise CheckpointError(f"{file}: tensor {name} is {w.dtype}, expected floating point.")
    if not mx.all(mx.isfinite(w)).item():
        raise CheckpointError(f"{file}: tensor {name} holds non-finite values (inf or nan).")
