"""Generation with dynamic exit: a decoded token stops looping when its exit rule says
so, and the loop steps it skips are never computed.

- Prompt tokens always run every loop step (the paper shows prefill needs them).
- A decoded token runs loop steps one at a time; after each, the ``ExitRule``
  (Q-exit on the gate's cdf, hidden-state change, fixed step, min/max loops)
  decides on the host whether to go on: one sync per loop step, only when the depth
  depends on the data. A fixed depth needs no sync and decodes asynchronously.
- The skipped steps' KV slots receive copies of the exit step's K/V (kv_mode "full"),
  so later tokens that loop deeper attend to a complete history; in kv_mode "last"
  the exit step's K/V is appended to the one history all steps share.
- In a batch, rows exit at their own depth: a row that stopped keeps its state and
  stores its exit-step K/V in the deeper steps the others still run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, CacheList

from .exit import CdfTracker, ExitRule, exit_steps, gather_steps
from .model import Model, cache_depth, check_cache, commit_kv
from .sampling import Sampler, check_token, sample


@dataclass
class GenerationResponse:
    """One streamed token. The stats fields hold running values; the last response
    (``finish_reason`` set) carries the final ones. ``finish_reason``: "stop" (an
    eos token) or "length"; ``context_full`` says a "length" came from the model's
    positions running out before ``max_tokens``."""

    text: str
    token: int
    loops: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    avg_loops: float
    finish_reason: str | None = None
    context_full: bool = False


@dataclass
class BatchResult:
    texts: list[str]
    tokens: list[list[int]]
    loops: list[list[int]] = field(default_factory=list)


def make_rule(
    model: Model,
    ut_steps: int | None = None,
    exit_threshold: float | None = None,
    exit_at_step: int | None = None,
    min_loops: int = 1,
    max_loops: int | None = None,
    hidden_eps: float | None = None,
) -> ExitRule:
    """The exit rule from generation options, with the model's defaults."""
    return ExitRule(
        ut_steps=model._steps(ut_steps),
        threshold=model.exit_threshold if exit_threshold is None else exit_threshold,
        at_step=model.exit_at_step if exit_at_step is None else exit_at_step,
        hidden_eps=hidden_eps,
        min_loops=min_loops,
        max_loops=max_loops,
    )


def prefill(
    model: Model, ids: mx.array, cache: list, rule: ExitRule, step_size: int = 2048
) -> tuple[mx.array, mx.array]:
    """Run prompt tokens [B, S] at full depth into ``cache``. Returns the last
    position's logits [B, V] at the rule's exit step and that step's depth [B].
    A shared ("last" mode) cache takes the prompt in one piece: within one call each
    step attends to its own step's K/V, exactly as at full depth."""
    if cache_depth(cache) == 1:
        step_size = ids.shape[1]
    while ids.shape[1] > step_size:
        model.model(ids[:, :step_size], cache, rule.ut_steps)
        mx.eval([c.state for c in cache])
        ids = ids[:, step_size:]
        mx.clear_cache()
    # The final step's last layer runs its attention output and MLP on the last
    # position only: nothing reads the other positions' final state.
    out = model.model(ids, cache, rule.ut_steps, last_only=True)
    last = [h[:, -1:] for h in out.hidden]
    k = exit_steps(rule, last, [g[:, -1:] for g in out.gate_logits])
    return model.lm_head(gather_steps(last, k)[:, -1]), k[:, -1] + 1


def decode(model: Model, y: mx.array, cache: list, rule: ExitRule) -> tuple[mx.array, mx.array]:
    """One new token per row ([B, 1]) through the loop, stopping per the rule.
    Returns logits [B, V] and the loop steps each row ran [B]."""
    inner = model.model
    x = inner.embed_tokens(y)
    B = y.shape[0]
    mask = create_attention_mask(x, cache[0][0] if cache else None)  # padding
    if (n := rule.fixed_loops) is not None:
        for t in range(n):
            x, _, kvs = inner.loop_step(x, t, cache, mask, gate=False)
        if cache is not None:
            commit_kv(cache, kvs, n)
        return model.lm_head(x[:, -1]), mx.full((B,), n, dtype=mx.int32)

    tracker = CdfTracker()
    active = mx.ones((B,), dtype=mx.bool_)
    loops = mx.zeros((B,), dtype=mx.int32)
    h_exit = kv_exit = prev = None
    for t in range(rule.ceiling):
        frozen = None if t == 0 or B == 1 else (active, kv_exit)
        h, gate, kvs = inner.loop_step(x, t, cache, mask, frozen)
        stop = rule.stops(t, tracker.update(gate), h, prev)[:, -1] & active
        if B == 1:
            h_exit, kv_exit = h, kvs
        else:  # rows still active take this step's state and K/V
            a3, a4 = active[:, None, None], active[:, None, None, None]
            h_exit = h if h_exit is None else mx.where(a3, h, h_exit)
            kv_exit = kvs if kv_exit is None else [
                (mx.where(a4, k, fk), mx.where(a4, v, fv))
                for (k, v), (fk, fv) in zip(kvs, kv_exit)
            ]
        loops = mx.where(active, t + 1, loops)
        active = active & ~stop
        if t + 1 >= rule.ceiling:  # forced stop: no need to look
            break
        if t + 1 >= rule.min_loops and not active.any().item():  # the host sync
            break
        x = prev = h
    if cache is not None:
        commit_kv(cache, kv_exit, t + 1)
    return model.lm_head(h_exit[:, -1]), loops


