"""Pipelined loop decoding (ouro_mlx.decoding.pipeline): greedy tokens and caches identical to
plain decoding at the same fixed depth, fewer passes than plain when early steps
agree, the sampling distribution equal to the target's, and clear refusals."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

import ouro_mlx
from ouro_mlx.decoding import pipeline
from ouro_mlx.encoding import encode_text
from ouro_mlx.decoding.plain import generate_step
from ouro_mlx.decoding.steps import make_rule
from ouro_mlx.generation import stream_generate
from ouro_mlx.decoding.pipeline import PipelineStats, pipelined_step
from tests.conftest import IdsOnly, assert_pairs_follow_the_target

PROMPT = mx.array([5, 17, 300, 42, 7, 99, 128], dtype=mx.int32)


def plain_run(model, prompt, n, **loop):
    rule = make_rule(model, **loop)
    cache = model.make_cache(rule.ut_steps)
    out = [(t, lp) for t, lp, _ in generate_step(prompt, model, rule, cache, max_tokens=n)]
    return out, cache


def piped_run(model, prompt, n, k, compiled=False, stats=None, adaptive=False, **loop):
    rule = make_rule(model, **loop)
    cache = model.make_cache(rule.ut_steps)
    out = [(t, lp) for t, lp, _ in pipelined_step(prompt, model, rule, cache, draft_loops=k,
                                                 max_tokens=n, compile_step=compiled,
                                                 adaptive=adaptive, stats=stats)]
    return out, cache


def assert_same_caches(a, b):
    for la, lb in zip(a, b):
        for ca, cb in zip(la.caches, lb.caches):
            assert ca.offset == cb.offset
            for x, y in zip(ca.state[:2], cb.state[:2]):
                np.testing.assert_allclose(np.array(x[:, :, :ca.offset]),
                                           np.array(y[:, :, :cb.offset]), atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("which", ["tiny", "agreeing"])
def test_greedy_tokens_logprobs_and_caches_are_identical(request, which, k, compiled):
    model = request.getfixturevalue(which)
    want, plain = plain_run(model, PROMPT, 40, exit_threshold=1.0)
    stats = PipelineStats()
    got, piped = piped_run(model, PROMPT, 40, k, compiled, stats, exit_threshold=1.0)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    assert_same_caches(piped, plain)
    assert stats.tokens == 39
    # every token runs at most its 4 steps after the one before it
    assert stats.ticks <= 4 * 39 + 4


@pytest.mark.parametrize("loop", [dict(exit_at_step=2), dict(ut_steps=3, exit_threshold=1.0)])
def test_shallower_depths_are_identical(agreeing, loop):
    """exit_at_step: the deeper, skipped steps' caches get copies of the last run
    step's K/V, as on the plain path; ut_steps 3: a three-row pipeline."""
    want, plain = plain_run(agreeing, PROMPT, 24, **loop)
    got, piped = piped_run(agreeing, PROMPT, 24, 1, **loop)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert_same_caches(piped, plain)


def test_agreeing_steps_take_fewer_passes_than_plain(agreeing):
    """Where early readouts agree with the last step, tokens overlap in the pipeline:
    fewer passes per token than plain decoding's 4, with drafts both kept and
    dropped (more than one pass per token)."""
    stats = PipelineStats()
    piped_run(agreeing, PROMPT, 60, 1, stats=stats, exit_threshold=1.0)
    assert 1.0 < stats.ticks_per_token < 3.5


def test_bundled_model_is_identical(bundled):
    model, tok = bundled
    prompt = mx.array(encode_text(tok, "2,23,14,31 -> ="), dtype=mx.int32)
    want, plain = plain_run(model, prompt, 40, exit_threshold=1.0)
    for k in (1, 3):
        stats = PipelineStats()
        got, piped = piped_run(model, prompt, 40, k, compiled=k == 3, stats=stats,
                               exit_threshold=1.0)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert_same_caches(piped, plain)
        assert stats.ticks_per_token < 4


