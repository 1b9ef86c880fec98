"""Benchmarks: Ouro against the same stack unrolled in mlx-lm's own ``llama``.

The peer is mlx-lm's ``llama.Model`` with L×T layers of Ouro's shape whose weights
*are* Ouro's layers repeated T times (shared modules, so memory stays that of Ouro's
L layers while every token runs L×T layer applications): what looping must not cost
more than. Both run through their library's own generation loop in the same process.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .decoding.plain import generate_step
from .decoding.steps import decode, greedy, prefill, sample_with
from .exit import ExitRule
from .model import Model, ModelArgs


@dataclass
class Run:
    name: str
    prompt_tps: float
    decode_tps: float
    peak_gb: float
    avg_loops: float | None = None
    kv_bytes: int | None = None
    loops: dict = field(default_factory=dict)
    bytes_per_token: float | None = None  # what decoding one token reads (decode_bytes)


def random_model(config: dict, dtype: str, seed: int = 0) -> Model:
    from .loading import parse_dtype
    from .random_model import random_weights

    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(random_weights(config, seed, parse_dtype(dtype)).items()))
    mx.eval(model.parameters())
    return model


def quantize(model: Model, config: dict, bits: int, group_size: int = 64) -> Model:
    from mlx_lm.utils import quantize_model

    model, _ = quantize_model(model, config, group_size, bits,
                              quant_predicate=model.quant_predicate)
    mx.eval(model.parameters())
    return model


def unrolled_peer(model: Model, ut_steps: int) -> nn.Module:
    """mlx-lm's llama with Ouro's L layers repeated ``ut_steps`` times (shared): its
    blocks hold Ouro's projection modules, so build it before fusing the model's."""
    from mlx_lm.models import llama

    a = model.args
    args = llama.ModelArgs(
        model_type="llama", hidden_size=a.hidden_size, num_hidden_layers=1,
        intermediate_size=a.intermediate_size, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        rms_norm_eps=a.rms_norm_eps, vocab_size=a.vocab_size, rope_theta=a.rope_theta,
        tie_word_embeddings=False,
    )
    peer = llama.Model(args)
    blocks = []
    for layer in model.layers:
        block = llama.TransformerBlock(args)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.self_attn, name, getattr(layer.self_attn, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(block.mlp, name, getattr(layer.mlp, name))
        block.input_layernorm = layer.input_layernorm
        block.post_attention_layernorm = layer.post_attention_layernorm
        blocks.append(block)
    peer.model.layers = blocks * ut_steps
    peer.model.embed_tokens = model.model.embed_tokens
    peer.model.norm = model.model.norm
    peer.lm_head = model.lm_head
    return peer


def fill_context(cache: list, n: int, like: mx.array) -> None:
    """Pre-fill every KV cache with ``n`` tokens of random K/V: memory and attention
    cost of an ``n``-token context without running an ``n``-token prefill."""
    if n <= 0:
        return
    flat = [c for x in cache for c in (x.caches if hasattr(x, "caches") else [x])]
    B, heads, _, hd = like.shape
    for i, c in enumerate(flat):  # the same context every run
        k = mx.random.normal((B, heads, n, hd), key=mx.random.key(i)).astype(like.dtype)
        c.update_and_fetch(k, k)
        mx.eval(c.state)


def param_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters (quantized: packed weights, scales and biases)."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def kv_position_bytes(args, dtype: mx.Dtype, kv_bits: int | None = None,
                      group_size: int = 64) -> float:
    """Bytes of one token's K and V in one layer's cache (quantized: the packed
    values plus a scale and a bias per group of a head, as ``QuantizedKVCache`` stores
    them)."""
    hd, size = args.head_dim, dtype.size
    per_head = hd * size if kv_bits is None else hd * kv_bits / 8 + 2 * (hd // group_size) * size
    return 2 * args.num_key_value_heads * per_head


def decode_bytes(model: Model, loops: float, positions: float,
                 kv_bits: int | None = None) -> float:
    """Bytes one decoded token reads at batch 1, the memory-bandwidth bound's
    numerator: every loop step reads the shared layers, the final norm, the exit gate
    and each layer's K/V of ``positions`` tokens; once per token, ``lm_head`` and one
    embedding row. ``loops``: loop steps run (an average is fine)."""
    inner = model.model
    step = (sum(param_bytes(layer) for layer in inner.layers) + param_bytes(inner.norm)
            + param_bytes(inner.early_exit_gate))
    dtype = inner.norm.weight.dtype  # the activation dtype, quantized or not
    kv = len(inner.layers) * positions * kv_position_bytes(model.args, dtype, kv_bits)
    row = param_bytes(inner.embed_tokens) / model.args.vocab_size
    return loops * (step + kv) + param_bytes(model.lm_head) + row


def peer_decode_bytes(peer: nn.Module, positions: float) -> float:
    """``decode_bytes`` of the unrolled peer: its L×T layers (shared modules, read
    once per application), one final norm, no exit gate."""
    inner = peer.model
    dtype = inner.norm.weight.dtype
    kv = len(inner.layers) * positions * kv_position_bytes(peer.args, dtype)
    row = param_bytes(inner.embed_tokens) / peer.args.vocab_size
    return (sum(param_bytes(layer) for layer in inner.layers) + kv + param_bytes(inner.norm)
            + param_bytes(peer.lm_head) + row)


def decode_positions(prompt: int, n_gen: int, context: int = 0) -> float:
    """Cached tokens a timed decode step attends to, on average over the run: the
    context and prompt, then one more per decoded token."""
    return context + prompt + n_gen / 2


def gemv_bandwidth(nbytes: int | None = None, calls: int = 4,
                   trials: int = 3) -> tuple[float, int]:
    """(bytes/s, matrix bytes) of a bfloat16 matrix-vector product, the best of
    ``trials`` evaluations of ``calls`` products each: the memory bandwidth decode can
    reach in this process. Default size: 268 MB on a GPU (well past its caches),
    64 MB on the CPU (well under a second)."""
    if nbytes is None:
        nbytes = 2**28 if mx.default_device().type == mx.DeviceType.gpu else 2**26
    cols = 8192
    W = mx.random.uniform(shape=(nbytes // (2 * cols), cols), dtype=mx.bfloat16,
                          key=mx.random.key(0))
    xs = [mx.random.uniform(shape=(cols,), dtype=mx.bfloat16, key=mx.random.key(i + 1))
          for i in range(calls)]
    mx.eval(W, xs, W @ xs[0])  # allocated, and the kernel compiled
    best = float("inf")
    for _ in range(trials):
        tic = time.perf_counter()
        mx.eval([W @ x for x in xs])
        best = min(best, time.perf_counter() - tic)
    return calls * W.nbytes / best, W.nbytes


def timed(gen: Iterator, n_prompt: int, n_gen: int, loops_of: Callable | None = None) -> tuple:
    """(prompt tok/s, decode tok/s, loops of the decoded tokens) for the first
    ``n_gen`` tokens of ``gen``, which must be asked for ``n_gen + 1``: then every
    generator has queued the token after each one it hands out, the last timed one
    included. That matters on MLX's CPU backend, where queueing is mostly computing
    (``async_eval`` waits while more than ~10 tasks are pending): the first token
    arrives once the second is (nearly) done and each later one once the next is, so
    the prompt time includes one decode step and the decode time n_gen - 1 of them,
    for Ouro and for mlx-lm alike. (Asked for exactly n_gen, ours would stop queueing
    at the last token and mlx-lm's would not.)"""
    mx.synchronize()
    tic = time.perf_counter()
    loops = []
    next(gen)  # the first token comes from the full-depth prompt
    t_prompt = time.perf_counter() - tic
    tic = time.perf_counter()
    for i, item in enumerate(gen):
        if loops_of:
            loops.append(loops_of(item))
        if i + 2 >= n_gen:
            break
    t_decode = time.perf_counter() - tic
    mx.synchronize()
    return n_prompt / t_prompt, (n_gen - 1) / t_decode, loops


def run_ouro(model: Model, rule: ExitRule, prompt: mx.array, n_gen: int, *, kv_mode="full",
             kv_bits=None, context=0, name="ouro", compile_step=False,
             draft_loops=None, num_draft_tokens=None, pipeline=False) -> Run:
    """``draft_loops``: self-speculative decoding (``ouro_mlx.decoding.speculative``); the
    name gets the share of drafts kept appended. ``pipeline``: pipelined loop decoding
    (``ouro_mlx.decoding.pipeline``) drafting from step ``draft_loops`` - 1 (default 1); the
    name gets the passes of the layers per token appended."""
    cache = model.make_cache(rule.ut_steps, kv_mode, kv_bits)
    a = model.args
    dtype = model.model.norm.weight.dtype  # the activation dtype, quantized or not
    fill_context(cache, context, mx.zeros((1, a.num_key_value_heads, 1, a.head_dim), dtype))
    mx.reset_peak_memory()
    if pipeline:
        from .decoding.pipeline import PipelineStats, pipelined_step

        stats = PipelineStats()
        gen = pipelined_step(prompt, model, rule, cache, draft_loops=draft_loops or 1,
                             max_tokens=n_gen + 1, stats=stats, compile_step=compile_step)
    elif draft_loops:
        from .decoding.speculative import SpecStats, speculative_step

        stats = SpecStats()
        gen = speculative_step(prompt, model, rule, cache, draft_loops=draft_loops,
                               num_draft_tokens=num_draft_tokens, max_tokens=n_gen + 1,
                               stats=stats, compile_step=compile_step)
    else:
        gen = generate_step(prompt, model, rule, cache, max_tokens=n_gen + 1,
                            compile_step=compile_step)
    p, d, loops = timed(gen, prompt.size, n_gen, loops_of=lambda item: item[2])
    if pipeline:
        gen.close()  # (after the timing) its stats are final once it is closed
        if not stats.tokens:  # the run ended before the pipeline's first probe
            name += ", all plain"
        else:
            name += f", {stats.ticks_per_token:.2f} passes/tok"
            if stats.plain_tokens:  # decoded plainly where the pipeline measured slower
                name += f", {stats.plain_tokens} plain"
    elif draft_loops:
        # no drafts at all: speculation never paid, so every token was decoded plainly
        name += f", {stats.acceptance:.0%} kept" if stats.drafted else ", no drafts"
    hist = {k: loops.count(k) for k in sorted(set(loops))}
    avg = sum(loops) / len(loops)
    # drafts and pipelines read the weights once for several tokens: no simple figure
    read = None if pipeline or draft_loops else decode_bytes(
        model, avg, decode_positions(prompt.size, n_gen, context), kv_bits)
    return Run(name, p, d, mx.get_peak_memory() / 1e9, avg, sum(lc.nbytes for lc in cache),
               hist, read)


def _decode_seconds(model: Model, rule: ExitRule, prompt: mx.array, n_gen: int, *, kv_mode,
                    kv_bits, context, replay: tuple[list, list] | None = None):
    """Seconds for the n_gen - 1 decoded tokens, and (tokens, loops) of every token.
    ``replay=(tokens, loops)``: feed those tokens with their depths forced, queued one
    token ahead like fixed depth (no decisions; one read per token, as a generator
    hands tokens out); the trace returned is the replay's own argmax tokens, which a
    backend that is not bitwise repeatable may not agree with the fed ones."""
    cache = model.make_cache(rule.ut_steps, kv_mode, kv_bits)
    a = model.args
    dtype = model.model.norm.weight.dtype
    fill_context(cache, context, mx.zeros((1, a.num_key_value_heads, 1, a.head_dim), dtype))
    if replay is None:
        gen = generate_step(prompt, model, rule, cache, max_tokens=n_gen)
        first = next(gen)
        tokens, loops = [first[0]], [first[2]]
        mx.synchronize()
        tic = time.perf_counter()
        for tok, _, n in gen:
            tokens.append(tok)
            loops.append(n)
        seconds = time.perf_counter() - tic
        return seconds, (tokens, loops)
    tokens, loops = replay
    logits, _ = prefill(model, prompt[None], cache, rule)
    first, _ = sample_with(logits, None, greedy, None)
    got = [first.item()]
    mx.synchronize()
    tic = time.perf_counter()
    pending = None
    # token i + 1's input is recorded token i, never the replay's own argmax: the
    # same work as the adaptive run even where the two disagree
    for y, n in zip(tokens[:-1], loops[1:]):
        logits, _ = decode(model, mx.array([[y]]), cache, ExitRule(rule.ut_steps, at_step=n - 1))
        nxt, _ = sample_with(logits, None, greedy, None)
        mx.async_eval(nxt)
        if pending is not None:
            got.append(pending.item())  # hand out the previous token, as generate_step does
        pending = nxt
    if pending is not None:
        got.append(pending.item())
    seconds = time.perf_counter() - tic
    return seconds, (got, list(loops))


def _median(xs: list[float]) -> float:
    """The middle value (the upper one of an even count): always a measured run."""
    return sorted(xs)[len(xs) // 2]


def adaptive_overhead(model: Model, rule: ExitRule, prompt: mx.array, n_gen: int, *,
                      repeats: int = 3, kv_mode="full", kv_bits=None, context=0) -> dict:
    """Decode time of an adaptive exit rule against the *same* tokens at the *same*
    per-token depths with the depths known in advance (fixed-depth decoding, queued
    ahead): the cost of deciding. Runs alternate; medians of ``repeats`` each.

    Every replay feeds the first adaptive run's tokens at its depths. On a backend
    whose runs are not bitwise repeatable (CUDA, some Metal kernels) later adaptive
    runs may pick other tokens or depths, and a replay's own argmax may differ from
    the tokens it is fed: both are counted (``adaptive_runs_differing``,
    ``replay_tokens_differing``, the most of any replay, of ``tokens``) and said in
    ``note``, never raised."""
    kw = dict(kv_mode=kv_mode, kv_bits=kv_bits, context=context)
    adaptive, fixed, trace, runs_differing, tokens_differing = [], [], None, 0, 0
    for _ in range(repeats):
        seconds, run = _decode_seconds(model, rule, prompt, n_gen, **kw)
        trace = trace or run
        runs_differing += run != trace
        adaptive.append(seconds)
        seconds, (got, _) = _decode_seconds(model, rule, prompt, n_gen, replay=trace, **kw)
        fixed.append(seconds)
        tokens_differing = max(tokens_differing, sum(a != b for a, b in zip(got, trace[0])))
    loops = trace[1][1:]
    out = {"adaptive_s": _median(adaptive), "same_depths_fixed_s": _median(fixed),
           "ratio": round(_median(adaptive) / _median(fixed), 3),
           "avg_loops": sum(loops) / len(loops), "repeats": repeats,
           "tokens": len(trace[0]), "adaptive_runs_differing": runs_differing,
           "replay_tokens_differing": tokens_differing}
    out["note"] = overhead_note(out)
    return out


def overhead_note(o: dict) -> str | None:
    """What ``adaptive_overhead`` found unrepeatable, in words (None: nothing)."""
    said = []
    if o["adaptive_runs_differing"]:
        said.append(f"{o['adaptive_runs_differing']} of {o['repeats']} adaptive runs chose "
                    "other tokens or depths than the first")
    if o["replay_tokens_differing"]:
        said.append(f"replay: {o['replay_tokens_differing']} of {o['tokens']} tokens differ "
                    "from the adaptive run")
    if not said:
        return None
    return ("; ".join(said) + " (backend not bitwise repeatable); timing fed the first "
            "adaptive run's tokens at its depths")


def run_peer(peer: nn.Module, prompt: mx.array, n_gen: int, *, context=0, dtype=mx.bfloat16) -> Run:
    from mlx_lm.generate import generate_step as mlx_lm_generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(peer)
    a = peer.args
    fill_context(cache, context, mx.zeros((1, a.num_key_value_heads, 1, a.head_dim), dtype))
    mx.reset_peak_memory()
    gen = mlx_lm_generate_step(prompt, peer, max_tokens=n_gen + 1, prompt_cache=cache)
    p, d, _ = timed(gen, prompt.size, n_gen)
    return Run("mlx-lm llama, unrolled", p, d, mx.get_peak_memory() / 1e9, None,
               sum(c.nbytes for c in cache),
               bytes_per_token=peer_decode_bytes(peer, decode_positions(prompt.size, n_gen,
                                                                        context)))


def target_ratios(model: Model, peer: nn.Module, prompt: mx.array, n_gen: int, *,
                  repeats: int = 3, context: int = 0, kv_bits=None,
                  compile_step: bool = False) -> tuple[dict, dict]:
    """The ratios the targets are stated in, from interleaved runs (peer, Ouro at
    full depth, Ouro with exit forced at step 1, the order rotating), medians of
    ``repeats`` each: one run of a few tokens varies by 5-15 % on a shared CPU.
    Also returns the first run of each ({"peer", "full", "exit1"}: ``Run``), which
    can stand as the table's single-run rows."""
    T = len(peer.model.layers) // len(model.layers)
    dtype = model.model.norm.weight.dtype
    kw = dict(kv_bits=kv_bits, context=context)
    make = {
        "peer": lambda: run_peer(peer, prompt, n_gen, context=context, dtype=dtype),
        "full": lambda: run_ouro(model, ExitRule(T), prompt, n_gen, name=f"ouro T={T}", **kw),
        "exit1": lambda: run_ouro(model, ExitRule(T, at_step=0), prompt, n_gen,
                                  name="ouro 1 loop", **kw),
    }
    if compile_step:  # full depth through the compiled loop step (ouro_mlx.decoding.compiled)
        make["compiled"] = lambda: run_ouro(model, ExitRule(T), prompt, n_gen, compile_step=True,
                                            name=f"ouro T={T} compiled", **kw)
    names = list(make)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for i in range(repeats):  # rotate the order: no run always follows the same one
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(make[name]())

    def median(name: str, key: str) -> float:
        return _median([getattr(r, key) for r in runs[name]])

    ratios = {
        "prefill vs unrolled peer": round(median("full", "prompt_tps")
                                          / median("peer", "prompt_tps"), 3),
        "decode vs unrolled peer": round(median("full", "decode_tps")
                                         / median("peer", "decode_tps"), 3),
        "1 loop speed-up over full depth": round(median("exit1", "decode_tps")
                                                 / median("full", "decode_tps"), 3),
        **({"compiled decode speed-up over full depth": round(
            median("compiled", "decode_tps") / median("full", "decode_tps"), 3),
            "compiled decode vs unrolled peer": round(
            median("compiled", "decode_tps") / median("peer", "decode_tps"), 3)}
           if compile_step else {}),
        "repeats": repeats,
        "runs_tok_per_s": {name: [[round(r.prompt_tps, 4), round(r.decode_tps, 4)] for r in rs]
                           for name, rs in runs.items()},
    }
    return ratios, {name: rs[0] for name, rs in runs.items()}


def quality_table(model: Model, config: dict, ids: mx.array, bits_list=(8, 4),
                  group_size: int = 64, *, quantized: dict | None = None,
                  q: float = 0.5) -> dict:
    """Per loop step KL, exit-step agreement at ``q`` and average loops of quantized
    models against the bfloat16 model (``model`` is rounded to bfloat16 in place):
    round-to-nearest at each of ``bits_list`` (group ``group_size``), and each of
    ``quantized`` ({name: quantized model}, e.g. from ``ouro-mlx quantize``) next to
    round-to-nearest at its own bits and group size.

    Both run in float32 arithmetic: the reference with bfloat16-rounded weights, the
    quantized model with those weights quantized and dequantized (the same numbers
    a quantized kernel multiplies with). This isolates the weight quantization error
    and avoids MLX's slow CPU kernels for quantized × bfloat16."""
    from mlx_lm.utils import dequantize_model

    from .quantize import quality, quantized_bits

    samples = [(row, [1] * len(row)) for row in ids.tolist()]
    rtn = [(bits, group_size) for bits in bits_list]
    for other in (quantized or {}).values():
        if quantized_bits(other) not in rtn:
            rtn.append(quantized_bits(other))
    model.set_dtype(mx.bfloat16)  # in place, to keep a 1.4B model's copies in memory
    table = {}

    def row(name: str, q_model) -> None:
        q_model.set_dtype(mx.float32)
        q_model = dequantize_model(q_model)
        model.set_dtype(mx.float32)
        table[name] = quality(q_model, model, samples, q)
        model.set_dtype(mx.bfloat16)

    for bits, group in rtn:
        copied = copy.deepcopy(model)
        copied.set_dtype(mx.float32)  # float32 scales: dequantizing adds no rounding
        row(f"{bits}-bit" + ("" if group == group_size else f" g{group}"),
            quantize(copied, config, bits, group))
    for name, other in (quantized or {}).items():
        row(name, other)
    return table


def as_dict(run: Run) -> dict:
    return asdict(run)
