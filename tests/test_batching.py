"""Continuous batching (``ouro_mlx.decoding.batch``): rows at different loop depths
share one batch, join while others decode, leave when done, and each gets exactly
the tokens and loop counts it gets alone."""

from __future__ import annotations

import mlx.core as mx
import pytest

import ouro_mlx
from ouro_mlx import stream_generate
from ouro_mlx.decoding.batch import Batcher, Sequence
from ouro_mlx.generation import batch_generate, make_rule
from ouro_mlx.prompt_cache import PromptCache
from tests.conftest import IdsOnly

PROMPTS = [[5, 17, 300, 42, 7, 99, 128], [9, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
           [44, 45, 46], [300, 301], [7] * 9, [12, 13, 14, 15]]
LOOPS = [dict(ut_steps=1), dict(ut_steps=2), dict(ut_steps=3), dict(ut_steps=4),
         dict(exit_threshold=0.5), dict(exit_threshold=0.8, min_loops=2, max_loops=3),
         dict(exit_at_step=1), dict(hidden_eps=0.5, min_loops=2)]


@pytest.fixture(scope="module")
def model(tiny_dir):
    return ouro_mlx.load(tiny_dir)[0]


def alone(model, prompt, n, kv_mode="full", **opts):
    rs = list(stream_generate(model, IdsOnly(), prompt, max_tokens=n, kv_mode=kv_mode,
                              **opts))
    return [r.token for r in rs], [r.loops for r in rs]


def seq(model, prompt, n, opts, kv_mode="full", **kw):
    return Sequence(list(prompt), model, make_rule(model, **opts), n, kv_mode=kv_mode, **kw)


def drain(batcher, schedule=()):
    """Step until idle; ``schedule``: (step number, sequence) added at that step."""
    pending = sorted(schedule, key=lambda p: p[0])
    n = 0
    while pending or not batcher.idle:
        while pending and pending[0][0] <= n:
            batcher.add(pending.pop(0)[1])
        batcher.step()
        n += 1


@pytest.mark.parametrize("kv_mode", ["full", "last"])
def test_mixed_depths_in_one_batch_equal_alone(model, kv_mode):
    """ut_steps 1-4, Q-exit, exit_at_step and hidden_eps in one batch."""
    seqs = [seq(model, PROMPTS[i % len(PROMPTS)], 6, o, kv_mode) for i, o in enumerate(LOOPS)]
    b = Batcher()
    for s in seqs:
        b.add(s)
    drain(b)
    for s, o in zip(seqs, LOOPS):
        assert (s.tokens, s.loops) == alone(model, s.prompt, 6, kv_mode, **o), o
        assert s.finish == "length"
    assert len(set(map(tuple, (s.loops for s in seqs)))) > 3  # depths really differ


def test_rows_joining_and_leaving_midway_equal_alone(model):
    """Rows arrive while others decode (prompts fed in chunks of 3 tokens), have
    different lengths and leave at different times."""
    sched = [(3 * i, seq(model, PROMPTS[i % len(PROMPTS)], 3 + 2 * (i % 4), o))
             for i, o in enumerate(LOOPS)]
    b = Batcher(prefill_step_size=3)
    drain(b, sched)
    for _, s in sched:
        o = LOOPS[[x for _, x in sched].index(s)]
        assert (s.tokens, s.loops) == alone(model, s.prompt, s.max_tokens, **o)


def test_copies_share_one_prefill(model):
    a, b_, c = (seq(model, PROMPTS[0], 5, dict(exit_threshold=0.5)) for _ in range(3))
    b = Batcher()
    b.add(a, b_, c)
    drain(b)
    want = alone(model, PROMPTS[0], 5, exit_threshold=0.5)
    assert all((s.tokens, s.loops) == want for s in (a, b_, c))


def test_sampled_copies_differ_and_processors_see_their_own_row(model):
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    mx.random.seed(0)
    sampler = make_sampler(temp=1.5)
    copies = [seq(model, PROMPTS[0], 12, {}, sampler=sampler) for _ in range(4)]
    b = Batcher()
    b.add(*copies)
    drain(b)
    assert len({tuple(s.tokens) for s in copies}) > 1
    # a repetition penalty in a batch: the same tokens as alone
    proc = make_logits_processors(repetition_penalty=1.5)
    s1 = seq(model, PROMPTS[1], 8, {}, processors=proc)
    s2 = seq(model, PROMPTS[2], 8, dict(ut_steps=2))
    b.add(s1)
    b.add(s2)
    drain(b)
    rs = list(stream_generate(model, IdsOnly(), PROMPTS[1], max_tokens=8,
                              logits_processors=proc))
    assert s1.tokens == [r.token for r in rs]


def test_logprobs_are_the_tokens_and_the_best_alternatives(model):
    s = seq(model, PROMPTS[0], 4, dict(exit_threshold=0.5), logprobs=3)
    got = []
    b = Batcher()
    b.add(s)
    while not b.idle:
        got += b.step()
    rs = list(stream_generate(model, IdsOnly(), PROMPTS[0], max_tokens=4, exit_threshold=0.5))
    for t, r in zip(got, rs):
        assert t.token == r.token
        assert t.logprob == pytest.approx(r.logprobs[r.token].item(), abs=1e-5)
        assert len(t.top) == 3 and t.top[0][0] == r.token  # greedy: the best one
        assert [v for _, v in t.top] == sorted((v for _, v in t.top), reverse=True)


def test_scored_prompt_matches_a_forward_pass(model):
    s = seq(model, PROMPTS[2], 2, dict(exit_threshold=0.5), logprobs=2, score_prompt=True)
    b = Batcher(prefill_step_size=4)  # scores cross chunk boundaries
    b.add(s)
    drain(b)
    ids = mx.array([PROMPTS[2]])
    logits = model(ids, exit_threshold=0.5)[0]
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert s.prompt_scores[0] is None and len(s.prompt_scores) == len(PROMPTS[2])
    for i, (value, top) in enumerate(s.prompt_scores[1:]):
        assert value == pytest.approx(lp[i, PROMPTS[2][i + 1]].item(), abs=1e-4)
        assert top[0][0] == mx.argmax(lp[i]).item() and len(top) == 2


def test_prompt_cache_rows_continue_where_the_cache_ends(model):
    """A row starting from a cached prefix, and the cache it hands back, give the
    same tokens as starting from nothing."""
    pc = PromptCache()
    layout = ("x", 4, "full")
    first = seq(model, PROMPTS[2], 4, {}, keep_cache=True)
    b = Batcher()
    b.add(first)
    drain(b)
    pc.store(layout, first.prompt + first.tokens, first.final_cache)
    longer = first.prompt + first.tokens + [3, 4]
    cache, cached = pc.fetch(layout, longer)
    assert cached == len(first.prompt) + len(first.tokens) - 1
    other = seq(model, PROMPTS[1], 6, dict(ut_steps=2))
    hit = seq(model, longer, 5, {}, cache=cache, cached=cached)
    b.add(other)
    b.add(hit)
    drain(b)
    assert hit.tokens == alone(model, longer, 5)[0]
    assert other.tokens == alone(model, PROMPTS[1], 6, ut_steps=2)[0]


def test_cancelled_rows_leave_and_others_go_on(model):
    a = seq(model, PROMPTS[0], 10, {})
    c = seq(model, PROMPTS[3], 10, dict(exit_threshold=0.5))
    b = Batcher()
    b.add(a)
    b.add(c)
    b.step()
    b.step()
    a.cancelled = True
    drain(b)
    assert len(a.tokens) < 10
    assert (c.tokens, c.loops) == alone(model, PROMPTS[3], 10, exit_threshold=0.5)


def test_batch_generate_mixes_rules(model, tiny_dir):
    tok = ouro_mlx.load(tiny_dir)[1]
    tok._eos_token_ids = set()
    rules = [make_rule(model, **o) for o in LOOPS]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(LOOPS))]
    out = batch_generate(model, tok, prompts, max_tokens=5, rules=rules)
    for p, o, tokens, loops in zip(prompts, LOOPS, out.tokens, out.loops):
        assert (tokens, loops) == alone(model, p, 5, **o)
    with pytest.raises(ValueError, match="rules"):
        batch_generate(model, tok, prompts, rules=rules[:2])