def _sample(
    logits: mx.array, tokens: mx.array | None, sampler: Sampler, processors: list | None
) -> tuple[mx.array, mx.array]:
    for p in processors or []:
        logits = p(tokens, logits)
    return sample(logits, sampler)


def generate_step(
    prompt: mx.array,
    model: Model,
    rule: ExitRule,
    cache: list,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    prefill_step_size: int = 2048,
    compile_step: bool = False,
) -> Iterator[tuple[int, mx.array, int]]:
    """Yield ``(token, logprobs, loops)`` for one prompt (1-D ids). ``compile_step``:
    decode through one compiled graph per token (``ouro_mlx.compiled``; fixed depth,
    kv_mode "full", unquantized K/V), same tokens as the plain path."""
    if compile_step:
        from .compiled import check_compilable

        check_compilable(cache, rule.fixed_loops)
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    tokens = prompt if logits_processors else None

    def step(logits):
        nonlocal tokens
        y, lp = _sample(logits, tokens, sampler, logits_processors)
        if logits_processors:
            tokens = mx.concatenate([tokens, y])
        return y, lp

    logits, loops = prefill(model, prompt[None], cache, rule, prefill_step_size)
    y, logprobs = step(logits)
    if compile_step:
        from .compiled import compiled_steps

        yield from compiled_steps(model, cache, rule.fixed_loops, y, logprobs, step, max_tokens)
        return
    if rule.fixed_loops is None:  # the depth depends on the data: sync per step
        for n in range(max_tokens):
            yield y.item(), logprobs[0], loops.item()
            if n + 1 == max_tokens:
                break
            logits, loops = decode(model, y[:, None], cache, rule)
            y, logprobs = step(logits)
        return
    # Fixed depth: queue token n+1 before handing out token n (as mlx-lm does).
    # Everything handed out is queued with it: reading an array that was not (e.g.
    # ``loops.item()``) would wait for the token queued behind it.
    mx.async_eval(y, logprobs, loops)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            logits, next_loops = decode(model, y[:, None], cache, rule)
            next_y, next_logprobs = step(logits)
            mx.async_eval(next_y, next_logprobs, next_loops)
        yield y.item(), logprobs[0], loops.item()
        if n + 1 < max_tokens:
            y, logprobs, loops = next_y, next_logprobs, next_loops
        if n % 256 == 255:
            mx.clear_cache()


def encode(tokenizer, prompt: str | list[int] | mx.array) -> mx.array:
    if isinstance(prompt, str):  # plain text: "<|im_end|>" in it is not the special token
        from .encoding import encode_text

        prompt = encode_text(tokenizer, prompt)
    ids = prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), dtype=mx.int32)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("The prompt is empty." if ids.size == 0 else
                         "The prompt must be text or a 1-D list of token ids.")
    return ids


