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
