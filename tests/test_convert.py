"""Converters: round trips, raw PyTorch files, quantization, atomic writes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ouro_mlx import CheckpointError, load_model
from ouro_mlx.bench import per_step_kl
from ouro_mlx.convert import hf_to_mlx, mlx_to_hf

IDS = mx.array([[11, 200, 37, 400, 5, 63, 128, 256, 77, 19, 301, 2]])


def tensors(path: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir()}


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert mx.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_hf_mlx_hf_round_trip_is_identical(tiny_dir, tmp_path, dtype):
    src = tiny_dir
    if dtype:
        src = tmp_path / "hf-bf16"
        hf_to_mlx(tiny_dir, tmp_path / "tmp-mlx", dtype=dtype)
        mlx_to_hf(tmp_path / "tmp-mlx", src)
    before = digest(src)
    hf_to_mlx(src, tmp_path / "mlx")
    mlx_to_hf(tmp_path / "mlx", tmp_path / "hf")
    assert digest(src) == before  # the source is never touched
    assert_same_tensors(tensors(src), tensors(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "ouro" and cfg["architectures"] == ["OuroForCausalLM"]
    assert "quantization" not in cfg and cfg["total_ut_steps"] == 4
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    gen = json.loads((tmp_path / "mlx" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2]


def test_verify_reports_zero_for_lossless(tiny_dir, tmp_path):
    assert hf_to_mlx(tiny_dir, tmp_path / "mlx", verify=True) == 0.0


def test_raw_torch_bin_and_pt(tiny_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    from ouro_mlx.convert.torch_io import save_state_dict

    weights = tensors(tiny_dir)
    hf_dir = tmp_path / "hf-bin"
    hf_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, hf_dir / f)
    bf16 = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    save_state_dict(bf16, hf_dir / "pytorch_model.bin")
    hf_to_mlx(hf_dir, tmp_path / "from-bin")
    assert_same_tensors(bf16, tensors(tmp_path / "from-bin"))

    pt = tmp_path / "weights.pt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}},
               pt)
    hf_to_mlx(pt, tmp_path / "from-pt", config_path=tiny_dir / "config.json")
    assert_same_tensors(weights, tensors(tmp_path / "from-pt"))
    with pytest.raises(ValueError, match="config.json"):
        hf_to_mlx(pt, tmp_path / "no-config")


# Random Gaussian weights are a worst case for 4-bit; the error compounds per loop.
@pytest.mark.parametrize("bits,bound", [(8, 5e-3), (4, 1.0)])
def test_quantization_drift_per_loop_step(small_dir, tmp_path, bits, bound):
    dst = tmp_path / f"q{bits}"
    hf_to_mlx(small_dir, dst, quantize=True, q_bits=bits)
    q = load_model(dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    gate = q.model.early_exit_gate
    assert type(gate) is nn.Linear and gate.weight.dtype == mx.float32
    assert all(v.dtype == mx.float32 for k, v in tree_flatten(q.parameters()) if "norm" in k)
    assert isinstance(q.layers[0].mlp.up_proj, nn.QuantizedLinear)
    kls = per_step_kl(load_model(small_dir), q, IDS)
    print(f"{bits}-bit KL per loop step: {[f'{k:.2e}' for k in kls]}")
    assert all(0 <= k < bound for k in kls), kls


def test_mixed_recipe_and_fp_modes(small_dir, tmp_path):
    hf_to_mlx(small_dir, tmp_path / "mixed", quantize=True, q_bits=4, mixed=True)
    m = load_model(tmp_path / "mixed")
    assert m.lm_head.bits == 8 and m.model.embed_tokens.bits == 8
    assert m.layers[0].self_attn.q_proj.bits == 4
    hf_to_mlx(small_dir, tmp_path / "mxfp4", quantize=True, q_mode="mxfp4")
    m = load_model(tmp_path / "mxfp4")
    assert m.layers[0].mlp.down_proj.mode == "mxfp4"
    assert m(IDS).shape == (1, IDS.shape[1], 512)


def test_mlx_community_style_quantized_gate_loads(small_dir, tmp_path):
    """mlx-lm's own quantizer also quantizes the gate; such checkpoints load as is."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model = load_model(small_dir)
    config = json.loads((small_dir / "config.json").read_text())
    model, config = quantize_model(model, config, 64, 8, quant_predicate=lambda p, m: True)
    dst = tmp_path / "community"
    save_model(dst, model)
    save_config(config, dst / "config.json")
    shutil.copy(small_dir / "tokenizer.json", dst)
    loaded = load_model(dst)
    assert isinstance(loaded.model.early_exit_gate, nn.QuantizedLinear)
    assert mx.array_equal(loaded(IDS), model(IDS))
    mlx_to_hf(dst, tmp_path / "back")  # dequantizes, gate included
    assert tensors(tmp_path / "back")["model.early_exit_gate.weight"].shape == (1, 256)


def test_existing_destination_refused_then_forced(tiny_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        hf_to_mlx(tiny_dir, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    hf_to_mlx(tiny_dir, dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_conversion_leaves_nothing(tiny_dir, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(tiny_dir, src)
    w = tensors(src)
    del w["lm_head.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        hf_to_mlx(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_bad_options(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="q_mode"):
        hf_to_mlx(tiny_dir, tmp_path / "a", quantize=True, q_mode="int3")
    with pytest.raises(ValueError, match="Unknown dtype"):
        hf_to_mlx(tiny_dir, tmp_path / "b", dtype="float64")
    with pytest.raises(ValueError, match="differ"):
        hf_to_mlx(tiny_dir, tiny_dir, force=True)
    assert not any(tmp_path.iterdir())
