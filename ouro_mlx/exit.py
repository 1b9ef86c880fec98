"""Exit-gate math (spec §3.4, §4.1): gate logits → λ → exit pdf/cdf → chosen step.

Pure functions on arrays, computed in float32 whatever the model dtype. The official
code does this in the model dtype: in bfloat16 the cdf rounds to exactly 1.0 as soon
as the survival mass drops below ~2⁻⁹, so its "threshold 1.0 = always the last step"
silently exits early. We do not copy that: here ``q = 1.0`` always selects the last
step, and thresholds below 1 compare an unrounded float32 cdf.

Shapes: ``gate_logits`` is a list of T arrays [B, S] (one per loop step) or one
array [B, S, T]; pdf and cdf are [B, S, T]; steps are 0-based int32 [B, S].
"""

from __future__ import annotations

import mlx.core as mx


def _stack(steps: list[mx.array] | mx.array) -> mx.array:
    if isinstance(steps, (list, tuple)):
        steps = mx.stack(steps, axis=-1)
    return steps.astype(mx.float32)


def check_threshold(q: float) -> float:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit_threshold must be in [0, 1], got {q}.")
    return q


def exit_lambdas(gate_logits: list[mx.array] | mx.array) -> mx.array:
    """Instantaneous exit probabilities λ_t = sigmoid(gate_t), [B, S, T]."""
    return mx.sigmoid(_stack(gate_logits))


def exit_pdf(gate_logits: list[mx.array] | mx.array) -> mx.array:
    """p_t = λ_t · Π_{j<t}(1 − λ_j) for t < T−1; the last step takes the remaining
    survival mass (its own λ is ignored), so the pdf sums to 1."""
    lam = exit_lambdas(gate_logits)
    survival = mx.cumprod(1.0 - lam, axis=-1)
    before = mx.concatenate([mx.ones_like(lam[..., :1]), survival[..., :-1]], axis=-1)
    pdf = lam * before
    return mx.concatenate([pdf[..., :-1], before[..., -1:]], axis=-1)


def exit_cdf(pdf: mx.array) -> mx.array:
    """Cumulative exit probability, [B, S, T]."""
    return mx.cumsum(pdf, axis=-1)


def select_exit_step(cdf: mx.array, q: float) -> mx.array:
    """Q-exit: the first step t < T−1 with cdf_t ≥ q, else T−1 (0-based).
    ``q = 1.0`` always gives T−1."""
    check_threshold(q)
    T = cdf.shape[-1]
    if q >= 1.0 or T == 1:
        return mx.full(cdf.shape[:-1], T - 1, dtype=mx.int32)
    hit = cdf[..., :-1] >= q
    first = mx.argmax(hit, axis=-1).astype(mx.int32)
    return mx.where(mx.any(hit, axis=-1), first, T - 1)


def gather_steps(steps: list[mx.array], index: mx.array) -> mx.array:
    """Per position, take ``steps[index]``: ``steps`` T arrays [B, S, ...],
    ``index`` [B, S] → [B, S, ...]."""
    stacked = mx.stack(steps, axis=2)  # [B, S, T, ...]
    idx = index.reshape(*index.shape, 1, *([1] * (stacked.ndim - 3)))
    return mx.take_along_axis(stacked, idx, axis=2).squeeze(2)


def expected_logits(steps: list[mx.array] | mx.array, pdf: mx.array) -> mx.array:
    """Σ_t pdf[..., t] · steps[t]: the expected logits (or, since ``lm_head`` is
    linear, the expected hidden state). ``steps`` is T arrays [B, S, D] or one
    [T, B, S, D]; the result is float32 [B, S, D]."""
    if isinstance(steps, (list, tuple)):
        steps = mx.stack(steps, axis=0)
    w = mx.moveaxis(pdf, -1, 0)[..., None]  # [T, B, S, 1]
    return (w * steps.astype(mx.float32)).sum(axis=0)
