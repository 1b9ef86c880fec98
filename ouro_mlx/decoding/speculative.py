"""Self-speculative decoding: a looped model drafts with its own first loop steps.

At a fixed depth D, a round works on the pending token y0 (sampled, not yet cached):

1. Draft: y0 runs loop steps 0..k-1 (``draft_loops`` = k < D) into their caches as
   usual; the state after step k-1, read through ``lm_head``, proposes d1 (argmax),
   which runs steps 0..k-1 in turn, and so on up to dn (``num_draft_tokens`` = n).
   The block [y0, d1..dn] has now run steps 0..k-1: exactly the verifier's first
   steps (same weights, same caches), so drafting is work the verifier needed anyway.
2. Verify: the block's step-(k-1) states run steps k..D-1 in ONE call (causal mask
   over the cached history), giving the target's logits at every position.
3. Accept the longest prefix of drafts the target agrees with, plus the target's own
   token after it (a correction, or a bonus when every draft was accepted). Rejected
   tokens are trimmed from every loop step's cache; the deeper steps the fixed depth
   skips (exit_at_step < ut_steps - 1) receive copies of step D-1's K/V for the kept
   tokens, the same rule as plain decoding.

Greedy: the output equals plain decoding at depth D, token for token. Sampling: the
target token at each position is drawn from the target's distribution, and a draft
is accepted iff it equals that draw. With a deterministic (argmax) draft this is
standard speculative sampling (accept with probability p(d), else draw from p
without d, renormalised), so the output distribution is the target's.

Refused, with a one-line ValueError:
- an adaptive exit rule (exit_threshold < 1, hidden_eps): the depth of each token
  would depend on the verifier's gates, and a token's drafted steps would be those of
  a different depth; use exit_at_step (a fixed depth) or exit_threshold 1.0;
- kv_mode "last": all steps share one cache holding only the last step's K/V per
  token, so the drafted steps' K/V are overwritten and cannot be reused;
- logits processors (repetition penalty): they depend on the tokens before each
  position, which the one-call verify does not track yet.

The cache, when the caller stops early (an eos), may hold up to n accepted tokens
past the last one handed out, all of them what would have followed: trim it (e.g.
``mlx_lm.models.cache.trim_prompt_cache``) before reusing it as a prompt cache. After a
"length" finish it holds exactly what plain decoding leaves.

``num_draft_tokens`` is the most drafts per round. By default n adapts, without paying
for probes: decoding starts plainly (pipelined, as ``generate_step``), and every plain
token also reads ``lm_head`` after step k-1 — its "shadow draft", what a round would
have proposed, compared with the token itself. The last 32 outcomes (shadows and real
drafts) estimate the acceptance alpha; before each round or stretch of 8 plain tokens,
``draft_count`` picks the n with the best expected speed-up in loop-step units, and
decodes plainly where none promises 1.1x. Where early loop steps rarely agree with the
last (alpha at k = 1 below ~0.3 for depth 4), speculation never starts.

``compile_step``: every draft, verify call and plain token runs through compiled graphs
(``ouro_mlx.decoding.compiled.CompiledDecoder``); rejected tokens are rolled back by moving the
buffers' offset.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from ..exit import ExitRule
from ..model import Model, cache_depth, commit_kv
from ..sampling import Sampler, sample
from . import host
from .compiled import CompiledDecoder, check_compilable
from .plain import Meter, plain_decode
from .steps import greedy, prefill

MAX_DRAFT_TOKENS = 64
WINDOW = 32  # adaptive n: the acceptance estimate looks at this many recent outcomes
PLAIN_TOKENS = 8  # plain tokens (with shadow drafts) between decisions
MIN_GAIN = 1.1  # speculate only where the cost model promises at least this speed-up
CHECK_ROUNDS = 4  # rounds between checks of their measured speed against plain decoding
BACKOFF_TOKENS = 32  # plain tokens after rounds measured slower; doubles while they are
MAX_BACKOFF = 512
clock = time.perf_counter  # the speed meters' clock (a test replaces it)


@dataclass
class SpecStats:
    """Counts of one speculative generation: ``drafted`` tokens proposed,
    ``accepted`` of them kept, ``rounds`` verify calls."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_speculative(
    model: Model,
    rule: ExitRule,
    cache: list,
    draft_loops: int,
    num_draft_tokens: int | None,
    logits_processors: list | None = None,
    option: str = "draft_loops",
) -> tuple[int, int]:
    """``(depth, num_draft_tokens)`` if speculation applies, else a ValueError; its
    refusals of the setting name ``option`` (the pipeline shares these checks)."""
    depth = rule.fixed_loops
    if depth is None:
        raise ValueError(f"{option} needs a fixed depth (exit_at_step, or exit_threshold "
                         "1.0 without hidden_eps): an adaptive exit rule is not supported.")
    if cache_depth(cache) == 1:
        raise ValueError(f"{option} needs kv_mode 'full': kv_mode 'last' keeps one K/V "
                         "per token, so the drafted loop steps cannot be reused.")
    if isinstance(draft_loops, bool) or not isinstance(draft_loops, int) or \
            not 1 <= draft_loops < depth:
        raise ValueError(f"draft_loops must be an integer in [1, {depth}) (the depth is "
                         f"{depth} loop steps), got {draft_loops!r}.")
    n = 4 if num_draft_tokens is None else num_draft_tokens
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], "
                         f"got {n!r}.")
    if logits_processors:
        raise ValueError(f"{option} does not support logits processors "
                         "(repetition penalty) yet.")
    return depth, n


