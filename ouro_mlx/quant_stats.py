"""Loop-aware GPTQ and AWQ: calibrated quantization from activation statistics.

Ouro applies one stack of layers T times per token, so each shared ``nn.Linear`` is
met at T loop steps with T different input distributions, and the error it makes at
step t is part of its own input at step t+1. Stock mlx-lm ignores both:

- stock GPTQ (``mlx_lm.quant.gptq``) sums every Linear's Hessian X·Xᵀ over one pass
  of the *float* model (on Ouro: every loop step, each weighted alike; ``lm_head``
  sees only the exit-selected state) and then quantizes all layers independently;
- stock AWQ (``mlx_lm.quant.awq``) runs each block once on the previous block's
  output, which on a looped model is loop step 1 only.

``loop_aware=True`` (the default) changes three things:

1. **Step weights.** Each token's input at step t is weighted by the float model's
   exit pdf p_t (``ouro_mlx.exit.exit_pdf``): the share of that token's output the
   step provides, as Ouro's own Stage I loss weights its steps. The survival
   probability 1 − cdf_{t−1} (the chance the token runs step t) was the other
   candidate; on the bundled model at 2 bits, GPTQ with pdf weights reached 0.97
   accuracy at 4 loops against 0.91 with survival weights (``STEP_WEIGHTS``).
2. **Every step.** GPTQ's Hessians and AWQ's activation statistics and scale/clip
   losses sum over all T applications of a shared Linear; ``lm_head`` reads every
   step's state, so its Hessian (GPTQ) and clip loss (AWQ) do too.
3. **Sequential.** Linears are quantized one stage at a time (q/k/v, o, gate/up,
   down, per layer, then ``lm_head``), each stage's statistics re-collected from the
   model whose earlier stages are already quantized: step t+1's inputs carry the
   error of steps ≤ t.

4. **Searched ranges.** The embedding (whose rounding error every step's input
   carries) and, for AWQ, every Linear round to a grid whose ends are searched per
   row and group (``range_search``) instead of the group's min and max: for AWQ
   against the layer's output error over every step (the step-weighted Hessian,
   each group's block, then one pass with the cross terms between groups,
   ``round_searched``), replacing mlx-lm's symmetric clip search; for the
   embedding, plain squared error. On the bundled model at 2 bits this took GPTQ at
   4 loops from 0.94 and 0.88 to 0.975 and 0.995 (two calibration sets), AWQ from
   0.69 to 0.978 and 0.982 (docs/quantize.md).

AWQ's per-channel scales are folded into the RMSNorm before q/k/v and gate/up (and
into ``up_proj`` before ``down_proj``), as mlx-lm does for Llama. One norm serves
every loop step, so one scale per channel, searched over all steps, is consistent.
``model.norm`` is not scaled: it also feeds the exit gate and the next step.

``loop_aware=False`` reproduces the stock procedures on this model for comparison:
GPTQ with one float pass and pooled, unweighted Hessians; AWQ from loop step 1's
inputs with mlx-lm's clip search, ``lm_head`` and the embedding round to nearest. In
every mode the exit gate and the norms' roles stay full precision, and the result has
the structure and ``config["quantization"]`` of ``ouro_mlx.quantize.rtn``.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.quant.awq import mse

from . import exit as ex
from .calibrate import Sample, pad_batch
from .quantize import predicate, rtn

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
STEP_WEIGHTS = "pdf"  # or "survival": measured worse on the bundled model (2-bit GPTQ)
N_GRID = 20  # AWQ's grid for scale ratios and clip shrink, as mlx-lm
RANGE_GRID = 10  # range_search: steps per end, each end shrunk by up to 45%
SWEEPS = 1  # round_searched: passes that weigh the cross terms between groups
DAMP = 0.01  # GPTQ damping, a share of the Hessian's mean diagonal, as mlx-lm

# The stages of one decoder layer: (block, Linears reading the same input).
STAGES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
# AWQ scale folds: (stage, the op whose output feeds it, the block it searches over).
AWQ_FOLDS = ((0, "input_layernorm", "self_attn"), (3, "mlp.up_proj", None),
             (2, "post_attention_layernorm", "mlp"))

Progress = Callable[[int, int], None] | None


# ------------------------------------------------------------------------ packing


def pack(codes: mx.array, bits: int) -> mx.array:
    """Integer codes [..., n] (0 ≤ code < 2**bits) in MLX's affine layout: a
    little-endian bit stream in uint32 words [..., n·bits/32], any of ``BITS``."""
    codes = codes.astype(mx.uint32)
    stream = (codes[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1
    stream = stream.reshape(*codes.shape[:-1], -1, 32)
    return (stream << mx.arange(32, dtype=mx.uint32)).sum(-1).astype(mx.uint32)


def codes_of(w: mx.array, scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """Round ``w`` [out, in] to the affine grid of per-group ``scales``/``biases``."""
    g = w.shape[-1] // scales.shape[-1]
    w = w.reshape(*scales.shape, g)
    q = mx.round((w - biases[..., None]) / scales[..., None])
    return mx.clip(q, 0, 2**bits - 1).reshape(*scales.shape[:-1], -1)


def fake_quant(w: mx.array, bits: int, group_size: int) -> mx.array:
    """Round to nearest and back: what the quantized layer computes with."""
    return mx.dequantize(*mx.quantize(w, group_size, bits), group_size, bits)


def range_search(w: mx.array, h: mx.array, bits: int, grid: int = RANGE_GRID,
                 lin: mx.array | None = None):
    """Per-row affine ``(scales, biases)`` [out, 1] for one group ``w`` [out, g]: the
    group's min and max each shrunk towards 0 by 0, 1/2g, … (g−1)/2g of itself
    (g = ``grid``; GPTQ's reference quantizer shrinks both alike), independently,
    keeping the pair whose rounding error d = ŵ − w costs least: d·h·dᵀ for a Hessian
    block ``h`` [g, g], Σ h·d² for a diagonal [g]; plus 2·d·linᵀ (``lin`` [out, g]:
    the cross terms with the other groups' errors)."""
    top = 2**bits - 1
    w = w.astype(mx.float32)
    lo0, hi0 = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    best = mx.full(lo0.shape, math.inf)
    best_s, best_b = mx.zeros_like(lo0), lo0
    for i in range(grid):
        for j in range(grid):
            lo, hi = lo0 * (1 - 0.5 * i / grid), hi0 * (1 - 0.5 * j / grid)
            s = mx.maximum(hi - lo, 1e-8) / top
            d = mx.clip(mx.round((w - lo) / s), 0, top) * s + lo - w
            err = ((d @ h) * d if h.ndim == 2 else d * d * h).sum(axis=1, keepdims=True)
            if lin is not None:
                err = err + 2 * (d * lin).sum(axis=1, keepdims=True)
            better = err < best
            best = mx.where(better, err, best)
            best_s, best_b = mx.where(better, s, best_s), mx.where(better, lo, best_b)
        mx.eval(best, best_s, best_b)
    return best_s, best_b


def round_searched(w: mx.array, bits: int, group_size: int, H: mx.array | None = None):
    """Round ``w`` [out, in] to nearest on grids ``range_search`` picks per row and
    group. ``H`` None: each group's plain squared error. ``H`` [in, in] (a Hessian,
    Σ x·xᵀ): the layer's output error d·H·dᵀ (d = ŵ − w per row), first each group on
    its own diagonal block, then ``SWEEPS`` passes over the groups in which each
    group's pick also weighs its cross terms with every other group's current error
    (coordinate descent: the cost never rises). Returns (codes, scales, biases,
    dequantized weight) as :func:`gptq_weight`."""
    cols = [(k, i, i + group_size) for k, i in enumerate(range(0, w.shape[1], group_size))]
    picks = [range_search(w[:, i:j], mx.ones((group_size,)) if H is None else H[i:j, i:j],
                          bits) for _, i, j in cols]
    scales = mx.concatenate([s for s, _ in picks], axis=1)
    biases = mx.concatenate([b for _, b in picks], axis=1)
    codes = codes_of(w, scales, biases, bits)
    if H is None:
        return _assemble(codes, scales, biases)
    D = _assemble(codes, scales, biases)[3] - w.astype(mx.float32)  # current error
    for _ in range(SWEEPS):
        for k, i, j in cols:
            cross = D @ H[:, i:j] - D[:, i:j] @ H[i:j, i:j]  # other groups' share
            s, b = range_search(w[:, i:j], H[i:j, i:j], bits, lin=cross)
            c = codes_of(w[:, i:j], s, b, bits)
            D[:, i:j] = c * s + b - w[:, i:j].astype(mx.float32)
            codes[:, i:j] = c
            scales[:, k:k + 1], biases[:, k:k + 1] = s, b
            mx.eval(D, codes, scales, biases)
    return _assemble(codes, scales, biases)


def _assemble(codes: mx.array, scales: mx.array, biases: mx.array):
    g = codes.shape[1] // scales.shape[1]
    deq = (codes.reshape(*scales.shape, g) * scales[..., None]
           + biases[..., None]).reshape(codes.shape)
    return codes, scales, biases, deq


# ------------------------------------------------------------------------- set-up


class _Target:
    """One Linear to quantize and the bits/group size ``predicate`` gives it."""

    def __init__(self, parent: nn.Module, name: str, path: str, bits: int, group_size: int):
        self.parent, self.name, self.path = parent, name, path
        self.bits, self.group_size = bits, group_size

    @property
    def linear(self) -> nn.Linear:
        return self.parent[self.name]


def _targets(model, bits: int, group_size: int, mixed: bool) -> dict[str, _Target]:
    """The Linears ``rtn`` quantizes, by path, with their parameters; the args are
    checked first (one-line ValueErrors)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}; got {bits}.")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}; "
                         f"got {group_size}.")
    if model.fused:
        model.unfuse_projections()
    pred, out = predicate(mixed), {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not hasattr(m, "to_quantized") or not (p := pred(path, m)):
            continue
        if type(m) not in (nn.Linear, nn.Embedding):
            raise ValueError(f"{path} is a {type(m).__name__}; quantize a float model "
                             "without adapters.")
        b, g = (p["bits"], p["group_size"]) if isinstance(p, dict) else (bits, group_size)
        if m.weight.shape[-1] % g:
            raise ValueError(f"group_size {g} does not divide {path}'s input size "
                             f"{m.weight.shape[-1]}.")
        if isinstance(m, nn.Linear):
            parent, name = path.rsplit(".", 1) if "." in path else ("", path)
            out[path] = _Target(_get(model, parent), name, path, b, g)
    return out


def _get(module: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` ("" is ``module``)."""
    for k in filter(None, path.split(".")):
        module = module[int(k)] if k.isdigit() else module[k]
    return module


class _Batch:
    """Calibration inputs [B, S] and per-step token weights [T, B, S] (0 on padding)."""

    def __init__(self, inputs: mx.array, weights: mx.array):
        self.inputs, self.weights = inputs, weights


def _batches(model, samples: list[Sample], batch_size: int, max_seq_length: int,
             loop_aware: bool, steps: str) -> list[_Batch]:
    """``steps``: "all" (GPTQ) or "first" (AWQ) for ``loop_aware=False``."""
    if not samples:
        raise ValueError("no calibration samples.")
    if batch_size < 1 or max_seq_length < 2:
        raise ValueError("batch_size must be >= 1 and max_seq_length >= 2.")
    T, out = model.ut_steps, []
    for i in range(0, len(samples), batch_size):
        rows = samples[i:i + batch_size]
        tokens, _ = pad_batch(rows, max_seq_length)
        inputs = tokens[:, :-1]
        n = mx.array([min(len(t), max_seq_length) - 1 for t, _ in rows])
        valid = (mx.arange(inputs.shape[1])[None] < n[:, None]).astype(mx.float32)
        if not loop_aware:
            w = mx.stack([valid if steps == "all" or t == 0 else 0 * valid
                          for t in range(T)])
        else:
            pdf = ex.exit_pdf(model.model(inputs, None, T).gate_logits)  # [B, S, T]
            if STEP_WEIGHTS == "survival":
                pdf = mx.cumsum(pdf[..., ::-1], axis=-1)[..., ::-1]  # 1 − cdf_{t−1}
            w = mx.moveaxis(pdf, -1, 0) * valid
        mx.eval(w)
        out.append(_Batch(inputs, w))
    return out


class _Catcher(nn.Module):
    """Stands in for a Linear and hands each call's input, with its token weights
    (the loop step's row of the batch's weights), to ``sink``."""

    def __init__(self, linear: nn.Module, sink: Callable[[mx.array, mx.array], None]):
        super().__init__()
        self.linear = linear
        self._sink = sink
        self.batch: _Batch | None = None

    def __call__(self, x: mx.array, t: int = 0) -> mx.array:
        self._sink(x, self.batch.weights[t])
        return self.linear(x)


def _run(model, batches: list[_Batch], catchers: dict[str, _Catcher],
         targets: dict[str, _Target]) -> None:
    """One pass over ``batches`` with ``catchers`` standing in for their Linears.
    Blocks see the loop step through ``loop_keys``; ``lm_head`` (applied outside the
    loop) is fed every step's state itself."""
    blocks = {}
    for path, c in catchers.items():
        tgt = targets[path]
        tgt.parent[tgt.name] = c
        if path != "lm_head":
            blocks[id(tgt.parent)] = tgt.parent
    for b in blocks.values():
        b.loop_keys = frozenset(k for k, v in b.items() if isinstance(v, _Catcher))
    try:
        for batch in batches:
            for c in catchers.values():
                c.batch = batch
            out = model.model(batch.inputs, None, model.ut_steps)
            if "lm_head" in catchers:
                for t, h in enumerate(out.hidden):
                    catchers["lm_head"](h, t)
            mx.eval([c.parameters() for c in catchers.values()], out.hidden)
    finally:
        for b in blocks.values():
            del b.loop_keys
        for path, c in catchers.items():
            targets[path].parent[targets[path].name] = c.linear


def _layer_stages(targets: dict[str, _Target], i: int) -> list[list[_Target]]:
    """Layer ``i``'s Linears in ``STAGES``' order, grouped by shared input."""
    return [[targets[p] for n in names if (p := f"model.layers.{i}.{block}.{n}") in targets]
            for block, names in STAGES]


def _stages(model, targets: dict[str, _Target]) -> list[list[_Target]]:
    """Every Linear to quantize in forward order, grouped by shared input."""
    out = [s for i in range(len(model.layers)) for s in _layer_stages(targets, i) if s]
    return out + [[targets["lm_head"]]] if "lm_head" in targets else out


def _finish(model, config: dict, bits: int, group_size: int, mixed: bool,
            exact: dict[str, tuple[mx.array, mx.array, mx.array]]):
    """``rtn``'s structure and config; the layers in ``exact`` get their own
    (codes, scales, biases)."""
    model, config = rtn(model, config, bits, group_size, mixed)
    for path, (codes, scales, biases) in exact.items():
        owner = _get(model, path)
        dt = owner.scales.dtype
        owner.weight = pack(codes, owner.bits)
        owner.scales, owner.biases = scales.astype(dt), biases.astype(dt)
    mx.eval(model.parameters())
    return model, config


def _embedding(model, bits: int, group_size: int, mixed: bool, exact: dict) -> None:
    """Round the embedding on searched ranges (its bits and group size as ``rtn``
    gives them) into ``exact``; the model computes with the rounded table from now on,
    so the statistics gathered next see its error."""
    emb = model.model.embed_tokens
    p = predicate(mixed)("model.embed_tokens", emb)
    if not p or not isinstance(emb, nn.Embedding):
        return
    b, g = (p["bits"], p["group_size"]) if isinstance(p, dict) else (bits, group_size)
    codes, scales, biases, deq = round_searched(emb.weight, b, g)
    exact["model.embed_tokens"] = (codes, scales, biases)
    emb.weight = deq.astype(emb.weight.dtype)


# --------------------------------------------------------------------------- GPTQ


def _gram(x: mx.array, w: mx.array) -> mx.array:
    """Σ w·x·xᵀ over the tokens of ``x`` [..., in] with weights ``w`` [...] (float32)."""
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    return (x * w.reshape(-1, 1)).T @ x


def _hessian_sink(store: dict, key: str) -> Callable[[mx.array, mx.array], None]:
    def sink(x: mx.array, w: mx.array) -> None:
        h = _gram(x, w)
        store[key] = store[key] + h if key in store else h

    return sink


def gptq_weight(W: mx.array, H: mx.array, bits: int, group_size: int):
    """GPTQ (mlx-lm's algorithm, any of ``BITS``): quantize ``W`` [out, in] column by
    column, pushing each column's error onto the later ones through the inverse
    Hessian. Returns (codes, scales, biases, dequantized weight)."""
    W = W.astype(mx.float32)
    n = W.shape[1]
    with mx.stream(mx.cpu):  # mx.linalg's factorisations run on the CPU
        dead = mx.diag(H) <= 0
        H = H + mx.diag(DAMP * mx.diag(H).mean() + dead.astype(mx.float32))
        W = mx.where(dead, 0.0, W)
        Hinv = mx.linalg.cholesky(mx.linalg.cholesky_inv(mx.linalg.cholesky(H)), upper=True)
        mx.eval(Hinv, W)
    top = 2**bits - 1
    all_codes, all_scales, all_biases = [], [], []
    for i in range(0, n, group_size):
        j = i + group_size
        _, scales, biases = mx.quantize(W[:, i:j], group_size, bits)
        err = []
        for k in range(i, j):
            q = mx.clip(mx.round((W[:, k:k + 1] - biases) / scales), 0, top)
            e = (W[:, k:k + 1] - (scales * q + biases)) / Hinv[k, k]
            W[:, k:j] -= e @ Hinv[k:k + 1, k:j]
            err.append(e)
            all_codes.append(q)
        W[:, j:] -= mx.concatenate(err, axis=1) @ Hinv[i:j, j:]
        all_scales.append(scales)
        all_biases.append(biases)
        mx.eval(W, all_codes)
    return _assemble(mx.concatenate(all_codes, axis=1), mx.concatenate(all_scales, axis=1),
                     mx.concatenate(all_biases, axis=1))


def gptq(model, config: dict, samples: list[Sample], bits: int, group_size: int,
         mixed: bool = False, *, loop_aware: bool = True, batch_size: int = 8,
         max_seq_length: int = 512, progress: Progress = None):
    """GPTQ in place on a float Ouro model: ``(model, config)`` as ``rtn`` returns
    them. Loop-aware: exit-pdf-weighted Hessians over every loop step, stage by stage
    from the partly quantized model; else stock mlx-lm GPTQ (see the module doc)."""
    targets = _targets(model, bits, group_size, mixed)
    batches = _batches(model, samples, batch_size, max_seq_length, loop_aware, "all")
    stages = _stages(model, targets)
    exact = {}
    if loop_aware:
        _embedding(model, bits, group_size, mixed, exact)

    def collect(stage_list: list[list[_Target]]) -> dict[str, mx.array]:
        store: dict[str, mx.array] = {}
        catchers = {s[0].path: _Catcher(s[0].linear, _hessian_sink(store, s[0].path))
                    for s in stage_list}
        if loop_aware or "lm_head" not in catchers:
            _run(model, batches, catchers, targets)
        else:  # stock: lm_head reads the state that the model's exit rule selects
            head = catchers.pop("lm_head")
            model.lm_head = head
            try:
                _run(model, batches, catchers, targets)
                for batch in batches:
                    head.batch = batch
                    mx.eval(model(batch.inputs), store["lm_head"])
            finally:
                model.lm_head = head.linear
        return store

    hessians = {} if loop_aware else collect(stages)  # stock: one float pass
    for n, stage in enumerate(stages):
        H = collect([stage])[stage[0].path] if loop_aware else hessians[stage[0].path]
        for tgt in stage:
            codes, scales, biases, deq = gptq_weight(tgt.linear.weight, H, tgt.bits,
                                                     tgt.group_size)
            exact[tgt.path] = (codes, scales, biases)
            tgt.linear.weight = deq.astype(tgt.linear.weight.dtype)
        if progress is not None:
            progress(n + 1, len(stages))
    return _finish(model, config, bits, group_size, mixed, exact)


# ---------------------------------------------------------------------------- AWQ


class _Inputs:
    """A stage's captured inputs: per (batch, step) the input [B, S, in] and its token
    weights [B, S]; steps whose weights are all zero are not kept."""

    def __init__(self):
        self.items: list[tuple[mx.array, mx.array]] = []

    def sink(self, x: mx.array, w: mx.array) -> None:
        if w.max().item() > 0:
            self.items.append((x, w))

    def loss(self, f: Callable[[mx.array], mx.array], g: Callable[[mx.array], mx.array]):
        """Σ weight·‖f(x) − g(x)‖² / Σ weight·width over every kept input."""
        total = mx.array(0.0)
        norm = 0.0
        for x, w in self.items:
            a, b = f(x), g(x)
            total = total + (mse(a, b).sum(-1) * w).sum()
            norm += w.sum().item() * a.shape[-1]
        return total / max(norm, 1e-12)

    def hessian(self) -> mx.array:
        """Σ weight·x·xᵀ over every kept input [in, in] (float32)."""
        return sum(_gram(x, w) for x, w in self.items)

    def channel_mean(self) -> mx.array:
        """The weighted mean |x| per input channel (AWQ's activation statistic)."""
        s = sum((x.abs() * w[..., None]).sum((0, 1)) for x, w in self.items)
        return s / sum(w.sum() for _, w in self.items)

    def frames(self, n: int = 512) -> tuple[mx.array, mx.array]:
        """Up to about ``n`` token inputs [N, in] and their weights [N], evenly spaced."""
        x = mx.concatenate([x.reshape(-1, x.shape[-1]) for x, _ in self.items])
        w = mx.concatenate([w.reshape(-1) for _, w in self.items])
        idx = np.flatnonzero(np.array(w) > 0)
        idx = mx.array(idx[::max(1, math.ceil(idx.size / n))])
        return x[idx], w[idx]


def _search_scale(inputs: _Inputs, layers: list[nn.Linear], block: nn.Module | None,
                  bits: int, group_size: int) -> mx.array:
    """AWQ's grid search (mlx-lm's ``search_best_scale``) over per-channel scales
    ``mean|x|^ratio``, its loss the weighted output error over every kept input."""
    block = block or layers[0]
    call = (lambda x: block(x, "causal")[0]) if "o_proj" in block else block
    ref = {id(x): call(x) for x, _ in inputs.items}
    x_mean = inputs.channel_mean()
    originals = [m.weight for m in layers]
    best, best_scales = math.inf, None
    for r in range(N_GRID):
        s = mx.maximum(x_mean ** (r / N_GRID), 1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for m, w in zip(layers, originals):
            m.weight = fake_quant(w * s, bits, group_size) / s
        loss = inputs.loss(lambda x: ref[id(x)], call).item()
        if loss < best:
            best, best_scales = loss, s
    for m, w in zip(layers, originals):
        m.weight = w
    return best_scales


def _fold(prev: nn.Module, layers: list[nn.Linear], s: mx.array) -> None:
    """Divide ``prev``'s output channels by ``s``, multiply the layers' inputs by it."""
    if isinstance(prev, nn.RMSNorm):
        prev.weight = prev.weight / s
    else:
        prev.weight = prev.weight / s[:, None]
    for m in layers:
        m.weight = m.weight * s


def _search_clip(inputs: _Inputs, w: mx.array, bits: int, group_size: int,
                 max_shrink: float = 0.5) -> mx.array:
    """AWQ's clip search (mlx-lm's ``search_best_clip``), per output row and group,
    its loss the weighted error of the group's partial products over every kept
    input. Returns the clipped weight."""
    x, wt = inputs.frames()
    x = x.reshape(x.shape[0], -1, group_size)  # [N, G, g]
    wg = w.reshape(w.shape[0], -1, group_size)  # [O, G, g]
    ref = mx.einsum("ngk,ogk->nog", x, wg)
    init = wg.abs().max(axis=-1, keepdims=True)
    best_err = mx.full(wg.shape[:2], math.inf)
    best_max = init
    for i in range(int(max_shrink * N_GRID)):
        w_max = (1 - i / N_GRID) * init
        wq = fake_quant(mx.clip(wg, -w_max, w_max).reshape(w.shape), bits, group_size)
        out = mx.einsum("ngk,ogk->nog", x, wq.reshape(wg.shape))
        err = (mse(ref, out) * wt[:, None, None]).sum(0)
        better = err < best_err
        best_err = mx.where(better, err, best_err)
        best_max = mx.where(better[..., None], w_max, best_max)
        mx.eval(best_err, best_max)
    return mx.clip(wg, -best_max, best_max).reshape(w.shape)


def awq(model, config: dict, samples: list[Sample], bits: int, group_size: int,
        mixed: bool = False, *, loop_aware: bool = True, batch_size: int = 8,
        max_seq_length: int = 512, progress: Progress = None, then_gptq: bool = False):
    """AWQ in place on a float Ouro model: ``(model, config)`` as ``rtn`` returns them.
    Loop-aware, per decoder layer: capture its Linears' inputs at every loop step
    (exit-pdf weights) from the partly quantized model, search and fold the scales,
    then round each Linear on ranges searched against its step-weighted Hessian;
    ``lm_head`` likewise over every step's state, the embedding first
    (``range_search``). Not loop-aware: loop step 1's inputs only, mlx-lm's clip
    search (none for q and k), ``lm_head`` and the embedding rounded to nearest, as
    stock mlx-lm AWQ. ``then_gptq``: only the scales are searched and folded (the
    model stays float and computes the same function), then :func:`gptq` rounds it."""
    if then_gptq:
        scale_only(model, samples, bits, group_size, mixed, loop_aware=loop_aware,
                   batch_size=batch_size, max_seq_length=max_seq_length)
        return gptq(model, config, samples, bits, group_size, mixed, loop_aware=loop_aware,
                    batch_size=batch_size, max_seq_length=max_seq_length, progress=progress)
    targets = _targets(model, bits, group_size, mixed)
    batches = _batches(model, samples, batch_size, max_seq_length, loop_aware, "first")
    head = loop_aware and "lm_head" in targets
    total = len(model.layers) + head
    exact: dict[str, tuple[mx.array, mx.array, mx.array]] = {}
    clipped: dict[str, mx.array] = {}  # stock: clipped float weights, rounded at the end
    if loop_aware:
        _embedding(model, bits, group_size, mixed, exact)

    def round_stage(stage: list[_Target], inp: _Inputs) -> None:
        H = inp.hessian() if loop_aware else None
        for tgt in stage:
            w = tgt.linear.weight
            if loop_aware:
                codes, scales, biases, deq = round_searched(w, tgt.bits, tgt.group_size, H)
                exact[tgt.path] = (codes, scales, biases)
            else:
                if tgt.name not in ("q_proj", "k_proj"):  # as mlx-lm: no clip for q, k
                    w = _search_clip(inp, w, tgt.bits, tgt.group_size)
                clipped[tgt.path] = w
                deq = fake_quant(w, tgt.bits, tgt.group_size)
            tgt.linear.weight = deq.astype(w.dtype)  # later layers and steps see it rounded

    for n, layer in enumerate(model.layers):
        layer_stages = _layer_stages(targets, n)
        inputs = _capture(model, batches, layer_stages, targets)
        _scale_layer(layer, layer_stages, inputs, bits, group_size)
        for stage, inp in zip(layer_stages, inputs):
            round_stage(stage, inp)
        if progress is not None:
            progress(n + 1, total)
    if head:
        stage = [targets["lm_head"]]
        round_stage(stage, _capture(model, batches, [stage], targets)[0])
        if progress is not None:
            progress(total, total)
    for path, w in clipped.items():
        targets[path].linear.weight = w
    return _finish(model, config, bits, group_size, mixed, exact)


def scale_only(model, samples: list[Sample], bits: int, group_size: int, mixed: bool = False,
               *, loop_aware: bool = True, batch_size: int = 8, max_seq_length: int = 512):
    """AWQ's scale search, folded into the shared norms, on a float model that stays
    float (the same function, its weights easier to round)."""
    targets = _targets(model, bits, group_size, mixed)
    batches = _batches(model, samples, batch_size, max_seq_length, loop_aware, "first")
    for n, layer in enumerate(model.layers):
        layer_stages = _layer_stages(targets, n)
        _scale_layer(layer, layer_stages, _capture(model, batches, layer_stages, targets),
                     bits, group_size)


def _capture(model, batches: list[_Batch], stage_list: list[list[_Target]],
             targets: dict[str, _Target]) -> list[_Inputs]:
    """Each stage's inputs (every loop step, weighted) over the calibration batches."""
    inputs = [_Inputs() for _ in stage_list]
    _run(model, batches, {s[0].path: _Catcher(s[0].linear, i.sink)
                          for s, i in zip(stage_list, inputs)}, targets)
    return inputs


def _scale_layer(layer, layer_stages, inputs: list[_Inputs], bits: int, group_size: int):
    """Search each fold's scales on the captured inputs and fold them in."""
    for stage, prev, block in AWQ_FOLDS:
        linears = [t.linear for t in layer_stages[stage]]
        s = _search_scale(inputs[stage], linears, block and layer[block], bits, group_size)
        _fold(_get(layer, prev), linears, s)
        # the stage's own captured inputs are now divided by s
        inputs[stage].items = [(x / s, w) for x, w in inputs[stage].items]
