"""Generation for users: ``stream_generate`` (one response per token, with text, depth
and speed), ``generate`` (the text) and ``batch_generate`` (several prompts at once,
each row at its own depth).

How tokens are decoded lives in ``ouro_mlx.decoding``: the primitives (prefill, one
token's loop steps, dynamic exit), and the strategies on top (plain, compiled,
self-speculative, pipelined) that ``stream_generate`` picks from its options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import mlx.core as mx
from .decoding import token_stream
from .decoding.batch import Batcher, Sequence
from .decoding.steps import make_rule
from .exit import ExitRule
from .model import Model, check_cache
from .sampling import Sampler, check_token


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
    depth, kv_mode "full", no kv_bits; see ``ouro_mlx.decoding.compiled``).
    ``draft_loops`` k: self-speculative decoding, drafting up to ``num_draft_tokens``
    (default 4, adapted to the acceptance) with the first k loop steps and verifying
    them at the full fixed depth in one call; greedy output is unchanged (see
    ``ouro_mlx.decoding.speculative``). ``pipeline``: instead, one pass of the layers runs
    each loop step on a different token, the next token entering on a draft read
    from step ``draft_loops`` - 1 (default 1) on; greedy output is unchanged (see
    ``ouro_mlx.decoding.pipeline``)."""
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
    steps = token_stream(ids, model, rule, cache, max_tokens=max_tokens, sampler=sampler,
                         logits_processors=logits_processors,
                         prefill_step_size=prefill_step_size, compile_step=compile_step,
                         pipeline=pipeline, draft_loops=draft_loops,
                         num_draft_tokens=num_draft_tokens)
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
    rules: list[ExitRule] | None = None,
) -> BatchResult:
    """Generate for several prompts at once with the continuous-batching engine
    (``ouro_mlx.decoding.batch``). Each row gives the tokens it would give alone,
    exits at its own depth, and ends at its own eos. ``kv_mode``: "full" (a cache
    per loop step) or "last" (one shared cache). ``rules``: one ``ExitRule`` per
    prompt instead of the loop options (rows at different depths in one batch)."""
    if not prompts:
        raise ValueError("No prompts given.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    if kv_mode not in ("full", "last"):
        raise ValueError(f"Unknown kv_mode {kv_mode!r}; choose one of full, last.")
    if rules is None:
        rules = [make_rule(model, ut_steps, exit_threshold, exit_at_step, min_loops,
                           max_loops, hidden_eps)] * len(prompts)
    elif len(rules) != len(prompts):
        raise ValueError(f"rules: {len(rules)} rules for {len(prompts)} prompts.")
    rows = [encode(tokenizer, p).tolist() for p in prompts]
    limit = model.args.max_position_embeddings
    if max(map(len, rows)) + max_tokens > limit:
        raise ValueError("The longest prompt plus max_tokens exceeds the model's positions.")
    eos = frozenset(tokenizer.eos_token_ids)
    batcher = Batcher(prefill_step_size=prefill_step_size)
    seqs = [Sequence(r, model, rule, max_tokens, eos, kv_mode, sampler)
            for r, rule in zip(rows, rules)]
    for s in seqs:
        batcher.add(s)
    while not batcher.idle:
        batcher.step()
    for s in seqs:
        if s.error is not None:
            raise s.error
    out_tokens, out_loops = [], []
    for s in seqs:
        n = len(s.tokens) - (s.finish == "stop")
        out_tokens.append(s.tokens[:n])
        out_loops.append(s.loops[:n])
    texts = [tokenizer.decode(t) for t in out_tokens]
    return BatchResult(texts, out_tokens, out_loops)
