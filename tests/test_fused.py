"""Fused projections (Model.fuse_projections): the same outputs on every decode path,
bf16/fp32 and 4-bit, no extra memory, the Hugging Face layout everywhere a model is
saved, adapted or trained."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import ouro_mlx
from ouro_mlx import stream_generate
from ouro_mlx.adapters import apply_adapters
from ouro_mlx.bench import quantize

PROMPT = [5, 17, 300, 42, 7, 99, 128]
HF_KEYS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """The tiny float32 model and a fused copy."""
    model, tok = ouro_mlx.load(tiny_dir)
    tok._eos_token_ids = set()  # exactly max_tokens on random weights
    fused = copy.deepcopy(model)
    assert fused.fuse_projections() and fused.fused and not model.fused
    return model, fused, tok


@pytest.fixture(scope="module")
def quantized_pair(small_dir):
    model, tok = ouro_mlx.load(small_dir)
    tok._eos_token_ids = set()
    model = quantize(model, ouro_mlx.loading.read_config(small_dir), 4)
    fused = copy.deepcopy(model)
    assert fused.fuse_projections()
    return model, fused, tok


def tokens(model, tok, **kw):
    return [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=8, **kw)]


def test_fused_keys_and_module_kinds(pair, quantized_pair):
    _, fused, _ = pair
    keys = [k for k, _ in tree_flatten(fused.parameters())]
    assert not any(f".{n}." in k for k in keys for n in HF_KEYS)
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys
    qfused = quantized_pair[1]
    layer = qfused.layers[0]
    assert type(layer.self_attn.qkv_proj).__name__ == "QuantizedLinear"
    assert layer.self_attn.qkv_proj.scales.shape[0] == 3 * 256
    assert layer.mlp.gate_up_proj.bits == 4


def test_logits_equal_every_loop_step(pair):
    model, fused, _ = pair
    ids = mx.array([PROMPT])
    a, b = model.loop_outputs(ids), fused.loop_outputs(ids)
    for h, g in zip(a.hidden + a.gate_logits, b.hidden + b.gate_logits):
        assert mx.allclose(h, g, atol=1e-5).item()
    ca, cb = model.make_cache(), fused.make_cache()
    model(ids, ca)
    fused(ids, cb)
    y = mx.array([[3]])
    assert mx.allclose(model(y, ca), fused(y, cb), atol=1e-5).item()


def test_quantized_logits_equal(quantized_pair):
    model, fused, _ = quantized_pair
    ids = mx.array([PROMPT])
    assert mx.allclose(model(ids), fused(ids), atol=1e-5).item()


@pytest.mark.parametrize("opts", [dict(), dict(exit_at_step=1), dict(compile_step=True),
                                  dict(pipeline=True), dict(pipeline=True, compile_step=True),
                                  dict(draft_loops=2), dict(exit_threshold=0.5),
                                  dict(kv_mode="last")])
def test_same_greedy_tokens(pair, opts):
    model, fused, tok = pair
    assert tokens(fused, tok, **opts) == tokens(model, tok, **opts)


@pytest.mark.parametrize("opts", [dict(), dict(compile_step=True)])
def test_quantized_same_greedy_tokens(quantized_pair, opts):
    model, fused, tok = quantized_pair
    assert tokens(fused, tok, **opts) == tokens(model, tok, **opts)


def test_fusing_frees_the_separate_arrays(small_dir):
    model = ouro_mlx.load_model(small_dir)
    mx.eval(model.parameters())
    before = mx.get_active_memory()
    assert model.fuse_projections()
    assert mx.get_active_memory() <= before * 1.01


def test_unfuse_restores_the_hf_layout(pair, quantized_pair):
    for model, fused, _ in (pair, quantized_pair):
        back = copy.deepcopy(fused)
        back.unfuse_projections()
        assert not back.fused
        want, got = dict(tree_flatten(model.parameters())), dict(tree_flatten(back.parameters()))
        assert want.keys() == got.keys()
        assert all(mx.array_equal(want[k], got[k]).item() for k in want)


def test_saving_adapting_training_sharding_a_fused_model_is_refused(pair, small_dir, tmp_path):
    from ouro_mlx.calibrate import save_model_dir
    from ouro_mlx.training import save_checkpoint

    fused = copy.deepcopy(pair[1])
    calls = [lambda: save_model_dir(tmp_path / "out", small_dir, fused, None),
             lambda: save_checkpoint(tmp_path / "ckpt", 1, fused, None, None, None, None),
             lambda: apply_adapters(fused),
             lambda: fused.shard()]
    for call in calls:
        with pytest.raises(ValueError, match="fused for inference.*unfuse_projections"):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("kind", [dict(), dict(fine_tune_type="dora"), dict(per_loop=True),
                                  dict(lora_parameters={"rank": 4, "dropout": 0.0,
                                                        "scale": 10.0,
                                                        "keys": ["self_attn.o_proj"]})])
def test_fusing_with_adapters_is_skipped(tiny_dir, kind):
    model = ouro_mlx.load_model(tiny_dir)
    apply_adapters(model, **kind)
    keys = [k for k, _ in tree_flatten(model.parameters())]
    assert model.fuse_projections() is False
    assert [k for k, _ in tree_flatten(model.parameters())] == keys


def test_load_fuses_only_when_asked_and_never_with_adapters(tiny_dir, tmp_path):
    from ouro_mlx.adapters import adapter_config, save_adapters

    assert not ouro_mlx.load(tiny_dir)[0].fused
    assert ouro_mlx.load(tiny_dir, fuse=True)[0].fused
    model = ouro_mlx.load_model(tiny_dir)
    apply_adapters(model)
    save_adapters(tmp_path / "ad", model, adapter_config({}))
    assert not ouro_mlx.load_model(tiny_dir, adapter_path=tmp_path / "ad", fuse=True).fused


def test_sessions_fuse_unless_adapted(tiny_dir):
    from ouro_mlx.session import ChatSession

    assert ChatSession.load(tiny_dir).model.fused


def test_training_and_lora_loaders_never_fuse(tiny_dir, monkeypatch, tmp_path):
    """The verbs that save, adapt or train load the HF layout: fusing there fails."""
    from ouro_mlx.model import Model

    def refuse(self):
        raise AssertionError("fused a model that will be saved, adapted or trained")

    monkeypatch.setattr(Model, "fuse_projections", refuse)
    from ouro_mlx.cli import main as cli

    data = tmp_path / "data"
    data.mkdir()
    row = '{"messages": [{"role": "user", "content": "1 plus 2"}, ' \
          '{"role": "assistant", "content": "3"}]}\n'
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text(row * 8)
    assert cli(["lora", "--model", str(tiny_dir), "--train", "--data", str(data),
                "--adapter-path", str(tmp_path / "ad"), "--batch-size", "2", "--iters", "1",
                "--val-batches", "1", "--steps-per-report", "1"]) == 0