def draft_and_verify(
    model: Model, y: mx.array, cache: list, k: int, depth: int, n: int
) -> tuple[mx.array, mx.array, list]:
    """One round, lazily: the pending token ``y`` [1] and ``n`` drafts through steps
    0..k-1, then the block through steps k..depth-1. Returns the drafts [n], the
    target logits [n+1, V] and step depth-1's per-layer (k, v) for the block."""
    inner = model.model
    states, drafts = [], []
    for i in range(n + 1):
        x = inner.embed_tokens(y[None])
        for t in range(k):
            x, _, _ = inner.loop_step(x, t, cache, None, gate=False)
        states.append(x)
        if i < n:
            y = mx.argmax(model.lm_head(x[:, -1]), axis=-1)
            drafts.append(y)
    x = mx.concatenate(states, axis=1) if n else states[0]
    mask = create_attention_mask(x, cache[0][k])
    for t in range(k, depth):
        x, _, kvs = inner.loop_step(x, t, cache, mask, gate=False)
    d = mx.concatenate(drafts) if n else mx.zeros((0,), dtype=mx.int32)
    return d, model.lm_head(x[0]), kvs


def settle_cache(cache: list, kvs: list, depth: int, kept: int, rejected: int) -> None:
    """Drop the ``rejected`` block tokens from steps 0..depth-1; give the deeper,
    skipped steps step depth-1's K/V for the ``kept`` ones."""
    for layer_cache, (k, v) in zip(cache, kvs):
        steps = layer_cache.caches
        if rejected:
            for c in steps[:depth]:
                c.trim(rejected)
        for c in steps[depth:]:
            c.update_and_fetch(k[:, :, :kept], v[:, :, :kept])


def shadow_decode(model: Model, y: mx.array, cache: list, depth: int, k: int
                  ) -> tuple[mx.array, mx.array]:
    """``generation.decode`` at the fixed ``depth`` for token ``y`` [1, 1], also
    returning the draft steps 0..k-1 propose [1] (one more ``lm_head``): whether it
    equals the token decoded next is a free sample of the acceptance."""
    inner = model.model
    x = inner.embed_tokens(y)
    mask = create_attention_mask(x, cache[0][0])
    for t in range(depth):
        x, _, kvs = inner.loop_step(x, t, cache, mask, gate=False)
        if t == k - 1:
            draft = mx.argmax(model.lm_head(x[:, -1]), axis=-1)
    commit_kv(cache, kvs, depth)
    return model.lm_head(x[:, -1]), draft


