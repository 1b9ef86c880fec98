"""Continuous batching: many sequences decoded together, each at its own loop depth.

A ``Batcher`` runs on one thread (the server's engine, or ``batch_generate``).
``add`` queues a sequence (or ``n`` copies of one prompt); every ``step`` runs at
most one prefill chunk of the waiting prompts, so a new prompt never stalls the
others by more than one chunk, then one token of every active batch, and returns
the tokens made. A sequence joins its batch when its prompt is in, and leaves the
moment it finishes or is cancelled.

Rows at different depths share one batch. A batch holds the sequences of one model
and KV layout; its cache has one slot per loop step of its deepest row. Each token
runs loop step t for every row while any row still loops at t (``decode`` with a
``RowRules``: each row's own ``ut_steps``, ``exit_threshold``, ``exit_at_step``,
``min_loops``/``max_loops``); a row that has exited waits, keeping its state and
writing its exit-step K/V into the deeper slots, exactly what ``commit_kv`` writes
when it decodes alone. A shallow row in a deep batch therefore never sees a
deeper step's output: its tokens and loop counts are those it gets alone.
Prompts are prefilled at their own depth, alone or grouped with waiting prompts of
the same depth (left-padded, as ``BatchKVCache`` keeps them), then merged into the
running batch.

Each row keeps its own sampler, logits processors, ``max_tokens`` and KV history
(mlx-lm's ``BatchKVCache``: per-row offsets and left padding).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, CacheList, KVCache

from ..exit import ExitRule, RowRules
from ..model import Model
from ..sampling import NONFINITE, NonFiniteLogits, Sampler, sample
from . import host
from .steps import decode, greedy, prefill_chunk, prefill_last, sample_with, score_chunk

PREFILL_ROWS = 32  # waiting prompts prefilled together at most


@dataclass(eq=False)
class Sequence:
    """One sequence to decode, and its progress.

    ``prompt``: every prompt token; ``cache``/``cached``: a cache from
    ``Model.make_cache`` holding ``prompt[:cached]`` (a prompt-cache hit), or None.
    ``logprobs`` k: report each token's logprob and the k most likely tokens (None:
    nothing); ``score_prompt``: also each prompt token's (the first has none).
    ``keep_cache``: hand the cache back when done (``final_cache``)."""

    prompt: list[int]
    model: Model
    rule: ExitRule
    max_tokens: int
    eos: frozenset = frozenset()
    kv_mode: str = "full"
    sampler: Sampler | None = None
    processors: list | None = None
    logprobs: int | None = None
    score_prompt: bool = False
    cache: list | None = None
    cached: int = 0
    keep_cache: bool = False
    tag: Any = None  # the caller's handle
    # progress
    tokens: list[int] = field(default_factory=list)
    loops: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop", "length", "cancelled" or "error"; every
    # sequence added ends with exactly one Token whose finish is set
    error: Exception | None = None
    cancelled: bool = False
    prompt_scores: list | None = None  # per prompt token: (logprob, top) or None
    final_cache: list | None = None
    _history: Any = None  # prompt + tokens as an mx.array, for logits processors

    @property
    def depth(self) -> int:
        """Cache slots this sequence needs."""
        return self.rule.ut_steps if self.kv_mode == "full" else 1


@dataclass
class Token:
    """One token of one sequence, as ``Batcher.step`` hands it out."""

    seq: Sequence
    token: int
    loops: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the most likely tokens, best first
    finish: str | None = None


class Batcher:
    """The active sequences of one thread; see the module docstring."""

    def __init__(self, *, prefill_step_size: int = 512, group_prefill: bool = True,
                 share_depths: bool = True):
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}.")
        self.step_size = prefill_step_size
        self.group_prefill = group_prefill
        # False: one batch per fixed depth (and one for adaptive rows), each running
        # only its own steps (measured against sharing in docs/benchmarks.md)
        self.share_depths = share_depths
        self.waiting: deque[list[Sequence]] = deque()
        self.prefilling: _Prefill | None = None
        self.batches: dict[tuple, _Batch] = {}

    def add(self, *copies: Sequence) -> None:
        """Queue a sequence, or several that share one prompt and its options (the
        prompt is prefilled once; each copy samples on its own)."""
        if not copies:
            raise ValueError("add needs a sequence.")
        self.waiting.append(list(copies))

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.batches)

    def step(self) -> list[Token]:
        """One prefill chunk (if a prompt waits) and one token of every batch."""
        out: list[Token] = []
        while self.prefilling is None and self.waiting and all(
                s.cancelled for s in self.waiting[0]):  # gone before their prompt ran
            for s in self.waiting.popleft():
                s.finish = "cancelled"
                out.append(Token(s, NONFINITE, 0, finish="cancelled"))
        if self.prefilling is None and self.waiting:
            self.prefilling = self._next_prefill()
        if self.prefilling is not None:
            try:
                done = self.prefilling.advance(self.step_size)
            except Exception as e:  # e.g. out of memory: these sequences fail, not all
                for seqs in self.prefilling.groups:
                    for s in seqs:
                        _fail(s, e)
                        out.append(Token(s, NONFINITE, 0, finish="error"))
                self.prefilling, done = None, None
            if done is not None:
                out += self._join(self.prefilling, *done)
                self.prefilling = None
        for key, batch in list(self.batches.items()):
            out += batch.step()
            if not batch.rows:
                del self.batches[key]
        return out

    def _next_prefill(self) -> _Prefill:
        groups = [self.waiting.popleft()]
        first = groups[0][0]
        if self.group_prefill and first.cache is None and not first.score_prompt:
            key = _prefill_key(first)
            rest = deque()
            while self.waiting and len(groups) < PREFILL_ROWS:
                g = self.waiting.popleft()
                s = g[0]
                if s.cache is None and not s.score_prompt and _prefill_key(s) == key:
                    groups.append(g)
                else:
                    rest.append(g)
            self.waiting.extendleft(reversed(rest))
        return _Prefill(groups)

    def _join(self, pre: _Prefill, logits: mx.array, loops: mx.array) -> list[Token]:
        """Sample the first tokens of a finished prefill; the rows that go on join
        their batch."""
        index = [i for i, g in enumerate(pre.groups) for _ in g]  # copies share a row
        seqs = [s for g in pre.groups for s in g]
        copied = len(index) > len(pre.groups)
        if copied:
            rows = mx.array(index)
            logits, loops = logits[rows], loops[rows]
        y, tokens = _emit(seqs, logits, loops)
        keep = [i for i, t in enumerate(tokens) if t.finish is None]
        for i, t in enumerate(tokens):
            s = seqs[i]
            if t.finish is not None and s.keep_cache and t.finish != "error":
                s.final_cache = _extract(pre.cache, index[i], s.depth)
        cache = pre.cache
        if keep and (len(keep) < len(seqs) or copied):
            cache = _select(cache, [index[i] for i in keep])
            y = y[mx.array(keep)]
        if keep:
            joining = [seqs[i] for i in keep]
            key = (id(pre.model), pre.kv_mode)
            if not self.share_depths:
                key += (joining[0].rule.fixed_loops,)
            batch = self.batches.get(key)
            if batch is None:
                batch = self.batches[key] = _Batch(pre.model, pre.kv_mode)
            batch.join(joining, cache, y)
        return tokens


def _prefill_key(s: Sequence) -> tuple:
    return id(s.model), s.kv_mode, s.rule.ut_steps, s.rule.fixed_loops


def _fail(s: Sequence, e: Exception) -> None:
    s.finish, s.error = "error", e


class _Prefill:
    """The prompts of one or more waiting groups, fed a chunk at a time."""

    def __init__(self, groups: list[list[Sequence]]):
        self.groups = groups
        heads = [g[0] for g in groups]
        first = heads[0]
        self.model, self.kv_mode = first.model, first.kv_mode
        self.rule = RowRules([s.rule for s in heads])
        self.score = first.score_prompt  # (always prefilled from the start)
        layers = self.model.layers
        if first.cache is not None and not self.score:  # a prompt-cache hit: one row
            self.cache = [CacheList(*(BatchKVCache.merge([c]) for c in layer.caches))
                          for layer in first.cache]
            self.ids = mx.array([first.prompt[first.cached:]], dtype=mx.int32)
        else:
            width = max(len(s.prompt) for s in heads)
            pads = [width - len(s.prompt) for s in heads]
            self.ids = mx.array([[0] * p + s.prompt for p, s in zip(pads, heads)],
                                dtype=mx.int32)
            self.cache = [CacheList(*(BatchKVCache(pads) for _ in range(first.depth)))
                          for _ in layers]
        if self.score:
            first.prompt_scores = [None]  # the first prompt token has no logprob
        self.shared = first.kv_mode != "full"

    def advance(self, step_size: int) -> tuple[mx.array, mx.array] | None:
        """Feed one chunk; at the prompt's end, its last logits [B, V] and depth [B]."""
        if self.shared:  # one shared cache takes the prompt whole (see ``prefill``)
            step_size = self.ids.shape[1]
        ids, last = self.ids[:, :step_size], self.ids.shape[1] <= step_size
        self.ids = self.ids[:, step_size:]
        if self.score:
            logits, loops = score_chunk(self.model, ids, self.cache, self.rule)
            self._score(logits, ids, None if last else self.ids[:, :1])
            if not last:
                mx.eval([c.state for c in self.cache])
                return None
            return logits[:, -1], loops[:, -1]
        if not last:
            prefill_chunk(self.model, ids, self.cache, self.rule)
            return None
        return prefill_last(self.model, ids, self.cache, self.rule)

    def _score(self, logits: mx.array, ids: mx.array, after: mx.array | None) -> None:
        """Each prompt token's logprob (and top k) from the position before it."""
        seq = self.groups[0][0]
        lp = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)  # [S, V]
        nxt = ids[0, 1:] if after is None else mx.concatenate([ids[0, 1:], after[0]])
        n = nxt.size
        chosen = mx.take_along_axis(lp[:n], nxt[:, None], axis=-1)[:, 0]
        k = seq.logprobs or 0
        top = _top(lp[:n], k) if k else None
        mx.eval(chosen, *(top or ()))
        chosen = chosen.tolist()
        tops = _pairs(top) if top else [None] * n
        seq.prompt_scores += [(c, t) for c, t in zip(chosen, tops)]