def test_buffers_grow_across_chunks(agreeing, monkeypatch):
    """Chunks of 8 positions: the buffers grow (and compiled ticks are traced again)
    many times over a generation; tokens and caches stay identical."""
    monkeypatch.setattr(pipeline, "CHUNK", 8)
    want, plain = plain_run(agreeing, PROMPT, 50, exit_threshold=1.0)
    for compiled in (False, True):
        got, piped = piped_run(agreeing, PROMPT, 50, 1, compiled, exit_threshold=1.0)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert_same_caches(piped, plain)


def test_closing_early_leaves_the_handed_out_prefix(agreeing):
    """Stopped after 9 tokens (as at an eos): the cache holds the prompt and the first
    8 tokens, each equal to what plain decoding cached for them."""
    rule = make_rule(agreeing, exit_threshold=1.0)
    want, plain = plain_run(agreeing, PROMPT, 9, exit_threshold=1.0)
    cache = agreeing.make_cache()
    gen = pipelined_step(PROMPT, agreeing, rule, cache, draft_loops=1, max_tokens=100,
                         adaptive=False)
    got = [next(gen)[0] for _ in range(9)]
    gen.close()
    assert got == [t for t, _ in want]
    assert cache[0][0].offset == PROMPT.size + 8
    assert_same_caches(cache, plain)


def test_a_prompt_cache_continues(agreeing):
    """A second turn on the cache the first left: same tokens as plain decoding."""
    tok = IdsOnly()
    caches = []
    outs = []
    for opts in (dict(), dict(pipeline=True, compile_step=True)):
        cache = agreeing.make_cache()
        out = []
        for prompt in ([5, 17, 300], [42, 7]):
            out.append([r.token for r in stream_generate(
                agreeing, tok, prompt, max_tokens=12, exit_threshold=1.0,
                prompt_cache=cache, **opts)])
        outs.append(out)
        caches.append(cache)
    assert outs[0] == outs[1]
    assert_same_caches(caches[1], caches[0])


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("pipe_cost,plain_cost", [(1.0, 1.0), (0.1, 1.0)])
def test_adaptive_follows_measured_speed(agreeing, monkeypatch, compiled, pipe_cost,
                                         plain_cost):
    """A clock on which a pass costs ``pipe_cost`` and a plain token ``plain_cost``:
    passes as dear as plain tokens make the pipeline slower (over one pass per
    token), so plain decoding takes over after each probe; cheap passes keep it.
    Either way, plain decoding's tokens and caches."""
    from ouro_mlx.decoding import compiled as compiled_mod

    agreeing.__dict__.pop("_ouro_pipeline", None)  # no verdict from an earlier test
    now = [0.0]
    monkeypatch.setattr(pipeline, "clock", lambda: now[0])
    tick, dec, step = (pipeline.PipelinedDecoder.tick, pipeline.decode,
                       compiled_mod.CompiledDecoder.__call__)

    def cost(fn, seconds):
        def timed(*a, **kw):
            now[0] += seconds
            return fn(*a, **kw)
        return timed

    monkeypatch.setattr(pipeline.PipelinedDecoder, "tick", cost(tick, pipe_cost))
    monkeypatch.setattr(pipeline, "decode", cost(dec, plain_cost))
    monkeypatch.setattr(compiled_mod.CompiledDecoder, "__call__", cost(step, plain_cost))
    want, plain = plain_run(agreeing, PROMPT, 120, exit_threshold=1.0)
    stats = PipelineStats()
    got, piped = piped_run(agreeing, PROMPT, 120, 1, compiled, stats, adaptive=True,
                           exit_threshold=1.0)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert_same_caches(piped, plain)
    assert stats.tokens + stats.plain_tokens == 119
    if pipe_cost == plain_cost:  # 15 plain, a probe of 16, 32 plain, a probe, 40 plain
        assert stats.tokens == 2 * pipeline.PROBE_TOKENS
    else:
        assert stats.plain_tokens == pipeline.PROBE_TOKENS - 1
    # the verdict is kept with the model: the next generation does not probe again
    stats = PipelineStats()
    got, _ = piped_run(agreeing, PROMPT, 20, 1, compiled, stats, adaptive=True,
                       exit_threshold=1.0)
    assert [t for t, _ in got] == [t for t, _ in want[:20]]
    if pipe_cost == plain_cost:  # 24 of the 64 plain tokens were left: all plain
        assert (stats.tokens, stats.plain_tokens) == (0, 19)
    else:
        assert (stats.tokens, stats.plain_tokens) == (19, 0)


