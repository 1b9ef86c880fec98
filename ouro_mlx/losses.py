"""Ouro's training objectives (spec §6), with mlx-lm's loss signature
``loss(model, batch, lengths) -> (loss, ntoks)`` so they also plug into mlx-lm's
trainer. ``batch`` is [B, N] token ids; ``lengths`` [B, 2] holds, per row, the first
and last target position that counts (mlx-lm's convention for prompt masking).

- :func:`stage1_loss` — L = Σ_t p(t|x)·L_t − β·H(p(·|x)) per token: the expected
  per-step cross-entropy under the exit distribution, minus an entropy bonus
  (equivalently a KL to a uniform prior). The paper uses β = 0.1, then 0.05.
- :func:`stage2_loss` — adaptive gate training: the LM's per-step losses are detached;
  a step that still improved the loss by more than γ labels "continue", and the
  gate learns that label with a binary cross-entropy (k = 50, γ = 0.005).
- :func:`fixed_depth_loss` — plain cross-entropy of one step's logits.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .exit import exit_pdf


class LoopTerms(NamedTuple):
    ce: mx.array  # [B, S, T] per-token cross-entropy of every loop step (float32)
    pdf: mx.array  # [B, S, T] exit distribution
    gate_logits: mx.array  # [B, S, T]
    mask: mx.array  # [B, S] targets that count


def target_mask(lengths: mx.array, n: int) -> mx.array:
    steps = mx.arange(1, n + 1)
    return (steps >= lengths[:, 0:1]) & (steps <= lengths[:, 1:])


def loop_terms(model, batch: mx.array, mask: mx.array, ut_steps: int | None = None) -> LoopTerms:
    """Every loop step's cross-entropy and the exit distribution; ``mask`` [B, N-1]
    marks the targets (``batch[:, 1:]``) that count."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = model.loop_outputs(inputs, ut_steps=ut_steps)
    ce = mx.stack(
        [nn.losses.cross_entropy(model.lm_head(h), targets).astype(mx.float32)
         for h in out.hidden],
        axis=-1,
    )
    gates = mx.stack(out.gate_logits, axis=-1).astype(mx.float32)
    return LoopTerms(ce, exit_pdf(gates), gates, mask)


def _masked_mean(x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    ntoks = mask.sum()
    return (x * mask).sum() / mx.maximum(ntoks, 1), ntoks


def entropy(pdf: mx.array) -> mx.array:
    return -(pdf * mx.log(mx.maximum(pdf, 1e-12))).sum(-1)


def stage1(model, batch, mask, beta: float = 0.1, ut_steps: int | None = None):
    """Σ_t p_t·L_t − β·H(p), averaged over target tokens."""
    terms = loop_terms(model, batch, mask, ut_steps)
    per_token = (terms.pdf * terms.ce).sum(-1) - beta * entropy(terms.pdf)
    return _masked_mean(per_token, terms.mask)


def stage2(model, batch, mask, k: float = 50.0, gamma: float = 0.005,
           ut_steps: int | None = None):
    """The paper's adaptive gate loss (§3.3): for steps t = 2..T (1-based), label
    w_t = σ(k·(max(0, L_{t−1} − L_t) − γ)) ("continue"), and
    L = (1/T) Σ_{t=2..T} mean_i BCE(1 − λ_t, w_t), with the LM losses detached.
    Train it with everything but ``model.early_exit_gate`` frozen."""
    terms = loop_terms(model, batch, mask, ut_steps)
    return adaptive_gate_loss(terms.ce, terms.gate_logits, terms.mask, k, gamma)


def adaptive_gate_loss(ce: mx.array, gate_logits: mx.array, mask: mx.array,
                       k: float = 50.0, gamma: float = 0.005):
    """Stage II from per-step losses ``ce`` [B, S, T] (detached here) and gate logits
    [B, S, T]: what :func:`stage2` computes, for callers that already hold the losses
    (``ouro_mlx.calibrate`` computes them once, outside the gradient)."""
    T = ce.shape[-1]
    if T < 2:
        raise ValueError("stage2_loss needs at least 2 loop steps.")
    ce = mx.stop_gradient(ce)
    improvement = mx.maximum(ce[..., :-1] - ce[..., 1:], 0.0)  # [B, S, T-1]
    w = mx.sigmoid(k * (improvement - gamma))
    g = gate_logits[..., 1:]
    # log(1 − λ) = log σ(−g), log λ = log σ(g), stable for large |g|
    bce = -(w * nn.log_sigmoid(-g) + (1 - w) * nn.log_sigmoid(g))
    per_token = bce.sum(-1) / T
    return _masked_mean(per_token, mask)


def fixed_depth(model, batch, mask, ut_steps: int | None = None,
                exit_at_step: int | None = None):
    """Cross-entropy of the logits of one loop step (default: the last)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    T = model._steps(ut_steps)
    logits = model(inputs, ut_steps=T, exit_at_step=T - 1 if exit_at_step is None else exit_at_step)
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32)
    return _masked_mean(ce, mask)


def with_lengths(fn: Callable) -> Callable:
    """mlx-lm's signature: ``lengths`` [B, 2] (first, last target) instead of a mask."""

    def loss(model, batch, lengths, **kw):
        return fn(model, batch, target_mask(lengths, batch.shape[1] - 1), **kw)

    loss.__name__ = f"{fn.__name__}_loss"
    loss.__doc__ = fn.__doc__
    return loss


stage1_loss = with_lengths(stage1)
stage2_loss = with_lengths(stage2)
fixed_depth_loss = with_lengths(fixed_depth)


def loss_report(model, batch, lengths_or_mask, ut_steps: int | None = None) -> dict:
    """Per-step mean losses, the mean exit distribution and its entropy, and the
    expected loop count, over the target tokens (for logging and evaluation).
    Takes mlx-lm's ``lengths`` [B, 2] or a target mask [B, N-1]."""
    mask = lengths_or_mask
    if mask.shape[1] == 2 and batch.shape[1] - 1 != 2:
        mask = target_mask(mask, batch.shape[1] - 1)
    terms = loop_terms(model, batch, mask, ut_steps)
    m = terms.mask[..., None].astype(mx.float32)
    n = mx.maximum(m.sum(), 1)
    steps = mx.arange(1, terms.pdf.shape[-1] + 1, dtype=mx.float32)
    report = {
        "step_losses": ((terms.ce * m).sum((0, 1)) / n).tolist(),
        "exit_dist": ((terms.pdf * m).sum((0, 1)) / n).tolist(),
        "entropy": ((entropy(terms.pdf) * terms.mask).sum() / n).item(),
        "expected_loops": (((terms.pdf * steps).sum(-1) * terms.mask).sum() / n).item(),
        "ntoks": int(terms.mask.sum().item()),
    }
    return report


LOSSES = {"stage1": stage1_loss, "stage2": stage2_loss, "fixed": fixed_depth_loss}
MASKED_LOSSES = {"stage1": stage1, "stage2": stage2, "fixed": fixed_depth}


def make_loss(kind: str, **params) -> Callable:
    """A loss with mlx-lm's signature, e.g. ``make_loss("stage1", beta=0.05)``."""
    if kind not in LOSSES:
        raise ValueError(f"Unknown loss {kind!r}; choose one of {', '.join(LOSSES)}.")
    return partial(LOSSES[kind], **params)
