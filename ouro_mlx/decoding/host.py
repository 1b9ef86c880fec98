"""When the decoding loops read the device.

On an accelerator every read of a device value (``.item()``, ``.tolist()``,
``mx.eval``, a Python branch on an array) stalls the device until the host has
caught up. The strategies read through :func:`read` only, at most once per emitted
token where the depth is fixed (the token itself), and queue the next token's work
before they read. An adaptive exit must read its decision after every loop step;
:func:`lookahead` says whether it queues step t+1 before reading step t's decision
(then throws step t+1 away when the token exits), so the device never waits for the
host. ``tests/test_host_syncs.py`` counts every read per token on each path.
"""

from __future__ import annotations

import os

import mlx.core as mx


def read(x: mx.array):
    """``x`` on the host (a Python scalar or nested list): the one kind of sync."""
    return x.tolist()


def lookahead() -> bool:
    """Whether adaptive exits queue one loop step ahead of their decision.

    On a GPU (Metal, CUDA) the step computed while the host reads costs less than
    the idle device it avoids; on the CPU backend the device is the host's own cores,
    so a discarded step is pure extra work. ``OURO_MLX_LOOKAHEAD=1`` or ``0``
    overrides (tokens and loop counts are the same either way)."""
    forced = os.environ.get("OURO_MLX_LOOKAHEAD")
    if forced in ("0", "1"):
        return forced == "1"
    return mx.default_device().type == mx.DeviceType.gpu
