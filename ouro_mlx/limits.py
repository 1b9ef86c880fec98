"""Sizes checked before anything is allocated: a config or flag from a stranger must
fail at once with a message, not minutes later in the allocator or the OOM killer."""

from __future__ import annotations

import os

# Loop steps beyond this need OURO_MLX_MAX_UT_STEPS (the released models train with 4).
MAX_UT_STEPS = 64


def max_ut_steps() -> int:
    value = os.environ.get("OURO_MLX_MAX_UT_STEPS")
    if value is None:
        return MAX_UT_STEPS
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"OURO_MLX_MAX_UT_STEPS must be an integer, got {value!r}.") from None


def memory_bytes() -> int | None:
    """The machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` when it exceeds the machine's memory."""
    total = memory_bytes()
    if total is not None and nbytes > total:
        raise ValueError(
            f"{what} needs about {gib(nbytes)} but this machine has {gib(total)} of memory."
        )


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"
