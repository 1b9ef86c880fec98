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

``num_draft_tokens`` is the most drafts per round; by default n adapts, from 2: one more
after a round that accepted every draft, the accepted count after a rejection, and
plain, pipelined decoding (n = 0) for 8 tokens when nothing is accepted, then a
probe with n = 1 (after a rejected probe, twice as many plain tokens, up to 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from .exit import ExitRule
from .model import Model, cache_depth

Sampler = Callable[[mx.array], mx.array]

MAX_DRAFT_TOKENS = 64
PLAIN_TOKENS = 8  # with adaptive n at 0: plain tokens before drafting one again,
START_DRAFT_TOKENS = 2  # adaptive n starts here, grows by one per full acceptance
MAX_PLAIN_TOKENS = 64  # doubling up to this while the probes are rejected


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
) -> tuple[int, int]:
    """``(depth, num_draft_tokens)`` if speculation applies, else a ValueError."""
    depth = rule.fixed_loops
    if depth is None:
        raise ValueError("draft_loops needs a fixed depth (exit_at_step, or exit_threshold "
                         "1.0 without hidden_eps): an adaptive exit rule is not supported.")
    if cache_depth(cache) == 1:
        raise ValueError("draft_loops needs kv_mode 'full': kv_mode 'last' keeps one K/V "
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
        raise ValueError("draft_loops does not support logits processors "
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
            x, _, _ = inner.loop_step(x, t, cache, None)
        states.append(x)
        if i < n:
            y = mx.argmax(model.lm_head(x[:, -1]), axis=-1)
            drafts.append(y)
    x = mx.concatenate(states, axis=1) if n else states[0]
    mask = create_attention_mask(x, cache[0][k])
    for t in range(k, depth):
        x, _, kvs = inner.loop_step(x, t, cache, mask)
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


def plain_decode(
    model: Model, y: mx.array, cache: list, rule: ExitRule, sampler: Sampler, count: int
) -> Iterator[tuple[mx.array, mx.array]]:
    """``count`` tokens after the pending ``y`` [1] as ``generation.generate_step``
    decodes them (each queued before the previous one is handed out); the last
    one handed out is the new pending token."""
    from .generation import decode

    def step(y):
        logits, _ = decode(model, y[None], cache, rule)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = sampler(lp)
        mx.async_eval(y, lp)
        return y, lp

    nxt = step(y)
    for i in range(count):
        cur = nxt
        if i + 1 < count:
            nxt = step(cur[0])
        yield cur


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
) -> Iterator[tuple[int, mx.array, int]]:
    """Yield ``(token, logprobs, loops)`` like ``generation.generate_step``, drafting
    with the first ``draft_loops`` steps (see the module's docstring)."""
    from .generation import prefill

    depth, n_max = check_speculative(model, rule, cache, draft_loops, num_draft_tokens,
                                     logits_processors)
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    stats = stats if stats is not None else SpecStats()
    logits, _ = prefill(model, prompt[None], cache, rule, prefill_step_size)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    y = sampler(logprobs)
    mx.eval(y, logprobs)
    yield y.item(), logprobs[0], depth
    emitted, stretch = 1, PLAIN_TOKENS
    n = min(n_max, START_DRAFT_TOKENS) if adaptive else n_max
    while emitted < max_tokens:
        if n == 0:  # drafts were poor: plain, pipelined decoding for a while
            count = min(stretch, max_tokens - emitted)
            for y, lp in plain_decode(model, y, cache, rule, sampler, count):
                yield y.item(), lp[0], depth
            emitted += count
            n, stretch = 1, min(2 * stretch, MAX_PLAIN_TOKENS)  # probe; longer if it fails
            continue
        m = min(n, max_tokens - emitted - 1)
        drafts, logits, kvs = draft_and_verify(model, y, cache, draft_loops, depth, m)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = sampler(logprobs)
        mx.eval(drafts, targets, logprobs, kvs)
        d, t = drafts.tolist(), targets.tolist()
        a = 0
        while a < m and d[a] == t[a]:
            a += 1
        settle_cache(cache, kvs, depth, a + 1, m - a)
        stats.rounds += 1
        stats.drafted += m
        stats.accepted += a
        y = targets[a:a + 1]
        for i in range(a + 1):
            yield t[i], logprobs[i], depth
        emitted += a + 1
        if adaptive and m == n:
            n = min(n_max, n + 1) if a == m else a
            if a:
                stretch = PLAIN_TOKENS
        if emitted % 256 < a + 1:
            mx.clear_cache()
