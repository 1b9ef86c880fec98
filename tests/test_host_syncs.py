"""Host syncs per decoded token on every decoding path (issue 20 §2).

On an accelerator every read of a device value stalls the device until the host has
caught up, so the decoding loops read at most once per emitted token at a fixed
depth, and an adaptive exit reads its decisions one step behind the device. Every way
of syncing (``item``, ``tolist``, truth tests and conversions of arrays, ``mx.eval``,
``mx.synchronize``) is counted while tokens are generated, so a new sync cannot creep
into a loop unseen on a CPU. Tokens and loop counts are compared across the paths.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from ouro_mlx import batch_generate, stream_generate
from ouro_mlx.decoding.pipeline import PipelineStats, pipelined_step
from ouro_mlx.decoding.speculative import speculative_step
from ouro_mlx.decoding.steps import make_rule

from .conftest import IdsOnly

N = 32
PROMPT = [4, 34, 12, 23]  # the README's demo prompt: the depths vary


class SyncCounter:
    """Counts host syncs while active (``with counter:``)."""

    def __init__(self, monkeypatch):
        self.count = 0
        self.on = False
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(mx.array, name, self._counted(getattr(mx.array, name)))
        for name in ("eval", "synchronize"):
            monkeypatch.setattr(mx, name, self._counted(getattr(mx, name)))

    def _counted(self, fn):
        def counted(*args, **kwargs):
            if self.on:
                self.count += 1
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        self.count, self.on = 0, True
        return self

    def __exit__(self, *exc):
        self.on = False


@pytest.fixture
def syncs(monkeypatch):
    return SyncCounter(monkeypatch)


def run(model, syncs, **opts):
    """Greedy tokens, loops and syncs per token of ``stream_generate``."""
    with syncs:
        out = [(r.token, r.loops) for r in stream_generate(model, IdsOnly(), PROMPT,
                                                           max_tokens=N, **opts)]
    assert len(out) == N
    return [t for t, _ in out], [n for _, n in out], syncs.count / N


@pytest.fixture(scope="module", params=["bundled", "random 4-layer hidden-256"])
def model(request, small_dir):
    import ouro_mlx
    from ouro_mlx import demo

    path = demo.model_path() if request.param == "bundled" else small_dir
    return ouro_mlx.load(path)[0]


@pytest.fixture
def q(model):
    """An exit threshold at which the model's depths vary on PROMPT."""
    return 0.9 if model.args.hidden_size != 256 else 0.5


def test_fixed_depth_reads_once_per_token(model, syncs):
    plain = run(model, syncs, exit_threshold=1.0)
    assert plain[2] == 1.0 and set(plain[1]) == {4}
    compiled = run(model, syncs, exit_threshold=1.0, compile_step=True)
    assert compiled[:2] == plain[:2] and compiled[2] == 1.0
    shallow = run(model, syncs, exit_at_step=1)
    assert shallow[2] == 1.0 and set(shallow[1]) == {2}


@pytest.mark.parametrize("lookahead", ["0", "1"])
def test_adaptive_reads_a_decision_per_step_that_may_stop(model, q, syncs, monkeypatch,
                                                          lookahead):
    """One read per loop step after which the token may stop (the last step is
    forced) and one of the token itself, read while the next token's first step
    runs. With lookahead the same tokens and depths."""
    monkeypatch.setenv("OURO_MLX_LOOKAHEAD", lookahead)
    tokens, loops, per_token = run(model, syncs, exit_threshold=q)
    monkeypatch.setenv("OURO_MLX_LOOKAHEAD", "0" if lookahead == "1" else "1")
    assert run(model, syncs, exit_threshold=q)[:2] == (tokens, loops)
    decisions = sum(min(n, 3) for n in loops[1:])  # token 0's depth came with the prefill
    assert per_token * N == decisions + N + 1  # + the tokens, + the prompt's depth
    assert per_token <= sum(loops) / N + 1 + 1 / N
    assert len(set(loops)) > 1