def round_gain(alpha: float, k: int, depth: int, n: int) -> float:
    """Expected speed-up of a round of n drafts over plain decoding, in loop-step
    units: a round runs n+1 tokens through steps 0..k-1 one by one and the block
    through the other depth-k steps in one call (counted as one step each: what a
    memory-bound decode costs, and no more than any backend); it yields
    (1 - alpha^(n+1)) / (1 - alpha) tokens, each of which costs ``depth`` steps
    plainly. An upper bound where a verify call of n+1 tokens costs more than one
    step, or a round has costs of its own (a sync)."""
    tokens = n + 1 if alpha >= 1 else (1 - alpha ** (n + 1)) / (1 - alpha)
    return tokens * depth / ((n + 1) * k + depth - k)


def draft_count(alpha: float, k: int, depth: int, n_max: int) -> int:
    """The n in 1..n_max with the best ``round_gain``, or 0 where the best is
    below ``MIN_GAIN``."""
    best, best_gain = 0, MIN_GAIN
    for n in range(1, n_max + 1):
        gain = round_gain(alpha, k, depth, n)
        if gain > best_gain:
            best, best_gain = n, gain
    return best


def speculative_step(
    prompt: mx.array,
    model: Model,
    rule: ExitRule,
    cache: list,
    *,
    draft_loops: int,
    num_draft_tokens: int | None = None,
    adaptive: bool = True,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    prefill_step_size: int = 2048,
    stats: SpecStats | None = None,
    compile_step: bool = False,
) -> Iterator[tuple[int, mx.array, int]]:
    """Yield ``(token, logprobs, loops)`` like ``generation.generate_step``, drafting
    with the first ``draft_loops`` steps (see the module's docstring).
    ``compile_step``: drafts, verify calls and plain tokens run through compiled
    graphs (``ouro_mlx.decoding.compiled.CompiledDecoder``), rejected tokens are rolled back
    by moving its offset; the prompt cache is brought up to date when the
    generator ends or is closed."""
    depth, n_max = check_speculative(model, rule, cache, draft_loops, num_draft_tokens,
                                     logits_processors)
    if compile_step:
        check_compilable(cache, depth)
    sampler = sampler or greedy
    stats = stats if stats is not None else SpecStats()
    logits, _ = prefill(model, prompt[None], cache, rule, prefill_step_size)
    y, logprobs = sample(logits, sampler)
    mx.async_eval(y, logprobs)
    if compile_step:
        dec = CompiledDecoder(model, cache, depth)
        decode_one = lambda y: dec.shadow(y[None], draft_loops)  # noqa: E731

        def round_(y, m):
            drafts, logits = dec.draft_and_verify(y, draft_loops, m)
            return drafts, logits, lambda kept, rejected: dec.rollback(rejected)
    else:
        dec = None
        decode_one = lambda y: shadow_decode(model, y[None], cache, depth,  # noqa: E731
                                             draft_loops)

        def round_(y, m):
            drafts, logits, kvs = draft_and_verify(model, y, cache, draft_loops, depth, m)
            return drafts, logits, lambda kept, rejected: settle_cache(cache, kvs, depth,
                                                                       kept, rejected)
    try:
        yield from _rounds(y, logprobs, sampler, stats, draft_loops, depth, n_max, adaptive,
                           max_tokens, decode_one, round_)
    finally:
        if dec is not None:
            dec.sync()