class _Batch:
    """Active rows of one model and KV layout, decoded together."""

    def __init__(self, model: Model, kv_mode: str):
        self.model, self.kv_mode = model, kv_mode
        self.rows: list[Sequence] = []
        self.cache: list | None = None
        self.y: mx.array | None = None
        self.rule: RowRules | None = None

    @property
    def depth(self) -> int:
        return len(self.cache[0].caches) if self.cache else 0

    def join(self, seqs: list[Sequence], cache: list, y: mx.array) -> None:
        if not self.rows:
            self.cache, self.y = cache, y
        else:
            depth = max(self.depth, len(cache[0].caches))
            self.cache = _deepen(self.cache, depth)
            cache = _deepen(cache, depth)
            for mine, theirs in zip(self.cache, cache):
                mine.extend(theirs)
            self.y = mx.concatenate([self.y, y])
        self.rows += seqs
        self.rule = RowRules([s.rule for s in self.rows])

    def step(self) -> list[Token]:
        """One token for every row; finished and cancelled rows leave."""
        logits, loops = decode(self.model, self.y[:, None], self.cache, self.rule)
        self.y, tokens = _emit(self.rows, logits, loops)
        done = [i for i, t in enumerate(tokens) if t.finish is not None]
        if done:
            self._leave(done)
        return tokens

    def _leave(self, gone: list[int]) -> None:
        for i in gone:
            s = self.rows[i]
            if s.keep_cache and s.finish != "error":
                s.final_cache = _extract(self.cache, i, s.depth)
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache = _select(self.cache, keep)
            self.y = self.y[mx.array(keep)]
            self.rule = RowRules([s.rule for s in self.rows])
        else:
            self.cache = self.y = self.rule = None
        mx.clear_cache()


