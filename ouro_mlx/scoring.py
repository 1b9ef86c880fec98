"""Log-likelihoods at every loop depth from one forward pass.

A pass at depth T computes every step's state (``Model.loop_outputs``), and step t's
state is exactly what a model run at depth t outputs: step t only reads steps < t of
its own token and of earlier ones. So one pass gives the scores of depths 1..T, and of
the adaptive exits read from the gate: a Q-exit (each token's logits at the first step
whose exit cdf reaches q, as ``Model.__call__`` selects them, over the model's own
``ut_steps``) and the exit mixture (p(token) = Σ_t p(exit at t) · p_t(token), the
likelihood of sampling the exit step from the gate).

Depth keys: ``"1"``, ``"2"``, ... for fixed depths, ``"q0.5"`` for a Q-exit,
``"mix"`` for the mixture. Used by ``ouro-mlx eval`` (lm-eval) and ``ouro-mlx
perplexity``; no lm-eval import here.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import exit as ex
from .model import Model, check_ut_steps


# float32 logits made at once (512 MB): long rows of a large vocabulary go in spans
LOGIT_ELEMENTS = 1 << 27


def threshold_key(q: float) -> str:
    return f"q{q:g}"


@dataclass(frozen=True)
class Depths:
    """What to score: fixed depths ``steps``, Q-exits at ``thresholds``, and with
    ``mixture`` the exit mixture (the last two at the model's own depth)."""

    steps: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    mixture: bool = False

    def __post_init__(self):
        for t in self.steps:
            check_ut_steps(t)
        for q in self.thresholds:
            ex.check_threshold(q)
        if not self.keys():
            raise ValueError("Nothing to score: give a depth or an exit threshold.")

    def keys(self) -> list[str]:
        return ([str(t) for t in self.steps] + [threshold_key(q) for q in self.thresholds]
                + (["mix"] if self.mixture else []))

    def adaptive(self) -> bool:
        return bool(self.thresholds) or self.mixture

    def passes(self, model: Model) -> int:
        """The depth of the one pass that scores them all."""
        return max(self.steps + ((model.ut_steps,) if self.adaptive() else ()))


@dataclass
class Scores:
    """Per row of a batch: the summed log-probability of the scored tokens, whether
    each was the argmax (None for the mixture), how many were scored and, for Q-exits,
    the loop steps they ran."""

    logprob: np.ndarray  # float64 [B]
    greedy: np.ndarray | None  # bool [B]
    tokens: np.ndarray  # int [B]
    loops: np.ndarray | None = None  # [B]: Σ loop steps over the scored tokens
    # (expected ones for the mixture)


def pad(rows: list[list[int]], masks: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, S] ids and the scored-token mask (padding never scored).
    Causal attention keeps a row's real positions blind to its padding."""
    S = max(map(len, rows))
    ids = np.zeros((len(rows), S), np.int32)
    scored = np.zeros((len(rows), S), bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        if len(m) != len(r):
            raise ValueError(f"row {b}: {len(m)} mask entries for {len(r)} tokens.")
        ids[b, :len(r)] = r
        scored[b, :len(r)] = np.asarray(m, bool)
    return ids, scored


def score(model: Model, rows: list[list[int]], masks: list[list[int]],
          depths: Depths) -> dict[str, Scores]:
    """Score ``rows`` (token ids, one sequence each) at every key of ``depths`` from
    one pass: token i of a row counts where its mask is 1 (i >= 1; token 0 has no
    prediction). Returns {key: Scores}."""
    ids, scored = pad(rows, masks)
    if ids.shape[1] < 2:
        raise ValueError("Every row needs at least two tokens to score one.")
    inputs, targets = mx.array(ids[:, :-1]), mx.array(ids[:, 1:])
    mask = mx.array(scored[:, 1:])
    counts = scored[:, 1:].sum(axis=1)
    out = model.loop_outputs(inputs, ut_steps=depths.passes(model))
    mx.eval(out.hidden, out.gate_logits)

    B, S = targets.shape
    span = max(1, LOGIT_ELEMENTS // (B * model.args.vocab_size))

    def read(h: mx.array) -> tuple[mx.array, mx.array]:
        """Per position: the target's log-prob and whether it is the argmax, [B, S]
        each, the logits made ``span`` positions at a time."""
        lps, hits = [], []
        for a in range(0, S, span):
            logits = model.lm_head(h[:, a:a + span]).astype(mx.float32)
            tg = targets[:, a:a + span]
            lp = mx.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
            lps.append(lp - mx.logsumexp(logits, axis=-1))
            hits.append(mx.argmax(logits, axis=-1) == tg)
            mx.eval(lps[-1], hits[-1])
        return mx.concatenate(lps, axis=1), mx.concatenate(hits, axis=1)

    def done(lp, hit=None, loops=None) -> Scores:
        total = mx.sum(mx.where(mask, lp, 0.0), axis=-1)
        if hit is not None:
            hit = mx.all(hit | ~mask, axis=-1)
        mx.eval(total, *([] if hit is None else [hit]))
        return Scores(np.array(total, np.float64), None if hit is None else np.array(hit),
                      counts, loops)

    # each step's logits once: a Q-exit or the mixture only picks or weighs them
    T = model.ut_steps if depths.adaptive() else 0
    per_step = {t: read(out.hidden[t]) for t in sorted({t - 1 for t in depths.steps}
                                                        | set(range(T)))}
    result: dict[str, Scores] = {str(t): done(*per_step[t - 1]) for t in depths.steps}
    if T:
        lps = mx.stack([per_step[t][0] for t in range(T)], axis=-1)  # [B, S, T]
        hits = mx.stack([per_step[t][1] for t in range(T)], axis=-1)
        pdf = ex.exit_pdf(out.gate_logits[:T])
        cdf = ex.exit_cdf(pdf)
        for q in depths.thresholds:
            step = ex.select_exit_step(cdf, q)[..., None]
            loops = mx.sum(mx.where(mask, step[..., 0] + 1, 0), axis=-1)
            mx.eval(loops)
            result[threshold_key(q)] = done(
                mx.take_along_axis(lps, step, axis=-1)[..., 0],
                mx.take_along_axis(hits, step, axis=-1)[..., 0], np.array(loops, np.int64))
        if depths.mixture:
            mixed = mx.logsumexp(lps + mx.log(mx.maximum(pdf, 1e-30)), axis=-1)
            steps = mx.arange(1, T + 1, dtype=mx.float32)
            expected = mx.sum(mx.where(mask, (pdf * steps).sum(-1), 0.0), axis=-1)
            mx.eval(expected)
            result["mix"] = done(mixed, loops=np.array(expected, np.float64))
    return result
