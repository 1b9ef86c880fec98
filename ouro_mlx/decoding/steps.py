"""The primitives every decoding strategy stands on: the exit rule from generation
options, the prompt's prefill at full depth, and one token's loop steps (``decode``)
stopping per the rule, with the K/V of skipped steps committed.

- Prompt tokens always run every loop step (the paper shows prefill needs them).
- A decoded token runs loop steps one at a time; after each, the ``ExitRule``
  (Q-exit on the gate's cdf, hidden-state change, fixed step, min/max loops)
  decides on the host whether to go on, only when the depth depends on the data
  (``ouro_mlx.decoding.host`` says how that read is paced). A fixed depth reads
  nothing and decodes asynchronously.
- The skipped steps' KV slots receive copies of the exit step's K/V (kv_mode "full"),
  so later tokens that loop deeper attend to a complete history; in kv_mode "last"
  the exit step's K/V is appended to the one history all steps share.
- In a batch, rows exit at their own depth: a row that stopped keeps its state and
  stores its exit-step K/V in the deeper steps the others still run.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from ..exit import CdfTracker, ExitRule, exit_steps, gather_steps
from ..model import Model, cache_depth, commit_kv
from ..sampling import Sampler, sample
from . import host


def greedy(logprobs: mx.array) -> mx.array:
    """The default sampler: the most likely token."""
    return mx.argmax(logprobs, axis=-1)


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
        prefill_chunk(model, ids[:, :step_size], cache, rule)
        ids = ids[:, step_size:]
    return prefill_last(model, ids, cache, rule)


def prefill_chunk(model: Model, ids: mx.array, cache: list, rule: ExitRule) -> None:
    """Prompt tokens [B, S] that are not the prompt's last, into ``cache``."""
    model.model(ids, cache, rule.ut_steps)
    mx.eval([c.state for c in cache])
    mx.clear_cache()


def prefill_last(
    model: Model, ids: mx.array, cache: list, rule: ExitRule
) -> tuple[mx.array, mx.array]:
    """The prompt's last tokens [B, S] into ``cache``: the last position's logits
    [B, V] at the rule's exit step and its depth [B]."""
    # The final step's last layer runs its attention output and MLP on the last
    # position only: nothing reads the other positions' final state.
    out = model.model(ids, cache, rule.ut_steps, last_only=True)
    last = [h[:, -1:] for h in out.hidden]
    k = exit_steps(rule, last, [g[:, -1:] for g in out.gate_logits])
    return model.lm_head(gather_steps(last, k)[:, -1]), k[:, -1] + 1


def score_chunk(
    model: Model, ids: mx.array, cache: list, rule: ExitRule
) -> tuple[mx.array, mx.array]:
    """Prompt tokens [B, S] into ``cache``, keeping every position's logits
    [B, S, V] at its exit step (what scoring a prompt needs) and the depths [B, S]."""
    out = model.model(ids, cache, rule.ut_steps)
    k = exit_steps(rule, out.hidden, out.gate_logits)
    return model.lm_head(gather_steps(out.hidden, k)), k + 1


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
        if t + 1 >= rule.min_loops:
            going = rule.known_going(t)
            if going is None:
                going = host.read(active.any())  # the host sync
            if not going:
                break
        x = prev = h
    if cache is not None:
        commit_kv(cache, kv_exit, t + 1)
    return model.lm_head(h_exit[:, -1]), loops


def sample_with(
    logits: mx.array, tokens: mx.array | None, sampler: Sampler, processors: list | None
) -> tuple[mx.array, mx.array]:
    for p in processors or []:
        logits = p(tokens, logits)
    return sample(logits, sampler)


def decode_row(model: Model, y: mx.array, cache: list, rule: ExitRule,
               lookahead: bool = False) -> tuple[mx.array, int, int]:
    """``decode`` for one row (``y`` [1, 1]) under an adaptive rule: logits [1, V],
    the loop steps run, read on the host after each step that may stop, and ``y``
    itself on the host (read while step 0 runs: the caller hands it out next).

    ``lookahead``: step t+1 is queued before step t's decision is read, so the device
    computes while the host waits; when the token stops at t, step t+1 is thrown
    away (its K/V slot rewound and given step t's K/V, as ``commit_kv`` does for
    every skipped step). Same tokens and loop counts either way."""
    inner = model.model
    tracker = CdfTracker()

    def run(t: int, x: mx.array, prev: mx.array | None):
        h, gate, kvs = inner.loop_step(x, t, cache, None)
        return h, kvs, rule.stops(t, tracker.update(gate), h, prev)

    h, kvs, stop = run(0, inner.embed_tokens(y), None)
    mx.async_eval(stop)
    token = host.read(y[0, 0])
    t = 0
    while t + 1 < rule.ceiling:
        decide = t + 1 >= rule.min_loops
        if decide and lookahead:  # step t and its decision are queued already
            ahead = run(t + 1, h, h)
            mx.async_eval(ahead[2])
            if host.read(stop[0, -1]):
                if cache is not None:
                    discard_step(cache, kvs, t + 1)
                break
        elif decide and host.read(stop[0, -1]):
            break
        else:
            ahead = run(t + 1, h, h)
        h, kvs, stop = ahead
        mx.async_eval(stop)
        t += 1
    if cache is not None:
        commit_kv(cache, kvs, t + 1)
    return model.lm_head(h[:, -1]), t + 1, token


def discard_step(cache: list, kvs: list, t: int) -> None:
    """Undo loop step ``t`` of the last token (run ahead of a decision that then
    stopped at t - 1, whose per-layer K/V are ``kvs``): its K/V slot forgets the
    token, or, in a shared cache (kv_mode "last"), gets step t - 1's K/V back."""
    shared = cache_depth(cache) == 1
    for layer_cache, (k, v) in zip(cache, kvs):
        c = layer_cache[0 if shared else t]
        c.trim(1)
        if shared:
            c.update_and_fetch(k, v)


def sampling_step(prompt: mx.array, sampler: Sampler | None, processors: list | None):
    """``step(logits) -> (token [1], logprobs [1, V])`` for one generation: the
    logits processors see the prompt and every token drawn so far."""
    sampler = sampler or greedy
    tokens = prompt if processors else None

    def step(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        y, lp = sample_with(logits, tokens, sampler, processors)
        if processors:
            tokens = mx.concatenate([tokens, y])
        return y, lp

    return step