def _emit(seqs: list[Sequence], logits: mx.array, loops: mx.array
          ) -> tuple[mx.array, list[Token]]:
    """Sample each row's token (its own sampler and processors), read the tokens
    and depths (and asked-for logprobs) in one sync, and record them."""
    if all(s.sampler is None and not s.processors for s in seqs):
        y, lp = sample(logits, greedy)
    else:
        ys, lps = [], []
        for i, s in enumerate(seqs):
            if s.processors and s._history is None:
                s._history = mx.array(s.prompt + s.tokens, dtype=mx.int32)
            yi, lpi = sample_with(logits[i:i + 1], s._history, s.sampler or greedy,
                                  s.processors)
            if s.processors:
                s._history = mx.concatenate([s._history, yi.astype(mx.int32)])
            ys.append(yi)
            lps.append(lpi)
        y, lp = mx.concatenate(ys), mx.concatenate(lps)
    k = max((s.logprobs for s in seqs if s.logprobs is not None), default=None)
    extra = []
    if k is not None:
        extra = [mx.take_along_axis(lp, mx.maximum(y, 0)[:, None], axis=-1)[:, 0]]
        if k:
            extra += list(_top(lp, k))
        mx.async_eval(*extra)
    tokens_, depths = host.read(mx.stack([y, loops.astype(y.dtype)]))
    chosen = extra[0].tolist() if extra else None
    tops = _pairs(extra[1:]) if len(extra) > 1 else None
    out = []
    for i, (s, tok, d) in enumerate(zip(seqs, tokens_, depths)):
        t = Token(s, tok, d)
        if s.cancelled:  # the caller gave up on it: it leaves with this step
            s.finish = t.finish = "cancelled"
            out.append(t)
            continue
        if tok == NONFINITE:
            _fail(s, NonFiniteLogits(len(s.tokens)))
            t.finish = "error"
            out.append(t)
            continue
        s.tokens.append(tok)
        s.loops.append(d)
        if s.logprobs is not None:
            t.logprob = chosen[i]
            t.top = tops[i][: s.logprobs] if tops and s.logprobs else ([] if s.logprobs == 0
                                                                       else None)
        if tok in s.eos:
            t.finish = "stop"
        elif len(s.tokens) >= s.max_tokens:
            t.finish = "length"
        s.finish = t.finish
        out.append(t)
    return y, out


