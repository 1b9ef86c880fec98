"""Plain decoding: one token at a time, every loop step it runs in its own graph.

A fixed depth queues token n+1 before handing out token n (as mlx-lm does), reading one
value per token; an adaptive exit reads its decisions as ``ouro_mlx.decoding.host``
paces them. ``plain_decode`` is the same queue-ahead loop for the other strategies'
plain stretches; ``Meter`` times them.
"""

from __future__ import annotations

from typing import Callable, Iterator

import mlx.core as mx

from ..exit import ExitRule
from ..model import Model
from ..sampling import Sampler, sample
from . import host
from .compiled import compiled_step
from .steps import decode, decode_row, prefill, sampling_step

HALF_LIFE = 64  # tokens: the speed meters forget older work at this rate


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
    decode through one compiled graph per token (``ouro_mlx.decoding.compiled``;
    fixed depth, kv_mode "full", unquantized K/V), same tokens as the plain path."""
    opts = dict(max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                prefill_step_size=prefill_step_size)
    if compile_step:
        yield from compiled_step(prompt, model, rule, cache, **opts)
        return
    step = sampling_step(prompt, sampler, logits_processors)
    logits, loops = prefill(model, prompt[None], cache, rule, prefill_step_size)
    y, logprobs = step(logits)
    if (depth := rule.fixed_loops) is None:  # the depth depends on the data
        lookahead = host.lookahead()
        loops = host.read(loops[0])
        for n in range(max_tokens):
            if n + 1 == max_tokens:
                yield host.read(y[0]), logprobs[0], loops
                break
            # token n is read while token n+1's first step runs
            logits, next_loops, token = decode_row(model, y[:, None], cache, rule, lookahead)
            yield token, logprobs[0], loops
            (y, logprobs), loops = step(logits), next_loops
        return
    # Fixed depth: queue token n+1 before handing out token n (as mlx-lm does).
    # Everything handed out is queued with it: reading an array that was not
    # would wait for the token queued behind it.
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(decode(model, y[:, None], cache, rule)[0])
            mx.async_eval(next_y, next_logprobs)
        yield host.read(y[0]), logprobs[0], depth
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs
        if n % 256 == 255:
            mx.clear_cache()


def plain_decode(
    decode_one: Callable[[mx.array], tuple[mx.array, mx.array]], y: mx.array,
    sampler: Sampler, more: Callable[[], bool], first: mx.array | None = None
) -> Iterator[tuple[int, mx.array, mx.array, int | None]]:
    """Tokens after the pending ``y`` [1] as ``generate_step`` decodes
    them: each queued before the previous one is handed out, for as long as
    ``more()`` says so when a token is about to be handed out (the pipeline runs
    on across decisions); ``decode_one(y)`` gives the logits [1, V] of token ``y``
    and its shadow draft [1] (or None). Yields ``(token, y, logprobs, draft)``: the
    token on the host and as ``y`` [1], and ``draft``, what steps 0..k-1 proposed for
    it, read with the token in one sync; the last token handed out is the new
    pending one. ``first``: the logprobs of ``y`` when ``y`` itself is still to
    be handed out (the prompt's token: its successor is queued first; its draft is
    None)."""

    def step(y):
        logits, draft = decode_one(y)
        y, lp = sample(logits, sampler)
        mx.async_eval(y, lp, draft)
        return y, lp, draft

    cur = (y, first, None) if first is not None else step(y)
    while True:
        go_on = more()
        nxt = step(cur[0]) if go_on else None  # queued before cur is handed out
        y, lp, draft = cur
        if draft is None:
            yield host.read(y[0]), y, lp, None
        else:
            token, draft = host.read(mx.concatenate([y, draft.astype(y.dtype)]))
            yield token, y, lp, draft
        if not go_on:
            return
        cur = nxt


class Meter:
    """Wall seconds per handed-out token of one way of decoding, over recent work
    (older work's weight halves every ``HALF_LIFE`` tokens)."""

    def __init__(self):
        self.seconds = self.tokens = 0.0

    def add(self, seconds: float, tokens: int) -> None:
        keep = 0.5 ** (tokens / HALF_LIFE)
        self.seconds = keep * self.seconds + seconds
        self.tokens = keep * self.tokens + tokens

    def per_token(self) -> float | None:
        return self.seconds / self.tokens if self.tokens else None
