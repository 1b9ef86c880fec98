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
    learning_rate: float | None = None  # default: relative to the scales (default_lr)
    seed: int = 0
    loop_aware: bool = True
    gate_weight: float = 4.0  # 2 bits: 95.8% of exit decisions kept (3 seeds), 94.3% at 2.0
    cdf_weight: float = 8.0  # 3 bits: 99.5% of exit decisions kept (3 seeds), 98.9% at 0
    grad_checkpoint: bool = False  # recompute each layer in the backward pass

    def check(self) -> None:
        for name in ("num_samples", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        for name in ("gate_weight", "cdf_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


# Adam moves every parameter by about the learning rate per step, whatever its size:
# the default is this fraction of the shared layers' typical scale, so that a step
# changes a scale by about 1% at any bit width and model width (on the bundled
# model: 1e-3 at 2 bits, 2.3e-4 at 4 bits; 4 bits at 1e-3 undid more than it
# gained: 91% of exit decisions kept, against 99.7% at 1e-4). mlx-lm's DWQ default
# (1e-6) barely moves a small model.
LR_PER_SCALE = 0.005


def default_lr(student) -> float:
    """``LR_PER_SCALE`` times the median |scale| of the student's shared quantized
    layers (below 8 bits)."""
    import numpy as np

    found = []

    def look(_, m):
        if getattr(m, "mode", None) == "affine" and getattr(m, "bits", 8) < 8 \
                and hasattr(m, "scales"):
            found.append(np.abs(np.array(m.scales.astype(mx.float32))).ravel())

    for layer in student.model.layers:
        layer.apply_to_modules(look)
    if not found:
        student.apply_to_modules(look)
    if not found:
        raise ValueError("dwq: nothing to train (no quantized layer below 8 bits).")
    return float(f"{LR_PER_SCALE * float(np.median(np.concatenate(found))):.3g}")


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


def shared_copy(model):
    """A copy of ``model`` whose modules are its own but whose arrays are
    ``model``'s: MLX arrays never change in place (quantizing, folding or training
    the copy assigns new arrays to it), so the float model and a student made from
    it hold the float weights once (a deep copy of Ouro-1.4B in bfloat16 would add
    2.9 GB: the float model's size again, before a weight is quantized)."""
    from mlx.utils import tree_flatten

    memo = {id(a): a for _, a in tree_flatten(model.parameters())}
    return copy.deepcopy(model, memo)


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


def step_states(model, inputs: mx.array, T: int) -> tuple[mx.array, mx.array]:
    """Every loop step's final hidden state [B, S, T, H] and per-step exit
    probability λ [B, S, T]."""
    out = model.model(inputs, None, T)
    return mx.stack(out.hidden, axis=2), ex.exit_lambdas(out.gate_logits)


def counted_rows(states: mx.array, mask: mx.array) -> mx.array:
    """The counted positions' rows of a [B, S, ...] array: [N, ...]."""
    import numpy as np

    idx = np.flatnonzero(np.array(mask))
    return states.reshape(-1, *states.shape[2:])[mx.array(idx)]


# logits made at once: 16 MB in float32. Ouro-1.4B's 49,152-token vocabulary over 4
# steps makes 0.8 GB per 1,024 positions, and the loss holds a few such arrays at
# once; beyond one span the gradient is made span by span (``loss_and_grad``). At
# the 1.4B shape a 64-token step peaked at 8.06 GB in spans of this size (21
# positions), 8.78 GB in one span (float32 model of 5.74 GB)
LOGIT_ELEMENTS = 1 << 22


def _log_softmax(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _span(student, T: int) -> int:
    return max(1, LOGIT_ELEMENTS // (T * student.args.vocab_size))


def _span_kl(student, teacher, hs: mx.array, ht: mx.array) -> mx.array:
    target = mx.stop_gradient(_log_softmax(teacher.lm_head(ht)))
    return _kl(target, _log_softmax(student.lm_head(hs)))


def step_kl(student, teacher, h_student: mx.array, h_teacher: mx.array) -> mx.array:
    """KL(teacher ‖ student) of every step's next-token distribution, [N, T], from
    both models' hidden states [N, T, H]. Beyond one span of ``LOGIT_ELEMENTS``
    logits each span is evaluated on its own, so only one span's logits exist at a
    time (no gradient flows through that; ``loss_and_grad`` makes it)."""
    N, T = h_student.shape[:2]
    rows = _span(student, T)
    if N <= rows:
        return _span_kl(student, teacher, h_student, h_teacher)
    out = []
    for i in range(0, N, rows):
        out.append(_span_kl(student, teacher, h_student[i:i + rows], h_teacher[i:i + rows]))
        mx.eval(out[-1])
    return mx.concatenate(out)


def _kl(p_log: mx.array, q_log: mx.array) -> mx.array:
    """KL(p || q) over the last axis, from log-probabilities, as Σ p·(d + e^-d − 1)
    with d = log p − log q: every term is ≥ 0 (no cancellation), and the rounding
    of the log-probabilities enters at second order, not first, so KLs far below
    float32's epsilon are measured instead of drowned."""
    d = p_log - q_log
    return (mx.exp(p_log) * (d + mx.expm1(-d))).sum(-1)


# a step's KL below this counts as done: far below what moves a token (4-bit round-
# to-nearest leaves 1e-7 at step 4), above what float32 resolves with ``_kl``
KL_FLOOR = 1e-9
# a squared cdf difference below this counts as done: float32 resolves a cdf near
# 1 to about 6e-8
CDF_FLOOR = 1e-12


def loss_terms(student, teacher, inputs, mask, teacher_h, teacher_lam, opts):
    """(loss, per-step KL [T]) over the counted tokens, the float ``teacher``'s step
    states ``teacher_h`` [B, S, T, H] and λ [B, S, T] given (see ``objective``)."""
    T = teacher_lam.shape[-1]
    h, lam = (counted_rows(x, mask) for x in step_states(student, inputs, T))
    kl = step_kl(student, teacher, h, counted_rows(teacher_h, mask))
    return objective(kl, lam, counted_rows(teacher_lam, mask), student.exit_threshold, opts)


def objective(kl: mx.array, lam: mx.array, teacher_lam: mx.array, q: float | None,
              opts) -> tuple[mx.array, mx.array]:
    """(loss, per-step KL [T]) from the per-token, per-step KL [N, T] and both models'
    λ [N, T].

    Loop-aware: Σ_t log(KL_t) + gate_weight·log(KL of the exit distributions)
    + cdf_weight·log(mean squared difference of the exit cdfs), where KL_t is step
    t's KL weighted per token by (pdf_t + 1/T)/2 (the float model's exit pdf, as
    Ouro's Stage I loss weights its steps, half spread evenly so that no step is left
    out). The logs make each term count relative to its own size: a step whose error
    is already small (late steps at 4 bits) is kept small instead of being traded for
    a larger one. The cdf term is what a Q-exit reads, at any threshold: a token
    exits where its cdf first reaches q, so a decision flips where the cdfs differ
    across q (the exit distributions' KL weighs a difference by the inverse of the
    probability, and lets the likely steps' cdfs drift). Else: the KL of the step the
    float model's exit rule (at ``q``) picks, only."""
    T = kl.shape[-1]
    n = max(kl.shape[0], 1)
    per_step = kl.sum(0) / n
    teacher_pdf = ex.pdf_from_lambdas(teacher_lam)
    if not opts.loop_aware:  # the float model's output: its exit rule picks a step
        return _exit_selected(q, kl, teacher_pdf).sum() / n, per_step
    eps = 1e-7
    pdf = ex.pdf_from_lambdas(lam)
    # the KL of the exit distributions = Σ_t P(reach t)·KL(λ_t) (the chain rule)
    gate = _kl(mx.log(teacher_pdf + eps), mx.log(pdf + eps))
    w = (teacher_pdf + 1 / T) / 2
    terms = (w * kl).sum(0) / n
    g = gate.sum() / n

    def log(x, floor=KL_FLOOR):
        return mx.log(mx.maximum(x, 0) + floor)

    loss = log(terms).sum() + opts.gate_weight * log(g)
    if opts.cdf_weight:  # the last step's cdf is 1 in both
        d = ex.exit_cdf(pdf)[:, :-1] - ex.exit_cdf(teacher_pdf)[:, :-1]
        loss = loss + opts.cdf_weight * log((d * d).mean(), CDF_FLOOR)
    return loss, per_step


def loss_and_grad(student, teacher, inputs, mask, teacher_h, teacher_lam, opts):
    """``loss_terms``' loss and its gradient to the student's trainable parameters.

    Within one span of logits: one ``value_and_grad``. Beyond it, in three passes
    that hold one span's logits and one lm_head gradient at a time: the student's
    step states and every span's KL without a graph; the objective's gradient to the
    KL and λ (small), then span by span the lm_head's gradient and the states'
    (evaluated and summed as it goes); last, the states' gradient carried back
    through the model body (``mx.vjp``). One more forward pass of the body than a
    plain ``value_and_grad``, whose backward keeps every span's [vocab, hidden]
    gradient alive at once (1.3 GB for 25 spans at hidden 256)."""
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    T = teacher_lam.shape[-1]
    n_rows = int(mask.sum().item())
    rows = _span(student, T)
    if n_rows <= rows:
        return nn.value_and_grad(student, lambda m: loss_terms(
            m, teacher, inputs, mask, teacher_h, teacher_lam, opts)[0])(student)
    th, tl = counted_rows(teacher_h, mask), counted_rows(teacher_lam, mask)
    params = student.trainable_parameters()
    body = [(k, v) for k, v in tree_flatten(params) if not k.startswith("lm_head.")]
    head = student.lm_head.trainable_parameters()

    def states(*arrays):
        student.update(tree_unflatten(list(zip([k for k, _ in body], arrays))))
        return tuple(counted_rows(x, mask) for x in step_states(student, inputs, T))

    h, lam = states(*[v for _, v in body])
    mx.eval(h, lam)
    kl = step_kl(student, teacher, h, th)
    value, (d_kl, d_lam) = mx.value_and_grad(
        lambda k, lm: objective(k, lm, tl, student.exit_threshold, opts)[0],
        argnums=(0, 1))(kl, lam)

    def span(hp, hs, ht, c):
        student.lm_head.update(hp)
        return (_span_kl(student, teacher, hs, ht) * c).sum()

    span_grad = mx.grad(span, argnums=(0, 1))
    g_head, d_h = None, []
    for i in range(0, n_rows, rows):
        g, dh = span_grad(head, h[i:i + rows], th[i:i + rows], d_kl[i:i + rows])
        g_head = g if g_head is None else tree_map(mx.add, g_head, g)
        mx.eval(g_head, dh)
        d_h.append(dh)
    student.lm_head.update(head)
    _, g_body = mx.vjp(states, [v for _, v in body], [mx.concatenate(d_h), d_lam])
    student.update(params)
    grads = tree_unflatten(list(zip([k for k, _ in body], g_body)))
    if head:
        grads["lm_head"] = g_head
    return value, grads


def _exit_selected(q: float | None, kl: mx.array, pdf: mx.array) -> mx.array:
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
    lr = opts.learning_rate or default_lr(student)
    steps = max(1, opts.num_samples // opts.batch_size)
    # decays to a tenth: the last steps settle instead of wandering around the optimum
    opt = optim.Adam(learning_rate=optim.cosine_decay(lr, steps, lr / 10), bias_correction=True)

    def loss(model, inputs, mask, t_h, t_lam):
        return loss_terms(model, teacher, inputs, mask, t_h, t_lam, opts)[0]

    def step(model, inputs, mask, t_h, t_lam):
        return loss_and_grad(model, teacher, inputs, mask, t_h, t_lam, opts)
    layer_type = type(student.model.layers[0])
    call = layer_type.__call__
    if opts.grad_checkpoint:  # mlx-lm's patches the class: undone below
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(student.model.layers[0])

    def targets(batch):
        t_h, t_lam = step_states(teacher, batch[:, :-1], T)
        return mx.stop_gradient(t_h), mx.stop_gradient(t_lam)

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
        best_params = student.trainable_parameters()  # references: updates assign new arrays
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
                    best, best_params = v, student.trainable_parameters()
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
        r_h, r_lam = (counted_rows(x, m) for x in step_states(reference, b[:, :-1], T))
        h, lam = (counted_rows(x, m) for x in step_states(model, b[:, :-1], T))
        kl_sum = kl_sum + step_kl(model, reference, h, r_h).sum(0)
        r_step = ex.select_exit_step(ex.exit_cdf(ex.pdf_from_lambdas(r_lam)), q)
        step = ex.select_exit_step(ex.exit_cdf(ex.pdf_from_lambdas(lam)), q)
        agree += (r_step == step).sum().item()
        loops += (step + 1).sum().item()
        ref_loops += (r_step + 1).sum().item()
        ntok += step.size
    n = max(ntok, 1)
    return {"kl_by_step": [float(f"{x / n:.3g}") for x in kl_sum.tolist()],
            "exit_agreement": round(agree / n, 4), "avg_loops": round(loops / n, 3),
            "float_avg_loops": round(ref_loops / n, 3), "q": q, "tokens": int(ntok)}