def test_compiled_greedy_graph_is_kept_with_the_model(tiny):
    rule = make_rule(tiny, exit_threshold=1.0)
    list(pipelined_step(PROMPT, tiny, rule, tiny.make_cache(), draft_loops=2, max_tokens=4,
                        compile_step=True, adaptive=False))
    fn = tiny._ouro_compiled[("pipeline", 4, 2)]
    list(pipelined_step(PROMPT, tiny, rule, tiny.make_cache(), draft_loops=2, max_tokens=4,
                        compile_step=True, adaptive=False))
    assert tiny._ouro_compiled[("pipeline", 4, 2)] is fn


def test_sampling_keeps_the_target_distribution():
    """Vocabulary of 4, depth 2, drafts from step 0: the empirical distribution of
    (t2, t3) — t3's row entered on a draft that was kept or dropped — matches the
    exact one."""
    stats = PipelineStats()
    sampler = lambda x: mx.random.categorical(x)  # noqa: E731

    def run(model, prompt):
        return [t for t, _, _ in pipelined_step(
            prompt, model, make_rule(model), model.make_cache(), draft_loops=1,
            max_tokens=3, sampler=sampler, adaptive=False, stats=stats)]

    assert_pairs_follow_the_target(run)
    assert 1.0 < stats.ticks_per_token < 2.0  # drafts kept and dropped


def test_compiled_sampling_draws_like_uncompiled(agreeing):
    """With a sampler the compiled tick carries the random state: the same seed gives
    the same tokens as the uncompiled pipeline."""
    from mlx_lm.sample_utils import make_sampler

    rule = make_rule(agreeing, exit_threshold=1.0)
    runs = []
    for compiled in (False, True):
        mx.random.seed(11)
        runs.append([t for t, _, _ in pipelined_step(
            PROMPT, agreeing, rule, agreeing.make_cache(), draft_loops=1, max_tokens=20,
            sampler=make_sampler(temp=0.8), compile_step=compiled, adaptive=False)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("opts,message", [
    (dict(exit_threshold=0.5), "fixed depth"),
    (dict(exit_threshold=1.0, kv_mode="last"), "kv_mode 'full'"),
    (dict(exit_threshold=1.0, kv_bits=8), "no kv_bits"),
    (dict(exit_threshold=1.0, draft_loops=4), "draft_loops must be"),
    (dict(exit_threshold=1.0, num_draft_tokens=2), "num_draft_tokens does not apply"),
    (dict(exit_threshold=1.0, logits_processors=[lambda t, x: x]), "logits processors"),
])
def test_refusals(small_dir, opts, message):
    model, _ = ouro_mlx.load(small_dir)
    with pytest.raises(ValueError, match=message):
        list(stream_generate(model, IdsOnly(), [5, 17], max_tokens=4, pipeline=True,
                             **opts))


def test_per_loop_adapters_are_refused(tiny):
    from ouro_mlx.adapters import LoopLoRALinear  # noqa: F401  (the class the check names)

    rule = make_rule(tiny, exit_threshold=1.0)
    layer = tiny.model.layers[0].self_attn
    layer.loop_keys = frozenset({"q_proj"})
    try:
        with pytest.raises(ValueError, match="per-loop adapters"):
            pipeline.check_pipeline(tiny, rule, tiny.make_cache(), 1)
    finally:
        del layer.loop_keys