@pytest.mark.parametrize("kv_mode", ["full", "last"])
def test_lookahead_leaves_the_same_cache(model, q, monkeypatch, kv_mode):
    """The step run ahead of a stopping decision is undone: the caches after an
    adaptive generation are identical with and without lookahead."""
    from ouro_mlx.generation import stream_generate as sg

    states = []
    for lookahead in ("0", "1"):
        monkeypatch.setenv("OURO_MLX_LOOKAHEAD", lookahead)
        cache = model.make_cache(kv_mode=kv_mode)
        out = [(r.token, r.loops) for r in sg(model, IdsOnly(), PROMPT, max_tokens=N,
                                              exit_threshold=q, prompt_cache=cache)]
        states.append((out, [[(c.offset, c.keys[..., :c.offset, :], c.values[..., :c.offset, :])
                              for c in lc.caches] for lc in cache]))
    (out0, c0), (out1, c1) = states
    assert out0 == out1 and len({n for _, n in out0}) > 1  # the depths vary
    for l0, l1 in zip(c0, c1):
        for (o0, k0, v0), (o1, k1, v1) in zip(l0, l1):
            assert o0 == o1
            assert mx.array_equal(k0, k1) and mx.array_equal(v0, v1)


def test_speculative_reads_once_per_round(model, syncs):
    """Forced rounds of 2 drafts: one read per round, so at most one per token."""
    rule = make_rule(model, exit_threshold=1.0)
    ids = mx.array(PROMPT, dtype=mx.int32)
    with syncs:
        got = list(speculative_step(ids, model, rule, model.make_cache(), draft_loops=1,
                                    num_draft_tokens=2, adaptive=False, max_tokens=N))
    assert [t for t, _, _ in got] == run(model, syncs, exit_threshold=1.0)[0]
    assert syncs.count <= N


@pytest.mark.parametrize("compiled", [False, True])
def test_pipeline_reads_at_most_once_per_token(model, syncs, compiled):
    rule = make_rule(model, exit_threshold=1.0)
    ids = mx.array(PROMPT, dtype=mx.int32)
    stats = PipelineStats()
    with syncs:
        got = list(pipelined_step(ids, model, rule, model.make_cache(), max_tokens=N,
                                  adaptive=False, stats=stats, compile_step=compiled))
    assert [t for t, _, _ in got] == run(model, syncs, exit_threshold=1.0)[0]
    assert stats.ticks_per_token > 1  # passes were thrown away, yet
    assert syncs.count <= N


class Ids(IdsOnly):
    def decode(self, ids):
        return ""


def test_batch_reads_once_per_token_at_a_fixed_depth(model, syncs):
    prompts = [PROMPT, PROMPT[:3]]
    with syncs:
        out = batch_generate(model, Ids(), prompts, max_tokens=N, exit_threshold=1.0)
    assert syncs.count <= N + 2  # + the prompts' encoding
    assert out.tokens[0] == run(model, syncs, exit_threshold=1.0)[0]


def test_batch_of_different_fixed_depths_reads_once_per_token(model, syncs):
    """Rows at depths 1, 2 and 4 in one batch: the host knows when each stops, so a
    token still costs one read (the tokens), not one per loop step."""
    from ouro_mlx.generation import make_rule

    rules = [make_rule(model, ut_steps=d, exit_threshold=1.0) for d in (1, 2, 4)]
    prompts = [PROMPT, PROMPT[:3], PROMPT[2:]]
    with syncs:
        out = batch_generate(model, Ids(), prompts, max_tokens=N, rules=rules)
    # one read per batch step; besides: 3 encodings, 3 prompts prefilled apart (each
    # joins with one read, 2 steps more) and 1 leave. A read per loop step: ~3N.
    assert syncs.count <= N + 9
    assert [set(x) for x in out.loops] == [{1}, {2}, {4}]
