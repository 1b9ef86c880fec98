"""Reading raw PyTorch ``.bin`` / ``.pt`` state dicts. The only place that imports
torch, lazily, and always with ``weights_only=True`` (no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loading import CheckpointError, files_inside, index_names


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "Reading .bin/.pt checkpoints needs PyTorch: pip install torch"
        ) from e
    return torch


def torch_files(path: Path) -> list[Path]:
    """The PyTorch weight files of a directory (index-aware), or ``[path]`` for a file.
    Every file must lie inside the directory."""
    if path.is_file():
        return [path]
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        files = files_inside(path, index_names(index), named_by=index)
    else:
        files = files_inside(path, sorted(p.name for ext in ("*.bin", "*.pt", "*.pth")
                                          for p in path.glob(ext) if p.is_file()))
    if missing := [f.name for f in files if not f.is_file()]:
        raise CheckpointError(f"{index} names missing files: {', '.join(missing)}")
    return files


def read_state_dict(file: Path) -> dict[str, mx.array]:
    torch = _torch()
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types, often over several lines
        why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(
            f"Cannot read PyTorch weights from {file} (truncated, corrupt or not a state "
            f"dict?): {why.split('. ')[0].rstrip('.')[:200]}."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors.")
    out = {}
    for k, t in obj.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            out[k] = mx.array(t.float().numpy()).astype(mx.bfloat16)
        else:
            out[k] = mx.array(np.asarray(t.numpy()))
    return out


def save_state_dict(weights: dict[str, mx.array], file: Path) -> None:
    """Write ``weights`` as a PyTorch ``.bin`` (used by tests and round trips)."""
    torch = _torch()
    sd = {}
    for k, v in weights.items():
        if v.dtype == mx.bfloat16:
            sd[k] = torch.from_numpy(np.array(v.astype(mx.float32))).to(torch.bfloat16)
        else:
            sd[k] = torch.from_numpy(np.array(v))
    torch.save(sd, file)
