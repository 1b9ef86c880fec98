"""Linears that read the same input as one (``Model.fuse_projections``), and back.

Plain ``nn.Linear`` and ``nn.QuantizedLinear`` only: their weights (and a quantized
linear's scales and biases) are concatenated along the output axis, the first axis
of each, so a fused quantized linear is exactly the separate ones stacked.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

PLAIN_LINEARS = (nn.Linear, nn.QuantizedLinear)


def _arrays(m: nn.Module) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, mx.array)}


def _quantization(m: nn.Module) -> tuple:
    return tuple(getattr(m, a, None) for a in ("group_size", "bits", "mode"))


def _like(m: nn.Module, arrays: dict) -> nn.Module:
    """A linear of ``m``'s kind and quantization holding ``arrays``."""
    if type(m) is nn.Linear:
        new = nn.Linear(1, 1, bias="bias" in m)
    else:  # a placeholder one group wide: its arrays are replaced below
        new = nn.QuantizedLinear(m.group_size, 1, "bias" in m, m.group_size, m.bits, m.mode)
    for k, v in arrays.items():
        new[k] = v
    return new


def concat_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One linear whose output is ``linears``' outputs concatenated (they read the same
    input), or None when they differ in kind, dtype or quantization."""
    first = _arrays(linears[0])
    for m in linears:
        a = _arrays(m)
        if (type(m) is not type(linears[0]) or type(m) not in PLAIN_LINEARS
                or a.keys() != first.keys()
                or _quantization(m) != _quantization(linears[0])
                or any(a[k].dtype != v.dtype or a[k].shape[1:] != v.shape[1:]
                       for k, v in first.items())):
            return None
    return _like(linears[0], {k: mx.concatenate([m[k] for m in linears]) for k in first})


def split_linear(linear: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """``linear`` as one linear per block of ``sizes`` output rows (views)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [_like(linear, {k: v[a:a + n] for k, v in _arrays(linear).items()})
            for a, n in zip(starts, sizes)]
