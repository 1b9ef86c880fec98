"""Loop-aware calibrated quantization (``ouro-mlx quantize``).

A looped model applies the same quantized weights at every loop step, so a rounding
error is met T times, and the exit gate reads states that quantization moved.
Round-to-nearest (``rtn``) ignores both. ``dwq`` (distilled weight quantization, as
``mlx_lm.dwq``: the weights stay frozen as integers, their per-group scales and
biases are trained) distils *every* loop step: the student's step-t distribution is
pulled to the float model's step-t distribution, and the student's exit distribution
to the float model's, so that adaptive exit makes the same decisions; each term is
counted relative to its own size (``loss_terms``).
``loop_aware=False`` distils only the float model's output (its exit-selected
logits), which is what stock DWQ does; it is kept for comparison.

The exit gate and the norms stay in full precision and are never trained. Data:
mlx-lm's JSONL layout (``calibrate.load_data``), answer tokens counted.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from . import exit as ex
from .calibrate import Sample, batches, pad_batch


@dataclass
class DWQOptions:
    num_samples: int = 2048  # training samples seen (as mlx_lm.dwq)
    batch_size: int = 8
    max_seq_length: int = 512
    learning_rate: float | None = None  # default: by model width (see default_lr)
    seed: int = 0
    loop_aware: bool = True
    gate_weight: float = 2.0
    grad_checkpoint: bool = False  # recompute each layer in the backward pass

    def check(self) -> None:
        for name in ("num_samples", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not self.gate_weight >= 0:
            raise ValueError(f"gate_weight must be >= 0, got {self.gate_weight}.")


def default_lr(model) -> float:
    """Scales of a small model move far more per step than a 1.4B model's; mlx-lm's
    DWQ default (1e-6) is tuned for large bf16 models and barely moves a small one."""
    return min(1e-3, 0.064 / model.args.hidden_size)


def predicate(mixed: bool = False) -> Callable:
    """What ``mlx_lm.utils.quantize_model`` quantizes: everything but the exit gate
    (norms have no quantized form); ``mixed`` keeps embeddings and lm_head at 8 bits."""

    def pred(path: str, module) -> bool | dict:
        if "early_exit_gate" in path:
            return False
        if mixed and ("embed_tokens" in path or "lm_head" in path):
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        return True

    return pred


def rtn(model, config: dict, bits: int, group_size: int, mixed: bool = False):
    """Round-to-nearest in place: ``(model, config)`` with ``quantization`` set."""
    from mlx_lm.utils import quantize_model

    return quantize_model(model, config, group_size, bits, quant_predicate=predicate(mixed))


def quantized_bits(model) -> tuple[int, int]:
    """(bits, group size) of a quantized model's shared layers (its most common
    setting below 8 bits, else 8)."""
    from collections import Counter

    seen = Counter()

    def look(_, m):
        if isinstance(m, nn.QuantizedLinear):
            seen[(m.bits, m.group_size)] += m.weight.size

    model.apply_to_modules(look)
    if not seen:
        raise ValueError("not a quantized model (no quantized layer).")
    low = {k: n for k, n in seen.items() if k[0] < 8}
    return max(low or seen, key=(low or seen).get)


def step_outputs(model, inputs: mx.array, T: int,
                 lambdas: bool = False) -> tuple[mx.array, mx.array]:
    """Every loop step's log-probabilities [B, S, T, V] and the exit pdf [B, S, T]
    (or the per-step exit probabilities λ with ``lambdas``)."""
    out = model.model(inputs, None, T)
    # one lm_head call for every step: its backward (to the scales) builds one
    # [vocab, hidden] product, not one per step
    logits = model.lm_head(mx.stack(out.hidden, axis=2)).astype(mx.float32)
    gates = ex.exit_lambdas(out.gate_logits) if lambdas else ex.exit_pdf(out.gate_logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True), gates


def _kl(p_log: mx.array, q_log: mx.array) -> mx.array:
    """KL(p || q) over the last axis, from log-probabilities."""
    return (mx.exp(p_log) * (p_log - q_log)).sum(-1)


# float32's resolution of these KLs (about 1e-6): a step below it counts as done, so
# rounding noise there is never traded against a real error elsewhere (at 1e-7,
# 4-bit DWQ kept round-to-nearest's state: exit agreement 83% instead of 95%)
KL_FLOOR = 1e-6


def loss_terms(student, inputs, mask, teacher_lp, teacher_lam, T, opts):
    """(loss, per-step KL [T]) over the counted tokens.

    Loop-aware: Σ_t log(KL_t) + gate_weight·log(KL of the exit distributions), where
    KL_t is step t's KL weighted per token by (pdf_t + 1/T)/2 (the float model's exit
    pdf, as Ouro's Stage I loss weights its steps, half spread evenly so that no step
    is left out). The logs make each term count relative to its own size: a step
    whose error is already small (late steps at 4 bits) is kept small instead of being
    traded for a larger one. Else: the KL of the exit-selected outputs only."""
    lp, lam = step_outputs(student, inputs, T, lambdas=True)
    kl = _kl(teacher_lp, lp)  # [B, S, T]
    m = mask.astype(mx.float32)
    n = mx.maximum(m.sum(), 1)
    per_step = (kl * m[..., None]).sum((0, 1)) / n
    teacher_pdf = ex.pdf_from_lambdas(teacher_lam)
    if not opts.loop_aware:  # the float model's output: its exit rule picks a step
        return (_exit_selected(student, kl, teacher_pdf) * m).sum() / n, per_step
    eps = 1e-7
    pdf = ex.pdf_from_lambdas(lam)
    # the KL of the exit distributions = Σ_t P(reach t)·KL(λ_t) (the chain rule)
    gate = (teacher_pdf * (mx.log(teacher_pdf + eps) - mx.log(pdf + eps))).sum(-1)
    w = (teacher_pdf + 1 / T) / 2
    terms = ((w * kl) * m[..., None]).sum((0, 1)) / n
    g = (gate * m).sum() / n

    def log(x):
        return mx.log(mx.maximum(x, 0) + KL_FLOOR)

    return log(terms).sum() + opts.gate_weight * log(g), per_step


def _exit_selected(model, kl: mx.array, pdf: mx.array) -> mx.array:
    q = model.exit_threshold
    T = kl.shape[-1]
    if q is None or q >= 1.0:
        return kl[..., -1]
    step = ex.select_exit_step(ex.exit_cdf(pdf), q)
    return mx.take_along_axis(kl, step[..., None], axis=-1).squeeze(-1)


def make_trainable(model) -> int:
    """Freeze everything but the quantized layers' scales and biases (affine, < 8
    bits); the gate and norms stay as they are. Returns the trainable count."""
    from mlx.utils import tree_flatten

    model.freeze()

    def open_scales(_, m):
        if getattr(m, "mode", None) == "affine" and getattr(m, "bits", 8) < 8 \
                and hasattr(m, "scales"):
            m.unfreeze(keys=["scales", "biases"], recurse=False)

    model.apply_to_modules(open_scales)
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def dwq(student, teacher, train: list[Sample], valid: list[Sample], opts: DWQOptions,
        progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train ``student``'s (quantized) scales and biases to match ``teacher`` (the float
    model) on ``train``; the best validation state is kept. Returns
    ``{"steps", "valid_before", "valid_after", "seconds", "seconds_per_step"}``."""
    opts.check()
    T = teacher.ut_steps
    if make_trainable(student) == 0:
        raise ValueError("dwq: nothing to train (no quantized layer below 8 bits).")
    teacher.freeze()
    lr = opts.learning_rate or default_lr(teacher)
    steps = max(1, opts.num_samples // opts.batch_size)
    # decays to a tenth: the last steps settle instead of wandering around the optimum
    opt = optim.Adam(learning_rate=optim.cosine_decay(lr, steps, lr / 10), bias_correction=True)

    def loss(model, inputs, mask, t_lp, t_lam):
        return loss_terms(model, inputs, mask, t_lp, t_lam, T, opts)[0]

    step = nn.value_and_grad(student, loss)
    layer_type = type(student.model.layers[0])
    call = layer_type.__call__
    if opts.grad_checkpoint:  # mlx-lm's patches the class: undone below
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(student.model.layers[0])

    def targets(batch):
        t_lp, t_lam = step_outputs(teacher, batch[:, :-1], T, True)
        return mx.stop_gradient(t_lp), mx.stop_gradient(t_lam)

    def validate() -> float:
        total = count = 0.0
        for i in range(0, len(valid), opts.batch_size):
            b, m = pad_batch(valid[i:i + opts.batch_size], opts.max_seq_length)
            value = loss(student, b[:, :-1], m, *targets(b))
            w = m.sum().item()
            total, count = total + value.item() * w, count + w
        return total / max(count, 1)

    every = max(1, steps // 8)
    mx.reset_peak_memory()
    try:
        before = best = validate()
        best_params = copy.deepcopy(dict(student.trainable_parameters()))
        source = batches(train, opts.batch_size, opts.max_seq_length, opts.seed)
        training = 0.0
        for n in range(steps):
            start = time.perf_counter()
            b, m = next(source)
            value, grads = step(student, b[:, :-1], m, *targets(b))
            opt.update(student, grads)
            mx.eval(student.trainable_parameters(), opt.state, value)
            training += time.perf_counter() - start
            if progress is not None:
                progress(n + 1, steps, value.item())
            if (n + 1) % every == 0 or n + 1 == steps:
                v = validate()
                if v < best:
                    best, best_params = v, copy.deepcopy(dict(student.trainable_parameters()))
    finally:
        layer_type.__call__ = call
    student.update(best_params)  # never worse than where it started
    student.freeze()
    return {"steps": steps, "learning_rate": lr, "valid_before": round(before, 6),
            "valid_after": round(best, 6), "seconds": round(training, 1),
            "seconds_per_step": round(training / steps, 4),
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}


def quality(model, reference, samples: list[Sample], q: float = 0.6, *,
            batch_size: int = 8, max_seq_length: int = 512) -> dict:
    """Against the float ``reference`` on the counted tokens of ``samples``: mean KL
    per loop step, the share of tokens whose Q-exit step (at ``q``) matches, and both
    models' average loops at ``q``."""
    T = reference.ut_steps
    kl_sum = mx.zeros((T,))
    agree = loops = ref_loops = ntok = 0.0
    for i in range(0, len(samples), batch_size):
        b, m = pad_batch(samples[i:i + batch_size], max_seq_length)
        r_lp, r_pdf = step_outputs(reference, b[:, :-1], T)
        lp, pdf = step_outputs(model, b[:, :-1], T)
        mf = m.astype(mx.float32)
        kl_sum = kl_sum + (_kl(r_lp, lp) * mf[..., None]).sum((0, 1))
        r_step = ex.select_exit_step(ex.exit_cdf(r_pdf), q)
        step = ex.select_exit_step(ex.exit_cdf(pdf), q)
        agree += ((r_step == step) * mf).sum().item()
        loops += ((step + 1) * mf).sum().item()
        ref_loops += ((r_step + 1) * mf).sum().item()
        ntok += mf.sum().item()
    n = max(ntok, 1)
    return {"kl_by_step": [float(f"{x / n:.3g}") for x in kl_sum.tolist()],
            "exit_agreement": round(agree / n, 4), "avg_loops": round(loops / n, 3),
            "float_avg_loops": round(ref_loops / n, 3), "q": q, "tokens": int(ntok)}
