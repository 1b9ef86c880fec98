"""Self-speculative decoding (ouro_mlx.decoding.speculative): greedy output identical to plain
decoding at the same fixed depth, caches identical after rollback, the sampling
distribution equal to the target's, and clear refusals."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

import ouro_mlx
from ouro_mlx import stream_generate
from ouro_mlx.decoding.plain import generate_step
from ouro_mlx.decoding.steps import make_rule
from ouro_mlx.decoding import speculative
from ouro_mlx.decoding.speculative import SpecStats, speculative_step
from tests.conftest import (REFERENCE, IdsOnly, assert_pairs_follow_the_target,
                            needs_reference)

PROMPT = [5, 17, 300, 42, 7, 99, 128]


def tokens(model, tok, prompt, n, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, **kw)]


@pytest.mark.parametrize("k,n", [(1, 1), (1, 4), (2, 3), (3, 2), (3, 8)])
def test_bundled_greedy_is_identical(bundled, k, n):
    model, tok = bundled
    prompt = "Once upon a time"
    want = tokens(model, tok, prompt, 40, exit_threshold=1.0)  # its default exits early
    assert tokens(model, tok, prompt, 40, exit_threshold=1.0, draft_loops=k,
                  num_draft_tokens=n) == want


@pytest.mark.parametrize("opts", [dict(), dict(exit_at_step=2), dict(ut_steps=3)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_tiny_greedy_and_caches_are_identical(tiny, opts, adaptive):
    """Same tokens, and after a "length" finish the same cache in every loop step
    (rejected tokens rolled back; skipped steps hold copies of the exit step's K/V)."""
    rule = make_rule(tiny, **opts)
    ids = mx.array(PROMPT, dtype=mx.int32)
    plain_cache = tiny.make_cache(rule.ut_steps)
    want = [t for t, _, _ in generate_step(ids, tiny, rule, plain_cache, max_tokens=40)]
    for k in range(1, rule.fixed_loops):
        cache, stats = tiny.make_cache(rule.ut_steps), SpecStats()
        got = list(speculative_step(ids, tiny, rule, cache, draft_loops=k, num_draft_tokens=5,
                                    adaptive=adaptive, max_tokens=40, stats=stats))
        assert [t for t, _, _ in got] == want
        assert {loops for _, _, loops in got} == {rule.fixed_loops}
        assert (stats.rounds > 0 or adaptive) and 0 <= stats.accepted <= stats.drafted
        for lc, plc in zip(cache, plain_cache):
            for c, pc in zip(lc.caches, plc.caches):
                assert c.offset == pc.offset
                for a, b in zip(c.state, pc.state):
                    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


@pytest.mark.parametrize("opts", [dict(), dict(exit_at_step=2), dict(ut_steps=3)])
def test_compiled_rounds_give_the_same_tokens_and_caches(tiny, opts):
    """compile_step: drafts, verify calls and plain stretches through compiled graphs,
    rollback by offset; tokens, logprobs and (after sync) every step's cache as plain
    decoding leaves them."""
    rule = make_rule(tiny, **opts)
    ids = mx.array(PROMPT, dtype=mx.int32)
    plain_cache = tiny.make_cache(rule.ut_steps)
    want = list(generate_step(ids, tiny, rule, plain_cache, max_tokens=40))
    for k in range(1, rule.fixed_loops):
        for adaptive in (False, True):
            cache, stats = tiny.make_cache(rule.ut_steps), SpecStats()
            got = list(speculative_step(ids, tiny, rule, cache, draft_loops=k,
                                        num_draft_tokens=5, adaptive=adaptive, max_tokens=40,
                                        stats=stats, compile_step=True))
            assert [t for t, _, _ in got] == [t for t, _, _ in want]
            for (_, a, _), (_, b, _) in zip(got, want):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
            for lc, plc in zip(cache, plain_cache):
                for c, pc in zip(lc.caches, plc.caches):
                    assert c.offset == pc.offset
                    n = c.offset
                    for a, b in zip(c.state[:2], pc.state[:2]):
                        np.testing.assert_allclose(np.array(a[:, :, :n]),
                                                   np.array(b[:, :, :n]), atol=1e-5)


@pytest.mark.parametrize("k,n", [(1, 4), (2, 3), (3, 8)])
def test_bundled_fixed_n_greedy_is_identical(bundled, k, n):
    """Fixed n (adaptive n does not speculate on this model): rounds with accepted
    and rejected drafts, plain and through compiled graphs."""
    model, tok = bundled
    rule = make_rule(model, exit_threshold=1.0)
    ids = mx.array(tok.encode("Once upon a time"), dtype=mx.int32)
    want = [t for t, _, _ in generate_step(ids, model, rule, model.make_cache(), max_tokens=40)]
    for compiled in (False, True):
        stats = SpecStats()
        got = [t for t, _, _ in speculative_step(ids, model, rule, model.make_cache(),
                                                 draft_loops=k, num_draft_tokens=n,
                                                 adaptive=False, max_tokens=40, stats=stats,
                                                 compile_step=compiled)]
        assert got == want and 0 < stats.accepted < stats.drafted


def test_compiled_rounds_across_a_growing_buffer(tiny):
    """Chunk of 8 positions: rounds that straddle a chunk boundary grow the buffers
    (new traces), and rollback across the boundary keeps the right tokens."""
    from ouro_mlx.decoding.compiled import CompiledDecoder

    rule = make_rule(tiny)
    plain = tiny.make_cache()
    spec = tiny.make_cache()
    ids = mx.array([PROMPT])
    tiny(ids, plain)
    tiny(ids, spec)
    dec = CompiledDecoder(tiny, spec, rule.fixed_loops, chunk=8)
    y = mx.array([3])
    for i in range(6):
        drafts, logits = dec.draft_and_verify(y, 2, 4)
        block = mx.concatenate([y, drafts])  # the plain path decodes the same block
        want = [tiny(block[None, j:j + 1], plain)[:, -1] for j in range(5)]
        np.testing.assert_allclose(np.array(logits), np.array(mx.concatenate(want)),
                                   atol=1e-4)
        for c in plain:  # keep 2 of the 5 positions on both sides
            for s in c.caches:
                s.trim(3)
        dec.rollback(3)
        y = mx.argmax(want[1], axis=-1)
    assert dec.offset == len(PROMPT) + 12 and dec.buffers[0][0][0].shape[2] == 24
    dec.sync()
    for pc, sc in zip(plain, spec):
        for a, b in zip(pc.caches, sc.caches):
            assert a.offset == b.offset
            for x, z in zip(a.keys_and_values(), b.keys_and_values()):
                np.testing.assert_allclose(np.array(x), np.array(z), atol=1e-5)


def test_compiled_graphs_are_kept_across_generations(tiny):
    """A second generation replays the graphs traced by the first (kept on the model),
    and a deep copy of the model starts without them."""
    import copy

    from ouro_mlx.decoding.compiled import _graph

    rule = make_rule(tiny)
    ids = mx.array(PROMPT, dtype=mx.int32)
    list(speculative_step(ids, tiny, rule, tiny.make_cache(), draft_loops=2, max_tokens=6,
                          compile_step=True))
    graphs = dict(tiny._ouro_compiled)
    assert {key[0] for key in graphs} >= {"token", "draft", "verify"}
    list(speculative_step(ids, tiny, rule, tiny.make_cache(), draft_loops=2, max_tokens=6,
                          compile_step=True))
    assert all(tiny._ouro_compiled[key] is fn for key, fn in graphs.items())
    assert _graph(tiny, next(iter(graphs)), None) is graphs[next(iter(graphs))]
    assert not copy.deepcopy(tiny)._ouro_compiled
    assert "_ouro_compiled" not in dict(tiny.parameters())


def test_adaptive_n_never_speculates_on_poor_drafts(tiny):
    """A random model's early steps almost never agree with its last: the shadow
    drafts of plain decoding show it, so no round is ever paid for."""
    rule = make_rule(tiny)
    ids = mx.array(PROMPT, dtype=mx.int32)
    want = [t for t, _, _ in generate_step(ids, tiny, rule, tiny.make_cache(), max_tokens=60)]
    for compiled in (False, True):
        stats = SpecStats()
        got = [t for t, _, _ in speculative_step(ids, tiny, rule, tiny.make_cache(),
                                                 draft_loops=1, num_draft_tokens=5,
                                                 max_tokens=60, stats=stats,
                                                 compile_step=compiled)]
        assert got == want and stats.rounds == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_adaptive_n_speculates_when_drafts_agree(agreeing, compiled, monkeypatch):
    """Drafts that agree often: after the first plain stretch, rounds run with
    several drafts, some rejected; tokens and caches stay those of plain decoding.
    (A stopped clock: the measured-speed check never backs off here.)"""
    monkeypatch.setattr(speculative, "clock", lambda: 0.0)
    rule = make_rule(agreeing)
    ids = mx.array(PROMPT, dtype=mx.int32)
    plain_cache = agreeing.make_cache()
    want = [t for t, _, _ in generate_step(ids, agreeing, rule, plain_cache, max_tokens=60)]
    for k in (1, 2, 3):
        cache, stats = agreeing.make_cache(), SpecStats()
        got = [t for t, _, _ in speculative_step(ids, agreeing, rule, cache, draft_loops=k,
                                                 num_draft_tokens=6, max_tokens=60,
                                                 stats=stats, compile_step=compiled)]
        assert got == want
        assert stats.rounds > 0 and 0 < stats.accepted < stats.drafted, (k, stats)
        assert stats.drafted > stats.rounds  # n grew past one draft
        for lc, plc in zip(cache, plain_cache):
            for c, pc in zip(lc.caches, plc.caches):
                assert c.offset == pc.offset


def test_rounds_measured_slower_than_plain_back_off(agreeing, monkeypatch):
    """Whatever the cost model promises, rounds that take longer per token than plain
    decoding (here: a clock on which every round takes a second) stop after
    CHECK_ROUNDS, for BACKOFF_TOKENS plain tokens, then twice as many."""
    now = [0.0]
    real_round = speculative.draft_and_verify

    def slow_round(*a, **kw):
        now[0] += 1.0
        return real_round(*a, **kw)

    monkeypatch.setattr(speculative, "clock", lambda: now[0])
    monkeypatch.setattr(speculative, "draft_and_verify", slow_round)
    rule = make_rule(agreeing)
    ids = mx.array(PROMPT, dtype=mx.int32)
    want = [t for t, _, _ in generate_step(ids, agreeing, rule, agreeing.make_cache(),
                                           max_tokens=120)]
    stats = SpecStats()
    got = [t for t, _, _ in speculative_step(ids, agreeing, rule, agreeing.make_cache(),
                                             draft_loops=1, num_draft_tokens=6,
                                             max_tokens=120, stats=stats)]
    assert got == want
    # 8 plain, 4 rounds, 32 plain, 4 rounds, 64 plain: the rest
    assert stats.rounds == 2 * speculative.CHECK_ROUNDS


def test_draft_count_follows_the_cost_model():
    from ouro_mlx.decoding.speculative import draft_count

    assert draft_count(0.0, 1, 4, 8) == 0
    assert draft_count(1.0, 1, 4, 8) == 8  # every draft accepted: the most
    assert draft_count(0.14, 1, 4, 8) == 0  # the bundled model's step-1 drafts
    assert draft_count(0.8, 3, 4, 8) == 0  # at most 1/4 of the steps to save: < 1.1x
    assert 2 <= draft_count(0.7, 1, 4, 8) < 8  # pays, with a bounded block


def test_drafts_are_accepted_and_rejected(bundled):
    """The bundled model's drafts are good but not perfect: both paths are exercised."""
    model, _ = bundled
    rule = make_rule(model, exit_threshold=1.0)
    stats = SpecStats()
    ids = mx.array([5, 6, 7, 8], dtype=mx.int32)
    list(speculative_step(ids, model, rule, model.make_cache(), draft_loops=2,
                          num_draft_tokens=4, adaptive=False, max_tokens=40, stats=stats))
    assert 0 < stats.accepted < stats.drafted


def test_logprobs_match_plain(tiny):
    rule = make_rule(tiny)
    ids = mx.array(PROMPT, dtype=mx.int32)
    want = [lp for _, lp, _ in generate_step(ids, tiny, rule, tiny.make_cache(), max_tokens=8)]
    got = [lp for _, lp, _ in speculative_step(ids, tiny, rule, tiny.make_cache(),
                                               draft_loops=2, max_tokens=8)]
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


@needs_reference
@pytest.mark.parametrize("k", [1, 2, 3])
def test_fixture_a_greedy_is_identical(k):
    ref = dict(np.load(REFERENCE / "expected.npz"))
    model = ouro_mlx.load_model(REFERENCE)
    prompt = ref["input_ids"][0].tolist()
    want = ref["generated_ids"][0, len(prompt):].tolist()
    assert tokens(model, IdsOnly(), prompt, len(want), draft_loops=k,
                  num_draft_tokens=3) == want


def test_sampling_keeps_the_target_distribution():
    """Vocabulary of 4, depth 2, drafts from step 0: the empirical distribution of
    (t2, t3), which the accept/reject path decides, matches the exact one."""
    stats = SpecStats()
    sampler = lambda x: mx.random.categorical(x)  # noqa: E731

    def run(model, prompt):
        return [t for t, _, _ in speculative_step(
            prompt, model, make_rule(model), model.make_cache(), draft_loops=1,
            num_draft_tokens=2, adaptive=False, max_tokens=3, sampler=sampler, stats=stats)]

    assert_pairs_follow_the_target(run)
    assert 0.1 < stats.acceptance < 0.9


@pytest.mark.parametrize("opts,message", [
    (dict(draft_loops=1, exit_threshold=0.5), "fixed depth"),
    (dict(draft_loops=1, hidden_eps=0.1), "fixed depth"),
    (dict(draft_loops=1, kv_mode="last"), "kv_mode 'full'"),
    (dict(draft_loops=4), "draft_loops must be"),
    (dict(draft_loops=0), "draft_loops must be"),
    (dict(draft_loops=2, exit_at_step=1), "draft_loops must be"),
    (dict(draft_loops=1, num_draft_tokens=0), "num_draft_tokens must be"),
    (dict(draft_loops=1, num_draft_tokens=65), "num_draft_tokens must be"),
    (dict(draft_loops=1, logits_processors=[lambda t, x: x]), "logits processors"),
])
def test_refusals(tiny, opts, message):
    with pytest.raises(ValueError, match=message):
        tokens(tiny, IdsOnly(), PROMPT, 4, **opts)


def test_cli_generate_draft_loops(tiny_dir, capsys):
    from ouro_mlx.commands.generate import main

    base = ["--model", str(tiny_dir), "-p", "The capital", "-m", "12", "--no-chat-template",
            "--exit-threshold", "1.0"]
    assert main(base) == 0
    want = capsys.readouterr().out
    assert main(base + ["--draft-loops", "2", "--num-draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == want
    assert main(base + ["--draft-loops", "2", "--compile-step"]) == 0
    assert capsys.readouterr().out == want
    for flags in (["--pipeline"], ["--pipeline", "--draft-loops", "2", "--compile-step"]):
        assert main(base + flags) == 0
        assert capsys.readouterr().out == want, flags


@pytest.mark.parametrize("flags,message", [
    (["--num-draft-tokens", "3"], "--num-draft-tokens needs --draft-loops"),
    (["--draft-loops", "0"], "--draft-loops must be >= 1"),
    (["--draft-loops", "1", "--num-draft-tokens", "0"], "--num-draft-tokens must be in"),
    (["--draft-loops", "1", "--repetition-penalty", "1.2"], "--repetition-penalty"),
    (["--draft-loops", "1", "--kv-mode", "last"], "--kv-mode full"),
    (["--draft-loops", "1", "--exit-threshold", "0.5"], "fixed depth"),
    (["--pipeline", "--num-draft-tokens", "2"],
     "--num-draft-tokens cannot be combined with --pipeline"),
    (["--pipeline", "--draft-loops", "0"], "--draft-loops must be >= 1"),
    (["--pipeline", "--repetition-penalty", "1.2"], "--pipeline cannot be combined with "
                                                    "--repetition-penalty"),
    (["--pipeline", "--kv-mode", "last"], "--pipeline needs --kv-mode full"),
    (["--pipeline", "--kv-bits", "8"], "--pipeline cannot be combined with --kv-bits"),
    (["--pipeline", "--exit-threshold", "0.5"], "needs a fixed depth"),
    (["--pipeline", "--draft-loops", "4", "--exit-threshold", "1.0"], r"\[1, 4\)"),
])
def test_cli_generate_draft_loops_refusals(tiny_dir, flags, message):
    from ouro_mlx.commands.generate import main

    with pytest.raises(ValueError, match=message):
        main(["--model", str(tiny_dir), "-p", "x", "-m", "4", *flags])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_greedy_is_identical(small_dir, bits):
    """Rollback trims quantized caches too (step-2 drafts of this model are accepted
    sometimes, so both paths run)."""
    model, _ = ouro_mlx.load(small_dir)
    rule = make_rule(model, exit_at_step=2)
    ids = mx.array(PROMPT, dtype=mx.int32)
    want = [t for t, _, _ in generate_step(ids, model, rule,
                                           model.make_cache(rule.ut_steps, kv_bits=bits),
                                           max_tokens=30)]
    stats = SpecStats()
    got = [t for t, _, _ in speculative_step(ids, model, rule,
                                             model.make_cache(rule.ut_steps, kv_bits=bits),
                                             draft_loops=2, num_draft_tokens=4, adaptive=False,
                                             max_tokens=30, stats=stats)]
    assert got == want and stats.accepted > 0


def test_compiled_rounds_refuse_a_quantized_cache(small_dir):
    model, _ = ouro_mlx.load(small_dir)
    with pytest.raises(ValueError, match="no kv_bits"):
        tokens(model, IdsOnly(), PROMPT, 4, exit_threshold=1.0, draft_loops=1,
               compile_step=True, kv_bits=8)


def test_mlx_lm_draft_model_runs_with_ouro(tiny_dir, tmp_path):
    """mlx-lm's own speculative path splits the prompt cache at len(model.layers):
    an Ouro cache has one CacheList per physical layer (all loop steps inside), so
    the split is right and the output is mlx-lm's plain output, token for token."""
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import stream_generate as mlx_stream

    from ouro_mlx.convert import hf_to_mlx

    hf_to_mlx(tiny_dir, tmp_path / "m")
    model, tok = mlx_load(str(tmp_path / "m"))
    draft, _ = mlx_load(str(tmp_path / "m"))
    prompt = [5, 17, 300, 42, 7]
    want = [r.token for r in mlx_stream(model, tok, prompt, max_tokens=16)]
    for steps, accepted in ((4, True), (1, False)):  # an exact draft; a rejected one
        draft.ut_steps = steps
        rs = list(mlx_stream(model, tok, prompt, max_tokens=16, draft_model=draft,
                             num_draft_tokens=3))
        assert [r.token for r in rs] == want
        assert any(r.from_draft for r in rs) == accepted


def test_bench_rows(tmp_path, capsys):
    from ouro_mlx.commands import bench as cmd

    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "8", "--exits", "", "--no-peer", "--no-fixed",
                     "--draft-loops", "1,3", "--num-draft-tokens", "2",
                     "--json-out", str(out)]) == 0
    names = [r["name"] for r in json.loads(out.read_text())["runs"]["float32"]["ouro"]]
    assert re.fullmatch(r"ouro draft 1 loop, (\d+% kept|no drafts)", names[1])
    assert re.fullmatch(r"ouro draft 3 loops, (\d+% kept|no drafts)", names[2])
    with pytest.raises(ValueError, match="--draft-loops takes a comma list"):
        cmd.main(["--random", "tiny", "--draft-loops", "x"])
    with pytest.raises(ValueError, match="--num-draft-tokens needs --draft-loops"):
        cmd.main(["--random", "tiny", "--num-draft-tokens", "2"])


def test_mlx_lm_samplers_filter_each_verified_row(tiny):
    """A verify call samples n + 1 rows at once: mlx-lm's filters work per row, so
    with top_k 1 sampling is greedy and gives the greedy tokens."""
    from mlx_lm.sample_utils import make_sampler

    want = tokens(tiny, IdsOnly(), PROMPT, 20, draft_loops=1)
    sampler = make_sampler(temp=0.9, top_k=1, top_p=0.95, min_p=0.01)
    assert tokens(tiny, IdsOnly(), PROMPT, 20, draft_loops=2, num_draft_tokens=3,
                  sampler=sampler) == want


def test_bench_reports_draft_rows_plain_and_compiled(tmp_path, capsys):
    from ouro_mlx.commands import bench as cmd

    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "8", "--exits", "", "--no-fixed", "--repeats", "1",
                     "--compile-step", "--draft-loops", "1,2", "--json-out", str(out)]) == 0
    names = [r["name"] for r in json.loads(out.read_text())["runs"]["float32"]["ouro"]]
    for k in (1, 2):
        assert any(re.fullmatch(rf"ouro draft {k} loops?, (\d+% kept|no drafts)", n)
                   for n in names)
        assert any(re.fullmatch(rf"ouro draft {k} loops? compiled, (\d+% kept|no drafts)",
                                n) for n in names)
    assert "ouro draft 2 loops compiled" in capsys.readouterr().out


