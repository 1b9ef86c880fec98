"""Model behaviour on random tiny checkpoints: caches, batches, depth, dtypes."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from ouro_mlx import load_model
from ouro_mlx.model import Model, ModelArgs
from tests.conftest import to_np

IDS = mx.array([[5, 17, 300, 42, 7, 99, 128, 3, 250, 61]])


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def incremental(model, ids, chunks, **kw):
    cache = model.make_cache(kw.get("ut_steps"))
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start:start + n], cache=cache, **kw))
        start += n
    return mx.concatenate(out, axis=1), cache


@pytest.mark.parametrize("kw", [{}, {"exit_threshold": 0.5}, {"ut_steps": 2},
                                {"weighted_exit": True}])
def test_cached_decode_equals_full_recompute(model, kw):
    full = model(IDS, **kw)
    inc, cache = incremental(model, IDS, [4, 1, 1, 3, 1], **kw)
    np.testing.assert_allclose(to_np(inc), to_np(full), atol=1e-4)
    assert all(c.offset == IDS.shape[1] for lc in cache for c in lc.caches)


def test_batch_of_two_equals_singles(model):
    other = mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    batch = model(mx.concatenate([IDS, other]), exit_threshold=0.6)
    np.testing.assert_allclose(to_np(batch[:1]), to_np(model(IDS, exit_threshold=0.6)),
                               atol=1e-5)
    np.testing.assert_allclose(to_np(batch[1:]), to_np(model(other, exit_threshold=0.6)),
                               atol=1e-5)


@pytest.mark.parametrize("T", range(1, 9))
def test_any_number_of_loop_steps(model, T):
    out = model.loop_outputs(IDS, ut_steps=T)
    assert len(out.hidden) == T and out.gate_logits[0].shape == (1, IDS.shape[1])
    logits = model(IDS, ut_steps=T)
    np.testing.assert_allclose(to_np(logits), to_np(model.lm_head(out.hidden[-1])),
                               atol=1e-5)
    if T > 1:  # depth is a prefix: step t does not depend on how many follow
        ref = model.loop_outputs(IDS, ut_steps=1).hidden[0]
        np.testing.assert_allclose(to_np(out.hidden[0]), to_np(ref), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_ut_steps(model, bad):
    with pytest.raises(ValueError, match="ut_steps"):
        model(IDS, ut_steps=bad)


def test_exit_options_validated(model):
    with pytest.raises(ValueError, match="exit_at_step"):
        model(IDS, exit_at_step=4)
    with pytest.raises(ValueError, match="exit_threshold"):
        model(IDS, exit_threshold=1.5)


def test_cache_too_shallow_is_a_clear_error(model):
    with pytest.raises(ValueError, match="make_cache"):
        model(IDS, cache=model.make_cache(2), ut_steps=4)


def test_shallower_call_fills_deeper_slots(model):
    cache = model.make_cache(4)
    model(IDS, cache=cache, ut_steps=2)
    for lc in cache:
        assert [c.offset for c in lc.caches] == [IDS.shape[1]] * 4
        k1, k3 = lc[1].state[0], lc[3].state[0]
        assert mx.array_equal(k1[..., :10, :], k3[..., :10, :])


def test_cache_layout_is_one_kvcache_per_step_and_layer(model):
    cache = model.make_cache()
    assert len(cache) == len(model.layers) == 2
    assert all(len(lc.caches) == 4 for lc in cache)
    assert len(make_prompt_cache(model)) == 2


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 0.25), ("float16", 0.05)])
def test_half_precision_close_to_float32(tiny_dir, model, dtype, atol):
    half = load_model(tiny_dir, dtype=dtype)
    assert half.lm_head.weight.dtype == getattr(mx, dtype)
    ref = to_np(model(IDS))
    got = to_np(half(IDS))
    assert np.abs(got - ref).max() < atol
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_runtime_defaults_from_load(tiny_dir, model):
    m = load_model(tiny_dir, ut_steps=2, exit_threshold=0.5)
    assert (m.ut_steps, m.exit_threshold) == (2, 0.5)
    np.testing.assert_allclose(to_np(m(IDS)), to_np(model(IDS, ut_steps=2,
                                                          exit_threshold=0.5)), atol=1e-6)
    with pytest.raises(ValueError):
        load_model(tiny_dir, ut_steps=0)


def test_mlx_lm_generate_step(model):
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    got = [t for (t, _), _ in zip(generate_step(IDS[0], model, sampler=greedy), range(6))]
    cache = model.make_cache()
    logits = model(IDS, cache=cache)[:, -1]
    want = []
    for _ in range(6):
        want.append(mx.argmax(logits, -1).item())
        logits = model(mx.array([[want[-1]]]), cache=cache)[:, -1]
    assert got == want


def test_deepcopy_and_config_validation(model):
    clone = copy.deepcopy(model)
    assert mx.array_equal(clone(IDS), model(IDS))
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.from_dict({**vars(model.args), "model_type": "llama"})
    with pytest.raises(ValueError, match="multiple"):
        Model(ModelArgs.from_dict({**vars(model.args), "num_key_value_heads": 3}))


@pytest.mark.parametrize("kind", ["none", "full", "last", "batch"])
def test_last_only_final_step_matches_full(model, kind):
    """Prefill's shortcut: the final step's last layer computes the last position
    only, yet returns that position's state and gate and caches every position's
    K/V exactly as the full computation does."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import BatchKVCache, CacheList

    ids = mx.concatenate([IDS, mx.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])])
    T = 4

    def make():
        if kind == "none":
            return None
        if kind == "batch":  # left padding: an array mask, per-row rope offsets
            return [CacheList(*(BatchKVCache([3, 0]) for _ in range(T))) for _ in model.layers]
        return model.make_cache(T, kind)

    ref_cache, cache = make(), make()
    ref = model.model(ids, ref_cache, T)
    out = model.model(ids, cache, T, last_only=True)
    assert out.hidden[-1].shape == (2, 1, model.args.hidden_size)
    for t in range(T):
        tol = 1e-5 if t < T - 1 else 1e-4
        np.testing.assert_allclose(to_np(out.hidden[t][:, -1]), to_np(ref.hidden[t][:, -1]),
                                   atol=tol)
        np.testing.assert_allclose(to_np(out.gate_logits[t][:, -1]),
                                   to_np(ref.gate_logits[t][:, -1]), atol=tol)
    if cache is not None:
        for a, b in zip(cache, ref_cache):
            for ca, cb in zip(a.caches, b.caches):
                for x, y in zip(tree_flatten(ca.state), tree_flatten(cb.state)):
                    np.testing.assert_allclose(np.array(x[1]), np.array(y[1]), atol=1e-6)