class _Policy:
    """Adaptive n: the acceptance estimate from recent outcomes (plain tokens'
    shadow drafts and real drafts) chooses n through ``draft_count``; measured
    speed has the last word: rounds slower per token than plain decoding (e.g.
    a per-round cost the loop-step model does not see) back off to plain decoding
    for ``backoff`` tokens, doubling while it keeps happening."""

    def __init__(self, k: int, depth: int, n_max: int, adaptive: bool):
        self.k, self.depth, self.n_max, self.adaptive = k, depth, n_max, adaptive
        self.seen: deque[bool] = deque(maxlen=WINDOW)  # recent drafts: accepted or not
        self.shadows: list[tuple[int, int]] = []  # (shadow draft, token)
        self.plain, self.spec = Meter(), Meter()
        self.rounds = 0  # since the last check of the rounds' speed
        self.backoff, self.resume_at = BACKOFF_TOKENS, 0  # plain until this token

    def flush(self) -> None:
        self.seen.extend(d == t for d, t in self.shadows)
        self.shadows.clear()

    def choose(self, emitted: int) -> int:
        if not self.adaptive:
            return self.n_max
        if len(self.seen) < PLAIN_TOKENS or emitted < self.resume_at:
            return 0
        alpha = (sum(self.seen) + 1) / (len(self.seen) + 2)
        return draft_count(alpha, self.k, self.depth, self.n_max)

    def round_done(self, seconds: float, tokens: int, emitted: int) -> None:
        self.spec.add(seconds, tokens)
        self.rounds += 1
        plain, spec = self.plain.per_token(), self.spec.per_token()
        if self.adaptive and self.rounds >= CHECK_ROUNDS and plain is not None:
            if spec > plain:
                self.resume_at = emitted + self.backoff
                self.backoff = min(2 * self.backoff, MAX_BACKOFF)
                self.spec = Meter()
            else:
                self.backoff = BACKOFF_TOKENS
            self.rounds = 0


def _rounds(y, logprobs, sampler, stats, k, depth, n_max, adaptive, max_tokens, decode_one,
            round_):
    """The decode loop of ``speculative_step``, from the prompt's token ``y`` (not
    handed out yet) and its ``logprobs``. ``round_(y, m)`` gives the drafts, the
    target logits and ``settle(kept, rejected)``, which fixes the caches up."""
    policy = _Policy(k, depth, n_max, adaptive)
    emitted, first = 0, logprobs

    def more() -> bool:  # plain decoding goes on: decided every PLAIN_TOKENS tokens
        if emitted + 1 >= max_tokens:
            return False
        if emitted % PLAIN_TOKENS:
            return True
        policy.flush()
        return policy.choose(emitted) == 0

    while emitted < max_tokens:
        n = policy.choose(emitted)
        if n and first is not None:  # rounds start from a handed-out token
            yield host.read(y[0]), first[0], depth
            emitted, first = 1, None
            continue
        tic, start = clock(), emitted
        if n == 0:  # plain, pipelined decoding; each token's shadow draft is scored
            for token, y, lp, draft in plain_decode(decode_one, y, sampler, more, first):
                if draft is not None:
                    policy.shadows.append((draft, token))
                first = None
                emitted += 1
                yield token, lp[0], depth
                if emitted % 256 == 0:
                    mx.clear_cache()
            policy.plain.add(clock() - tic, emitted - start)
            continue
        policy.flush()
        m = min(n, max_tokens - emitted - 1)
        drafts, logits, settle = round_(y, m)
        targets, logprobs = sample(logits, sampler)
        both = host.read(mx.concatenate([drafts.astype(mx.int32), targets]))  # one sync a round
        d, t = both[:m], both[m:]
        a = 0
        while a < m and d[a] == t[a]:
            a += 1
        settle(a + 1, m - a)
        stats.rounds += 1
        stats.drafted += m
        stats.accepted += a
        policy.seen.extend([True] * a + [False] * (a < m))
        y = targets[a:a + 1]
        for i in range(a + 1):
            yield t[i], logprobs[i], depth
        emitted += a + 1
        policy.round_done(clock() - tic, a + 1, emitted)
        if emitted % 256 < a + 1:
            mx.clear_cache()