def test_bench_reports_pipeline_rows(tmp_path, capsys):
    from ouro_mlx.commands import bench as cmd

    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "8", "--exits", "", "--no-fixed", "--repeats", "1",
                     "--compile-step", "--pipeline", "--json-out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"]["float32"]
    names = [r["name"] for r in run["ouro"]]
    for name in ("ouro T=4 pipeline k=1", "ouro T=4 pipeline k=1 compiled"):
        assert any(re.fullmatch(re.escape(name) + r", (\d+\.\d\d passes/tok"
                                r"(, \d+ plain)?|all plain)", n) for n in names)
        assert run["summary"][f"{name}: decode speed-up over full depth"] > 0
    assert not any(n.startswith("ouro draft") for n in names)
    assert "ouro T=4 pipeline k=1 compiled" in capsys.readouterr().out
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "8", "--exits", "", "--no-fixed", "--no-peer",
                     "--pipeline", "--draft-loops", "2,3", "--json-out", str(out)]) == 0
    names = [r["name"] for r in json.loads(out.read_text())["runs"]["float32"]["ouro"]]
    for k in (2, 3):
        assert any(n.startswith(f"ouro T=4 pipeline k={k}, ") for n in names)
        assert any(re.fullmatch(rf"ouro draft {k} loops?, (\d+% kept|no drafts)", n)
                   for n in names)
    with pytest.raises(ValueError, match="--pipeline cannot be combined with --kv-bits"):
        cmd.main(["--random", "tiny", "--pipeline", "--kv-bits", "8"])


def test_compiled_rounds_sample_like_plain_rounds(agreeing):
    """With sampling, the compiled rounds call the sampler on the same logits in the
    same order as the plain ones: one seed, the same tokens (the distribution test
    above covers the plain rounds)."""
    from mlx_lm.sample_utils import make_sampler

    rule = make_rule(agreeing)
    ids = mx.array(PROMPT, dtype=mx.int32)
    runs = []
    for compiled in (False, True):
        mx.random.seed(3)
        stats = SpecStats()
        runs.append([t for t, _, _ in speculative_step(
            ids, agreeing, rule, agreeing.make_cache(), draft_loops=1, num_draft_tokens=4,
            adaptive=False, max_tokens=40, sampler=make_sampler(temp=0.8), stats=stats,
            compile_step=compiled)])
        assert 0 < stats.accepted < stats.drafted
    assert runs[0] == runs[1]