def stream_generate(
    model: Model,
    tokenizer,
    prompt: str | list[int] | mx.array,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    ut_steps: int | None = None,
    exit_threshold: float | None = None,
    exit_at_step: int | None = None,
    min_loops: int = 1,
    max_loops: int | None = None,
    hidden_eps: float | None = None,
    kv_mode: str = "full",
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    draft_loops: int | None = None,
    num_draft_tokens: int | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 2048,
    compile_step: bool = False,
    pipeline: bool = False,
) -> Iterator[GenerationResponse]:
    """Stream a completion of ``prompt`` (text or token ids), one response per token.

    Loop options: ``ut_steps``, ``exit_threshold`` (Q-exit), ``exit_at_step`` (0-based:
    0 runs one loop), ``min_loops``/``max_loops``, ``hidden_eps`` (stop when the
    relative change of the hidden state falls below it). ``kv_mode`` "full" or
    "last", ``kv_bits`` 4/8 quantize the cache; both apply to a new cache only:
    a ``prompt_cache`` (from ``make_prompt_cache``) keeps its own layout and is
    extended in place, so a conversation never recomputes earlier turns.
    ``compile_step``: decode each token through one ``mx.compile``d graph (fixed
    depth, kv_mode "full", no kv_bits; see ``ouro_mlx.compiled``).
    ``draft_loops`` k: self-speculative decoding, drafting up to ``num_draft_tokens``
    (default 4, adapted to the acceptance) with the first k loop steps and verifying
    them at the full fixed depth in one call; greedy output is unchanged (see
    ``ouro_mlx.speculative``). ``pipeline``: instead, one pass of the layers runs
    each loop step on a different token, the next token entering on a draft read
    from step ``draft_loops`` - 1 (default 1) on; greedy output is unchanged (see
    ``ouro_mlx.pipeline``)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    rule = make_rule(model, ut_steps, exit_threshold, exit_at_step, min_loops,
                     max_loops, hidden_eps)
    ids = encode(tokenizer, prompt)
    cache = prompt_cache
    if cache is None:
        cache = model.make_cache(rule.ut_steps, kv_mode, kv_bits, kv_group_size)
    check_cache(cache, rule.ut_steps)
    past = cache[0][0].offset
    limit = model.args.max_position_embeddings
    if past + ids.size >= limit:
        raise ValueError(
            f"The prompt ({ids.size} tokens{f' after {past} cached' if past else ''}) "
            f"leaves no room in the model's {limit} positions."
        )
    context_full = limit - past - ids.size < max_tokens
    max_tokens = min(max_tokens, limit - past - ids.size)

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(tokenizer.eos_token_ids)
    tic = time.perf_counter()
    prompt_tps = 0.0
    total_loops = 0
    if pipeline:  # see ouro_mlx.pipeline
        from .pipeline import pipelined_step

        if num_draft_tokens is not None:
            raise ValueError("num_draft_tokens does not apply to pipeline (the pipeline "
                             "holds one token per loop step).")
        steps = pipelined_step(ids, model, rule, cache, draft_loops=draft_loops or 1,
                               max_tokens=max_tokens, sampler=sampler,
                               logits_processors=logits_processors,
                               prefill_step_size=prefill_step_size, compile_step=compile_step)
    elif draft_loops is not None:  # self-speculative: see ouro_mlx.speculative
        from .speculative import speculative_step

        steps = speculative_step(ids, model, rule, cache, draft_loops=draft_loops,
                                 num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
                                 sampler=sampler, logits_processors=logits_processors,
                                 prefill_step_size=prefill_step_size,
                                 compile_step=compile_step)
    else:
        steps = generate_step(ids, model, rule, cache, max_tokens=max_tokens, sampler=sampler,
                              logits_processors=logits_processors,
                              prefill_step_size=prefill_step_size, compile_step=compile_step)
    for n, (token, logprobs, loops) in enumerate(steps):
        check_token(token, n)  # NaN/inf logits: an error, not a plausible answer
        if n == 0:
            prompt_time = time.perf_counter() - tic
            prompt_tps = ids.size / prompt_time
            tic = time.perf_counter()
        finish = "stop" if token in eos else ("length" if n + 1 == max_tokens else None)
        if token not in eos:
            detokenizer.add_token(token)
        total_loops += loops
        if finish:
            detokenizer.finalize()
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            loops=loops,
            logprobs=logprobs,
            prompt_tokens=ids.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / elapsed if elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            avg_loops=total_loops / (n + 1),
            finish_reason=finish,
            context_full=finish == "length" and context_full,
        )
        if finish:
            break


def generate(model: Model, tokenizer, prompt: str | list[int] | mx.array, **opts: Any) -> str:
    """The completion of ``prompt`` as text; options as for :func:`stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **opts))


def batch_generate(
    model: Model,
    tokenizer,
    prompts: list[str | list[int]],
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    ut_steps: int | None = None,
    exit_threshold: float | None = None,
    exit_at_step: int | None = None,
    min_loops: int = 1,
    max_loops: int | None = None,
    hidden_eps: float | None = None,
    kv_mode: str = "full",
    prefill_step_size: int = 2048,
) -> BatchResult:
    """Generate for several prompts at once (left-padded). Each row gives the tokens
    it would give alone, exits at its own depth, and ends at its own eos.
    ``kv_mode``: "full" (a cache per loop step) or "last" (one shared cache)."""
    rule = make_rule(model, ut_steps, exit_threshold, exit_at_step, min_loops,
                     max_loops, hidden_eps)
    if not prompts:
        raise ValueError("No prompts given.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    rows = [encode(tokenizer, p).tolist() for p in prompts]
    width = max(map(len, rows))
    if width + max_tokens > model.args.max_position_embeddings:
        raise ValueError("The longest prompt plus max_tokens exceeds the model's positions.")
    pads = [width - len(r) for r in rows]
    ids = mx.array([[0] * p + r for p, r in zip(pads, rows)], dtype=mx.int32)
    if kv_mode not in ("full", "last"):
        raise ValueError(f"Unknown kv_mode {kv_mode!r}; choose one of full, last.")
    depth = rule.ut_steps if kv_mode == "full" else 1
    cache = [CacheList(*(BatchKVCache(pads) for _ in range(depth))) for _ in model.layers]
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    eos = set(tokenizer.eos_token_ids)

    logits, loops = prefill(model, ids, cache, rule, prefill_step_size)
    out_tokens: list[list[int]] = [[] for _ in rows]
    out_loops: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for n in range(max_tokens):
        y, _ = _sample(logits, None, sampler, None)
        for i, (tok, lp) in enumerate(zip(y.tolist(), loops.tolist())):
            if not done[i]:
                check_token(tok, n)
                done[i] = tok in eos
                if not done[i]:
                    out_tokens[i].append(tok)
                    out_loops[i].append(lp)
        if all(done) or n + 1 == max_tokens:
            break
        logits, loops = decode(model, y[:, None], cache, rule)
    texts = [tokenizer.decode(t) for t in out_tokens]
    return BatchResult(texts, out_tokens, out_loops)
