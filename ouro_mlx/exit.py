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

from dataclasses import dataclass

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
    return pdf_from_lambdas(exit_lambdas(gate_logits))


def survival_before(lam: mx.array) -> mx.array:
    """Π_{j<t}(1 − λ_j): the probability that step t runs, [..., T]."""
    survival = mx.cumprod(1.0 - lam, axis=-1)
    return mx.concatenate([mx.ones_like(lam[..., :1]), survival[..., :-1]], axis=-1)


def pdf_from_lambdas(lam: mx.array) -> mx.array:
    """:func:`exit_pdf` from the per-step exit probabilities λ [..., T]."""
    before = survival_before(lam)
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


@dataclass(frozen=True)
class ExitRule:
    """When a token stops looping (spec §4.1–4.2), for ``ut_steps`` = T.

    ``at_step`` (0-based) fixes the depth at ``at_step + 1`` loops. Otherwise a
    token stops after the first step t where ``cdf_t >= threshold`` (Q-exit) or,
    from the second step on, ``‖h_t − h_{t−1}‖ / ‖h_{t−1}‖ < hidden_eps``; never
    before ``min_loops`` loops, always by ``max_loops`` (default T)."""

    ut_steps: int
    threshold: float | None = None
    at_step: int | None = None
    hidden_eps: float | None = None
    min_loops: int = 1
    max_loops: int | None = None

    def __post_init__(self):
        T = self.ut_steps
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"ut_steps must be an integer >= 1, got {T!r}.")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.at_step is not None and not 0 <= self.at_step < T:
            raise ValueError(f"exit_at_step must be in [0, {T}), got {self.at_step}.")
        if self.hidden_eps is not None and not self.hidden_eps >= 0:
            raise ValueError(f"hidden_eps must be >= 0, got {self.hidden_eps}.")
        if not 1 <= self.min_loops <= T:
            raise ValueError(f"min_loops must be in [1, {T}], got {self.min_loops}.")
        if self.max_loops is not None and not self.min_loops <= self.max_loops <= T:
            raise ValueError(
                f"max_loops must be in [min_loops={self.min_loops}, {T}], "
                f"got {self.max_loops}."
            )

    @property
    def ceiling(self) -> int:
        return self.max_loops or self.ut_steps

    @property
    def fixed_loops(self) -> int | None:
        """The depth when it does not depend on the data, else None."""
        if self.at_step is not None:
            return min(max(self.at_step + 1, self.min_loops), self.ceiling)
        q_exits = self.threshold is not None and self.threshold < 1.0
        if not q_exits and self.hidden_eps is None:
            return self.ceiling
        return self.ceiling if self.min_loops == self.ceiling else None

    def known_going(self, t: int) -> bool | None:
        """Whether any row loops past step t, when the host knows without reading
        the device (never for one rule whose depth depends on the data)."""
        return None

    def stops(self, t: int, cdf_t: mx.array | None, h_t: mx.array,
              h_prev: mx.array | None) -> mx.array:
        """Whether to stop after 0-based step t: bool [B, S], criteria and the
        min/max loops applied."""
        shape = h_t.shape[:-1]
        if t + 1 >= self.ceiling:
            return mx.ones(shape, dtype=mx.bool_)
        stop = mx.zeros(shape, dtype=mx.bool_)
        if t + 1 < self.min_loops:
            return stop
        if self.threshold is not None and self.threshold < 1.0:
            stop = stop | (cdf_t >= self.threshold)
        if self.hidden_eps is not None and h_prev is not None:
            stop = stop | (relative_change(h_t, h_prev) < self.hidden_eps)
        return stop


