"""Loop-aware GPTQ and AWQ (ouro_mlx.quant_stats): MLX's packing at every bit width,
and on the bundled model, a result that beats round-to-nearest at every loop step
(``tests/test_quantize.py`` writes and loads one through the command)."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest

import ouro_mlx
from ouro_mlx import quant_stats as S
from ouro_mlx import quantize as Q
from ouro_mlx.calibrate import demo_data


@pytest.mark.parametrize("bits", S.BITS)
def test_pack_matches_mlx_layout(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, 32, bits)
    codes = S.codes_of(w, scales, biases, bits)
    assert mx.array_equal(S.pack(codes, bits), packed).item()
    want = (codes.reshape(8, -1, 32) * scales[..., None] + biases[..., None]).reshape(8, 128)
    got = mx.dequantize(S.pack(codes, bits), scales, biases, 32, bits)
    assert mx.allclose(got, want, atol=1e-6).item()


def _min_max(w: mx.array, bits: int) -> mx.array:
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    s = (hi - lo) / (2**bits - 1)
    return mx.clip(mx.round((w - lo) / s), 0, 2**bits - 1) * s + lo


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_range_search_never_loses_to_min_max_and_gains_on_outliers(bits):
    """Every row's searched grid costs at most what the group's min–max grid costs,
    under plain squared error and under a Hessian block (the output error AWQ rounds
    against); with one outlier per row it costs clearly less."""
    key = mx.random.key(bits)
    w = mx.random.normal((16, 32), key=key)
    w = mx.where(mx.arange(32) == 5, 6 * mx.sign(w), w)  # an outlier in every row
    x = mx.random.normal((64, 32), key=mx.random.key(9))
    for h in (mx.ones((32,)), x.T @ x):
        s, b = S.range_search(w, h, bits)
        d_searched = S.codes_of(w, s, b, bits) * s + b - w
        d_min_max = _min_max(w, bits) - w
        cost = ((lambda d: ((d @ h) * d).sum(1)) if h.ndim == 2
                else (lambda d: (d * d * h).sum(1)))
        assert (cost(d_searched) <= cost(d_min_max) * (1 + 1e-5)).all().item()
        assert cost(d_searched).sum().item() < 0.9 * cost(d_min_max).sum().item()


def test_rounding_against_a_hessian_weighs_the_groups_cross_terms(monkeypatch):
    """With correlated inputs the output error d·H·dᵀ couples the groups of a row; the
    sweep that weighs those cross terms lowers it below the groups picked alone."""
    w = mx.random.normal((8, 96), key=mx.random.key(1))
    base = mx.random.normal((256, 8), key=mx.random.key(2))
    x = base @ mx.random.normal((8, 96), key=mx.random.key(3))  # rank 8: correlated
    x = x + 0.1 * mx.random.normal((256, 96), key=mx.random.key(4))
    H = x.T @ x

    def cost(deq):
        d = deq - w
        return ((d @ H) * d).sum(1)

    monkeypatch.setattr(S, "SWEEPS", 0)
    alone = cost(S.round_searched(w, 2, 32, H)[3])
    monkeypatch.setattr(S, "SWEEPS", 1)
    codes, scales, biases, deq = S.round_searched(w, 2, 32, H)
    swept = cost(deq)
    assert (swept <= alone * (1 + 1e-5)).all().item()
    assert swept.sum().item() < 0.9 * alone.sum().item()
    assert mx.allclose(mx.dequantize(S.pack(codes, 2), scales, biases, 32, 2), deq,
                       atol=1e-5).item()


@pytest.fixture(scope="module")
def demo():
    from ouro_mlx.demo import model_path

    model, tok = ouro_mlx.load(model_path())
    train, valid = demo_data(tok, 64, 40)
    return model, train, valid


@pytest.mark.parametrize("method,bits", [("gptq", 2), ("gptq", 3), ("awq", 2)])
def test_beats_round_to_nearest_at_every_step(demo, method, bits):
    teacher, train, valid = demo
    rtn = Q.quality(Q.rtn(copy.deepcopy(teacher), {}, bits, 32)[0], teacher, valid)
    model, config = getattr(S, method)(copy.deepcopy(teacher), {"model_type": "ouro"},
                                       train, bits, 32)
    got = Q.quality(model, teacher, valid)
    assert all(g < r for g, r in zip(got["kl_by_step"], rtn["kl_by_step"])), (got, rtn)
    assert config["quantization"]["bits"] == bits
    assert type(model.model.early_exit_gate).__name__ == "Linear"  # full precision


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_loop_aware_methods_round_the_embedding_on_searched_ranges(demo, method):
    """The embedding table (every step's input carries its error) rounds closer to the
    float table than round-to-nearest; ``loop_aware=False`` (stock) keeps mlx-lm's."""
    teacher, train, _ = demo
    float_table = teacher.model.embed_tokens.weight

    def table_error(model):
        e = model.model.embed_tokens
        deq = mx.dequantize(e.weight, e.scales, e.biases, e.group_size, e.bits)
        return ((deq - float_table) ** 2).sum().item()

    rtn = table_error(Q.rtn(copy.deepcopy(teacher), {}, 2, 32)[0])
    fn = getattr(S, method)
    aware = table_error(fn(copy.deepcopy(teacher), {}, train[:8], 2, 32)[0])
    stock = table_error(fn(copy.deepcopy(teacher), {}, train[:8], 2, 32, loop_aware=False)[0])
    assert aware < 0.9 * rtn
    assert stock == pytest.approx(rtn, rel=1e-6)


def test_awq_scales_keep_the_float_function(demo):
    """AWQ's scales, folded into the norms before GPTQ rounds (``awq(then_gptq=True)``,
    the measurement script's awq-gptq): the same outputs."""
    teacher, train, _ = demo
    model = copy.deepcopy(teacher)
    S.scale_only(model, train[:16], 2, 32)
    ids = mx.array([train[0][0]])
    before, after = teacher.loop_outputs(ids), model.loop_outputs(ids)
    moved = [not mx.allclose(a, b).item() for a, b in zip(
        teacher.model.layers[0].input_layernorm.parameters().values(),
        model.model.layers[0].input_layernorm.parameters().values())]
    assert any(moved)  # the scales were folded in
    for h0, h1 in zip(before.hidden, after.hidden):
        assert mx.allclose(h0, h1, atol=1e-4, rtol=1e-4).item()


@pytest.mark.parametrize("bits,group", [(7, 32), (4, 48)])
def test_bad_arguments_refused(demo, bits, group):
    teacher, train, _ = demo
    with pytest.raises(ValueError, match="bits|group"):
        S.gptq(copy.deepcopy(teacher), {}, train[:8], bits, group)