def _top(lp: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest logprobs per row [N, V] and their ids (unsorted)."""
    k = min(k, lp.shape[-1])
    idx = mx.argpartition(-lp, k - 1, axis=-1)[:, :k]
    return idx, mx.take_along_axis(lp, idx, axis=-1)


def _pairs(top) -> list[list[tuple[int, float]]]:
    idx, val = (a.tolist() for a in top)
    return [sorted(zip(i, v), key=lambda p: -p[1]) for i, v in zip(idx, val)]


# -- batch caches --------------------------------------------------------------------


def _copy(c: BatchKVCache) -> BatchKVCache:
    """An independent copy of a slot (new arrays: slices are updated in place)."""
    n = BatchKVCache([0])
    if c.keys is not None:
        n.keys, n.values = c.keys[..., : c._idx, :], c.values[..., : c._idx, :]
    n.offset, n.left_padding, n._idx = c.offset + 0, c.left_padding + 0, c._idx
    return n


def _deepen(cache: list, depth: int) -> list:
    """``cache`` with ``depth`` slots per layer: new slots copy the deepest one, as a
    row that stopped there would have filled them."""
    if len(cache[0].caches) >= depth:
        return cache
    return [CacheList(*layer.caches, *(_copy(layer.caches[-1])
                                       for _ in range(depth - len(layer.caches))))
            for layer in cache]


def _select(cache: list, rows: list[int]) -> list:
    """Keep (or repeat) ``rows`` of every slot, trimming shared left padding. Every
    slot of a batch went through the same joins and leaves, so one read of the
    padding serves them all."""
    pads = host.read(cache[0].caches[0].left_padding)
    pads = [pads[i] for i in rows]
    cut = min(pads)
    index = mx.array(rows)
    new_pad = mx.array([p - cut for p in pads])
    for layer in cache:
        for c in layer.caches:
            if c.keys is not None:
                c.keys = c.keys[index][..., cut:, :]
                c.values = c.values[index][..., cut:, :]
            c.offset = c.offset[index]
            c.left_padding = new_pad + 0
            c._idx -= cut
    return cache


def _extract(cache: list, row: int, depth: int) -> list:
    """Row ``row`` of a batch cache as a ``Model.make_cache`` cache of ``depth``
    slots (the prompt cache stores those)."""
    pad = host.read(cache[0].caches[0].left_padding[row])
    out = []
    for layer in cache:
        slots = []
        for c in layer.caches[:depth]:
            kv = KVCache()
            if c.keys is not None and c._idx > pad:
                kv.keys = mx.contiguous(c.keys[row:row + 1, :, pad:c._idx])
                kv.values = mx.contiguous(c.values[row:row + 1, :, pad:c._idx])
                kv.offset = c._idx - pad
            slots.append(kv)
        out.append(CacheList(*slots))
    return out