class RowRules:
    """One ``ExitRule`` per row of a batch, applied together: rows may differ in
    depth (``ut_steps``, ``exit_at_step``, ``max_loops``), threshold, ``min_loops``
    and ``hidden_eps``. Each row stops exactly where its own rule would stop it.
    Quacks like an ``ExitRule`` for ``decode`` and ``exit_steps``: ``ceiling`` is
    the deepest row's, ``min_loops`` the earliest any row may stop, ``fixed_loops``
    a depth only when every row has the same fixed one."""

    def __init__(self, rules: list[ExitRule]):
        if not rules:
            raise ValueError("RowRules needs at least one rule.")
        self.rules = tuple(rules)
        fixed = self._fixed = [r.fixed_loops for r in rules]
        steps = {r.ut_steps for r in rules}
        self.ut_steps = max(steps)  # the prompt's depth when every row shares it
        self.ceiling = max(f or r.ceiling for f, r in zip(fixed, rules))
        self.min_loops = min(f or r.min_loops for f, r in zip(fixed, rules))
        self.fixed_loops = fixed[0] if None not in fixed and len(set(fixed)) == 1 else None
        inf = float("inf")
        # Per row, [B, 1] so that they broadcast over positions. A fixed row stops
        # at its depth and nowhere else; 0 disables hidden_eps (a change is >= 0).
        col = lambda v, dt=mx.float32: mx.array(v, dtype=dt)[:, None]  # noqa: E731
        self._ceil = col([f or r.ceiling for f, r in zip(fixed, rules)], mx.int32)
        self._min = col([f or r.min_loops for f, r in zip(fixed, rules)], mx.int32)
        self._q = col([inf if f or r.threshold is None or r.threshold >= 1.0 else r.threshold
                       for f, r in zip(fixed, rules)])
        self._eps = col([0.0 if f or r.hidden_eps is None else r.hidden_eps
                         for f, r in zip(fixed, rules)])
        self._uses_eps = any(r.hidden_eps is not None and not f
                             for f, r in zip(fixed, rules))

    def __len__(self) -> int:
        return len(self.rules)

    def known_going(self, t: int) -> bool | None:
        """Whether any row loops past step t: known on the host when every row's
        depth is fixed (rows at different fixed depths need no device read)."""
        if None in self._fixed:
            return None
        return any(f > t + 1 for f in self._fixed)

    def stops(self, t: int, cdf_t: mx.array | None, h_t: mx.array,
              h_prev: mx.array | None) -> mx.array:
        """Whether each row stops after 0-based step t: bool [B, S]."""
        if t + 1 >= self.ceiling:
            return mx.ones(h_t.shape[:-1], dtype=mx.bool_)
        crit = mx.zeros(h_t.shape[:-1], dtype=mx.bool_)
        if cdf_t is not None:
            crit = crit | (cdf_t >= self._q)
        if self._uses_eps and h_prev is not None:
            crit = crit | (relative_change(h_t, h_prev) < self._eps)
        return (t + 1 >= self._ceil) | (crit & (t + 1 >= self._min))


def relative_change(h: mx.array, prev: mx.array) -> mx.array:
    """‖h − prev‖ / ‖prev‖ over the hidden axis, in float32."""
    h, prev = h.astype(mx.float32), prev.astype(mx.float32)
    return mx.linalg.norm(h - prev, axis=-1) / mx.linalg.norm(prev, axis=-1)


class CdfTracker:
    """The exit cdf one loop step at a time (same numbers as ``exit_cdf``)."""

    def __init__(self):
        self.survival = None
        self.cdf = None

    def update(self, gate_logits: mx.array) -> mx.array:
        lam = mx.sigmoid(gate_logits.astype(mx.float32))
        if self.survival is None:
            self.cdf, self.survival = lam, 1.0 - lam
        else:
            self.cdf = self.cdf + lam * self.survival
            self.survival = self.survival * (1.0 - lam)
        return self.cdf


def exit_steps(rule: ExitRule, hidden: list[mx.array], gate_logits: list[mx.array]) -> mx.array:
    """The rule's chosen step (0-based) per position, [B, S], given every step's
    state and gate logits (``len(hidden)`` ≥ the rule's ceiling)."""
    if (n := rule.fixed_loops) is not None:
        return mx.full(hidden[0].shape[:-1], n - 1, dtype=mx.int32)
    tracker = CdfTracker()
    chosen = mx.full(hidden[0].shape[:-1], rule.ceiling - 1, dtype=mx.int32)
    done = mx.zeros(chosen.shape, dtype=mx.bool_)
    for t in range(rule.ceiling):
        cdf = tracker.update(gate_logits[t])
        stop = rule.stops(t, cdf, hidden[t], hidden[t - 1] if t else None) & ~done
        chosen = mx.where(stop, t, chosen)
        done = done | stop
    return chosen
