"""Sampling shared by every decoding path, with a finiteness check that costs no
extra host sync.

NaN or inf weights (a damaged checkpoint or adapter) or a float16 overflow give
non-finite logits, from which any sampler still draws some token: the answer would
look fine. Each row's log-normaliser (``logsumexp``, needed for the logprobs anyway)
is finite exactly when every logit is finite or -inf, so the token of a row whose
normaliser is not is replaced by ``NONFINITE`` inside the graph; the host sees it in
the token id it reads anyway and raises ``NonFiniteLogits``.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]

# A token id no vocabulary has. Fed back as an input it embeds the last row
# (negative indices wrap), which is harmless: generation stops on it.
NONFINITE = -1


class NonFiniteLogits(ValueError):
    """The model produced NaN or inf logits."""

    def __init__(self, position: int):
        super().__init__(
            f"The model produced non-finite logits (NaN or inf) at generated token "
            f"{position + 1}: its weights or an adapter's hold NaN/inf values, or the "
            "dtype overflows (float16); load it in bfloat16 or float32, or check the "
            "checkpoint and adapter files.")


@mx.compile
def flag_nonfinite(y: mx.array, lse: mx.array) -> mx.array:
    """``y`` as int32, ``NONFINITE`` where its row's normaliser ``lse`` is not finite."""
    return mx.where(mx.isfinite(lse).reshape(y.shape), y.astype(mx.int32), NONFINITE)


def sample(logits: mx.array, sampler: Sampler) -> tuple[mx.array, mx.array]:
    """``(token, logprobs)`` from ``logits`` [..., V] with ``sampler``, the token
    flagged ``NONFINITE`` for a row whose logits are not finite."""
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    logprobs = logits - lse
    return flag_nonfinite(sampler(logprobs), lse), logprobs


def check_token(token: int, position: int) -> int:
    """``token`` (a host int), or ``NonFiniteLogits`` if it is the flag."""
    if token == NONFINITE:
        raise NonFiniteLogits(position)
    return token
