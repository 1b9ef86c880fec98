"""Pipelined loop decoding: every loop step busy with a different token, in one pass.

A looped model applies the same layers at every loop step, so one pass of the stack
can run token p at step 3, token p+1 at step 2, p+2 at step 1 and p+3 at step 0 —
as a batch of rows, each attending to its own step's KV cache. A "tick" is one such
pass: every row advances one step. Token p+1 enters the pipeline before token p has
finished, with a draft: what token p's state after its latest step reads through
``lm_head`` (from step ``draft_loops`` - 1 on). The draft is checked after every
later step of p, and against p's final token:

- while p's readouts agree with the draft, p+1 (and the rows it started) go on;
- when they disagree, p+1 and every younger row are dropped and p+1 restarts at step
  0 with the new readout; the final step's token is always the one kept.

Every token that is handed out ran all its loop steps on the right input, over K/V
that the right tokens wrote: greedy output is the plain decoding's, token for token.
With a sampler, the final step's token is drawn from the target's distribution (fresh
randomness every tick), so the output distribution is the target's.

Plain decoding spends ``loops`` passes per token. Here a token whose draft held from
step s on costs s + 1 ticks; a tick costs about one pass where running a few rows
costs as much as one: small models (kernel launches and graph building dominate) and
decode on Metal (memory bandwidth dominates). Where each row costs its own compute —
a large model on the CPU — a tick costs up to ``loops`` passes and this is slower.

The K/V live in one buffer per layer with the loop step as the batch axis
([loops, kv_heads, capacity, head_dim]); a tick writes row s's K/V at its position
(invalid rows write to the last, never-attended slot) and attends over the live part
of the buffers (rounded up, see ``PipelinedDecoder._span``) with a per-row causal mask. Positions past a row are masked, so what a dropped row
wrote is never read before the row that replaces it rewrites it. The pipeline's
state (positions, validity, input tokens, states) stays on the device, so ticks are
queued without waiting: the host reads each tick's "token finished" flag one tick
behind. ``compile_step``: each tick is one ``mx.compile``d graph.

Adaptive (the default): where a pass of a few rows costs more than the passes it
saves, the pipeline is slower than plain decoding; so decoding starts plainly, tries
the pipeline for PROBE_TOKENS tokens, and keeps whichever measured faster (checked
every PROBE_TOKENS tokens; a losing pipeline is retried after 32 plain tokens, then
64, ... 512). The verdict is kept with the model, so a chat's next answer starts
where the last one left off. The tokens are the same either way.

Needs what speculation needs (a fixed depth, kv_mode "full", no logits processors),
a plain KVCache (no kv_bits), batch 1 and no per-loop adapters.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..exit import ExitRule
from ..model import Model, add_norm, add_norm_norm, cache_depth
from ..sampling import Sampler, flag_nonfinite
from ..sampling import sample as sample_checked
from . import host
from .compiled import CompiledDecoder, _Graphs, _graph
from .plain import Meter, plain_decode
from .speculative import BACKOFF_TOKENS, MAX_BACKOFF, check_speculative
from .steps import decode, greedy, prefill

_NONE = 1 << 30  # "no position" in the pipeline's min/max reductions
CHUNK = 256  # the K/V buffers grow by this many positions
SPAN = 32  # attention reads the buffers up to a multiple of this past the live rows
PROBE_TOKENS = 16  # adaptive: tokens per speed measurement
clock = time.perf_counter  # the speed check's clock (a test replaces it)


@dataclass
class PipelineStats:
    """``ticks`` passes run for the ``tokens`` the pipeline decoded (plain decoding
    runs ``loops`` passes per token); ``plain_tokens`` decoded plainly where the
    pipeline measured slower (the prompt's first token counts in neither)."""

    ticks: int = 0
    tokens: int = 0
    plain_tokens: int = 0

    @property
    def ticks_per_token(self) -> float:
        return self.ticks / self.tokens if self.tokens else 0.0


def check_pipeline(model: Model, rule: ExitRule, cache: list, draft_loops: int,
                   logits_processors: list | None = None) -> int:
    """The depth (loop steps per token) if pipelining applies, else a one-line
    ValueError."""
    depth, _ = check_speculative(model, rule, cache, draft_loops, None, logits_processors,
                                 option="pipeline")
    if any(type(c) is not KVCache for lc in cache for c in lc.caches):
        raise ValueError("pipeline needs a plain KVCache (no kv_bits).")
    if any(layer.self_attn.loop_keys or layer.mlp.loop_keys for layer in model.layers):
        raise ValueError("pipeline does not support per-loop adapters: its rows run "
                         "different loop steps in one pass.")
    return depth


def _tick_layer(layer, x, buf, pos, wpos, mask, span):
    """``DecoderLayer`` on rows ``x`` [R, 1, H], row r at position ``pos[r]``, with
    its K/V written into row r of ``buf`` at ``wpos[r]``."""
    attn = layer.self_attn
    R = x.shape[0]
    h = layer.input_layernorm(x)
    q, k, v = attn.qkv(h)
    q = q.reshape(R, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = k.reshape(R, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = v.reshape(R, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = attn.rope(q, offset=pos), attn.rope(k, offset=pos)
    at = mx.broadcast_to(wpos[:, None, None, None], k.shape)
    keys = mx.put_along_axis(buf[0], at, k, axis=2)
    values = mx.put_along_axis(buf[1], at, v, axis=2)
    o = mx.fast.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span],
                                             scale=attn.scale, mask=mask)
    h = attn.o_proj(o.transpose(0, 2, 1, 3).reshape(R, 1, -1))
    x, h = add_norm_norm(x, h, layer.input_layernorm_2.weight,
                         layer.post_attention_layernorm.weight, layer.eps)
    x = add_norm(x, layer.mlp(h), layer.post_attention_layernorm_2.weight, layer.eps)
    return x, (keys, values)


def _tick_graph(model: Model, loops: int, k: int, sampler: Sampler | None):
    inner = model.model
    last = loops - 1

    def tick(x, pos, valid, tok, buffers, span):
        """One pass: row s (its input state ``x[s]``, at ``pos[s]``, ``valid[s]``,
        input token ``tok[s]``) runs loop step s. Returns the next tick's rows, the
        finished row's flag, token and logprobs, and the buffers."""
        steps = mx.arange(loops)
        cap = buffers[0][0].shape[2]
        wpos = mx.where(valid, pos, cap - 1)
        mask = (mx.arange(span)[None, :] <= pos[:, None])[:, None, None, :]
        out = []
        for layer, buf in zip(inner.layers, buffers):
            x, buf = _tick_layer(layer, x, buf, pos, wpos, mask, span)
            out.append(buf)
        x = inner.norm(x)
        logits = model.lm_head(x[:, 0])
        lse = mx.logsumexp(logits[last])
        logprobs = logits[last] - lse
        read = mx.argmax(logits, axis=-1).astype(mx.int32)  # each row's draft
        if sampler is not None:  # the finished row's token is the target's draw
            final = sampler(logprobs[None]).reshape(()).astype(mx.int32)
            read = mx.where(steps == last, final, read)
        # a row's successor: the valid row one position later (it lags >= 1 step)
        succ = valid[:, None] & valid[None, :] & (pos[None, :] == pos[:, None] + 1)
        wrong = (valid & succ.any(axis=1) & ((succ * tok[None, :]).sum(axis=1) != read)
                 & (steps >= k - 1))
        first = mx.where(wrong, pos, _NONE)
        oldest = first.min()
        restart = oldest < _NONE  # the oldest wrong successor and all after it go
        valid = valid & ~(restart & (pos > oldest))
        youngest = mx.argmax(mx.where(valid, pos, -1))
        src = mx.where(restart, mx.argmin(first), youngest)
        enter = restart | (youngest >= k - 1)  # the new row's source read at step >= k-1
        new_tok = read[src]
        x = mx.concatenate([inner.embed_tokens(new_tok[None])[None], x[:-1]])
        pos = mx.concatenate([(pos[src] + 1)[None], pos[:-1]])
        finished, token = valid[last], flag_nonfinite(read[last], lse)
        valid = mx.concatenate([enter[None], valid[:-1]])
        tok = mx.concatenate([new_tok[None], tok[:-1]])
        return x, pos, valid, tok, finished, token, logprobs, out

    return tick


class PipelinedDecoder:
    """The pipeline over a prefilled ``cache`` (kv_mode "full"), starting from the
    pending token ``y`` [1]: :meth:`tick` queues one pass, :meth:`sync` writes the K/V
    of the first ``n`` handed-out tokens back into ``cache``."""

    def __init__(self, model: Model, cache: list, loops: int, draft_loops: int,
                 y: mx.array, sampler: Sampler | None = None, compile_step: bool = False,
                 chunk: int | None = None):
        self.model, self.cache, self.loops = model, cache, loops
        self.chunk = chunk or CHUNK
        self.start = cache[0][0].offset
        cap = self._capacity(self.start + loops + 2)
        self.buffers = [tuple(self._grow(mx.concatenate(
            [getattr(lc[t], name)[:, :, :self.start] for t in range(loops)]), cap)
            for name in ("keys", "values")) for lc in cache]
        tick = _tick_graph(model, loops, draft_loops, sampler)
        self.compiled = compile_step
        if not compile_step:
            self._tick = tick
        elif sampler is None:  # kept with the model: later generations replay it
            self._tick = _graph(model, ("pipeline", loops, draft_loops), lambda: tick)
        else:  # a sampler belongs to one generation, and draws random numbers
            self._tick = mx.compile(tick, inputs=[model.state, mx.random.state],
                                    outputs=[mx.random.state])
        H = model.args.hidden_size
        x0 = model.model.embed_tokens(y[None])
        self.x = mx.concatenate([x0, mx.zeros((loops - 1, 1, H), dtype=x0.dtype)])
        self.pos = mx.array([self.start] + [0] * (loops - 1), dtype=mx.int32)
        self.valid = mx.array([True] + [False] * (loops - 1))
        self.tok = mx.concatenate([y.astype(mx.int32), mx.zeros((loops - 1,), mx.int32)])
        self.ticks = 0

    def _capacity(self, n: int) -> int:
        return -(-n // self.chunk) * self.chunk

    @staticmethod
    def _grow(a: mx.array, cap: int) -> mx.array:
        pad = mx.zeros((*a.shape[:2], cap - a.shape[2], a.shape[3]), dtype=a.dtype)
        return mx.concatenate([a, pad], axis=2)

    def _span(self, need: int, cap: int) -> int:
        """Positions attention reads: ``need`` rounded up to a multiple of SPAN, or
        for a compiled tick (traced once per span) to SPAN times a power of two."""
        n = -(-need // SPAN)
        if self.compiled:
            n = 1 << (n - 1).bit_length()
        return min(cap, n * SPAN)

    def tick(self, finished: int, unread: int) -> tuple[mx.array, mx.array, mx.array]:
        """Queue one pass. ``finished``: decoded tokens seen leaving the pipeline,
        ``unread``: queued passes not looked at yet (a bound on the positions).
        Returns, lazily, whether a token finished, which, and its logprobs [V]."""
        # The oldest row is at start + (tokens finished); at most `loops` consecutive
        # rows follow it, then the new one; the last slot is the scratch slot.
        need = self.start + finished + unread + 1 + self.loops + 2
        cap = self.buffers[0][0].shape[2]
        if need > cap:
            cap = self._capacity(need)
            self.buffers = [tuple(self._grow(a, cap) for a in kv) for kv in self.buffers]
        (self.x, self.pos, self.valid, self.tok, finished_, token, logprobs,
         self.buffers) = self._tick(self.x, self.pos, self.valid, self.tok, self.buffers,
                                    self._span(need, cap))
        self.ticks += 1
        mx.async_eval(self.x, self.pos, self.valid, self.tok, finished_, token, logprobs,
                      self.buffers)
        return finished_, token, logprobs

    def sync(self, n: int) -> None:
        """Hand the K/V of the prompt and the first ``n`` - 1 decoded tokens (those
        whose successor was handed out) back to the ``KVCache`` list; the steps past
        ``loops`` get copies of the last step's K/V for them, as plain decoding gives
        them. After a "length" finish that is what plain decoding leaves; closed
        early (an eos), plain decoding has also cached token ``n``, which here may
        still be in flight: a next turn feeds it again."""
        end = self.start + n - 1
        for (keys, values), lc in zip(self.buffers, self.cache):
            for t, c in enumerate(lc.caches):
                if t < self.loops:
                    c.state = (keys[t:t + 1], values[t:t + 1], end)
                else:
                    c.state = tuple(mx.concatenate([old[:, :, :self.start],
                                                    new[-1:, :, self.start:end]], axis=2)
                                    for old, new in ((c.keys, keys), (c.values, values))
                                    ) + (end,)


def _pipe_tokens(dec: PipelinedDecoder, stats: PipelineStats, head: tuple | None = None,
                 limit: int | None = None) -> Iterator[tuple[int, mx.array]]:
    """Tokens out of the pipeline, for as long as they are asked for (at most
    ``limit`` after the head: no ticks are queued past what that many tokens could
    need); on close, the K/V of the tokens handed out go back into the cache and the
    last one is left pending. ``head``: (the pending token [1], its logprobs), still
    to be handed out first.

    Ticks are read in groups of ``loops``, each group queued before the one before
    it is read, in one sync: the oldest row in the pipeline is never dropped and
    advances one step a tick, so every ``loops`` ticks finish at least one token and
    the host reads at most once per token."""
    group = dec.loops
    handed, seen, queued = 1, 0, deque()  # the pending token counts as one
    cleared = 0

    def queue_group():
        for _ in range(group):
            if limit is not None and len(queued) >= limit - (handed - 1):
                return  # each tick finishes at most one token: these may be enough
            queued.append(dec.tick(handed - 1, len(queued)))

    try:
        queue_group()
        if head is not None:
            yield host.read(head[0][0]), head[1]
        while True:
            queue_group()
            if not queued:
                return
            ticks = [queued.popleft() for _ in range(min(group, len(queued)))]
            out = host.read(mx.stack([mx.stack([f.astype(mx.int32), t]) for f, t, _ in ticks]))
            for (finished, token), (_, _, lp) in zip(out, ticks):
                seen += 1
                if finished:
                    handed += 1
                    yield token, lp
            if dec.ticks - cleared >= 1024:
                mx.clear_cache()
                cleared = dec.ticks
    finally:
        stats.ticks += seen
        stats.tokens += handed - 1
        dec.sync(handed)


def _plain_tokens(decode_one: Callable[[mx.array], mx.array], y: mx.array,
                  sampler: Sampler, n: int, head: tuple | None = None
                  ) -> Iterator[tuple[int, mx.array]]:
    """``n`` tokens after the pending ``y`` [1], decoded plainly (``plain_decode``:
    each queued before the one before it is handed out); the last one handed out is
    left pending. ``head``: (``y``, its logprobs), still to be handed out first."""
    left = n + (head is not None)

    def more() -> bool:
        nonlocal left
        left -= 1
        return left > 0

    first = None if head is None else head[1][None]
    for token, _, lp, _ in plain_decode(lambda y: (decode_one(y), None), y, sampler, more,
                                        first):
        yield token, lp[0]


class _Switch:
    """Adaptive pipelining: decode PROBE_TOKENS plainly, then through the pipeline,
    and compare their measured seconds per token; the pipeline goes on (checked
    every PROBE_TOKENS tokens) while it is not slower, else plain decoding takes
    over for BACKOFF_TOKENS, doubling while the pipeline keeps losing. What was
    measured is kept with the model (per depth, draft loops and compile_step), so
    the next generation starts where this one left off instead of probing anew."""

    def __init__(self, adaptive: bool, memory: dict | None = None):
        self.adaptive, self.memory = adaptive, memory
        self.plain, self.pipe = Meter(), Meter()
        self.backoff, self.resume_at = BACKOFF_TOKENS, PROBE_TOKENS if adaptive else 0
        if adaptive and memory:  # the last generation's verdict
            self.plain, self.pipe = memory["plain"], memory["pipe"]
            self.backoff, self.resume_at = memory["backoff"], memory["resume_in"]

    def pipelined(self, emitted: int) -> bool:
        return emitted >= self.resume_at

    def segment(self, emitted: int) -> int:
        """Plain tokens to decode before trying the pipeline again."""
        return self.resume_at - emitted

    def done(self, piped: bool, seconds: float, tokens: int, emitted: int) -> None:
        if not self.adaptive or not tokens:
            return
        (self.pipe if piped else self.plain).add(seconds, tokens)
        plain, pipe = self.plain.per_token(), self.pipe.per_token()
        if piped and plain is not None and pipe > plain:
            self.resume_at = emitted + self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)
            self.pipe = Meter()
        elif piped:
            self.backoff = BACKOFF_TOKENS
        if self.memory is not None:
            self.memory.update(plain=self.plain, pipe=self.pipe, backoff=self.backoff,
                               resume_in=max(0, self.resume_at - emitted))


def _memory(model: Model, key: tuple) -> dict:
    """The adaptive pipeline's measurements for ``key``, kept with the model (not
    as a parameter; a copy of the model starts without them)."""
    kept = model.__dict__.get("_ouro_pipeline")
    if kept is None:
        kept = _Graphs()
        object.__setattr__(model, "_ouro_pipeline", kept)
    return kept.setdefault(key, {})


def pipelined_step(
    prompt: mx.array,
    model: Model,
    rule: ExitRule,
    cache: list,
    *,
    draft_loops: int = 1,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    prefill_step_size: int = 2048,
    compile_step: bool = False,
    adaptive: bool = True,
    stats: PipelineStats | None = None,
) -> Iterator[tuple[int, mx.array, int]]:
    """Yield ``(token, logprobs, loops)`` like ``generation.generate_step``, decoding
    through the pipeline (see the module's docstring); the prompt cache is brought up
    to date when the generator ends or is closed. ``adaptive``: measured speed
    decides, every PROBE_TOKENS tokens, between the pipeline and plain decoding
    (the same tokens either way); False: always the pipeline."""
    depth = check_pipeline(model, rule, cache, draft_loops, logits_processors)
    stats = stats if stats is not None else PipelineStats()
    sample = sampler or greedy
    logits, _ = prefill(model, prompt[None], cache, rule, prefill_step_size)
    y, logprobs = sample_checked(logits, sample)
    mx.async_eval(y, logprobs)
    if max_tokens == 1:
        yield host.read(y[0]), logprobs[0], depth
        return
    memory = _memory(model, (depth, draft_loops, compile_step)) if adaptive else None
    switch, head, emitted = _Switch(adaptive, memory), (y, logprobs[0]), 0
    while emitted < max_tokens:
        mark = emitted + (head is not None)  # the tokens out once the head is
        tic, dec, piped = clock(), None, switch.pipelined(mark)
        if piped:  # until the speed check says otherwise
            tokens = _pipe_tokens(PipelinedDecoder(model, cache, depth, draft_loops, y,
                                                   sampler, compile_step), stats, head,
                                  limit=max_tokens - mark)
        else:
            n = min(switch.segment(mark), max_tokens - mark)
            if compile_step:
                dec = CompiledDecoder(model, cache, depth)
                tokens = _plain_tokens(lambda y: dec(y[None]), y, sample, n, head)
            else:
                tokens = _plain_tokens(lambda y: decode(model, y[None], cache, rule)[0],
                                       y, sample, n, head)
        head = None
        try:
            for token, lp in tokens:
                emitted += 1
                yield token, lp, depth
                if emitted >= max_tokens:
                    break
                if piped and emitted - mark >= PROBE_TOKENS:
                    switch.done(True, clock() - tic, emitted - mark, emitted)
                    tic, mark = clock(), emitted
                    if not switch.pipelined(emitted):
                        break
        finally:
            tokens.close()  # the pipeline hands its K/V back
            if dec is not None:
                dec.sync()
        if not piped:
            stats.plain_tokens += emitted - mark
            switch.done(False, clock() - tic, emitted - mark, emitted)
        y = mx.array([token], dtype=mx.int32)
