"""Loading from directories, sharded files and the HF cache; bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import ouro_mlx
from ouro_mlx import CheckpointError, load, load_model
from tests.conftest import TOKENIZER, needs_tokenizer, to_np

IDS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(path: Path, edit) -> None:
    w = dict(mx.load(str(path / "model.safetensors")))
    edit(w)
    mx.save_safetensors(str(path / "model.safetensors"), w)


def test_load_returns_model_and_tokenizer(tiny_dir):
    model, tok = load(tiny_dir)
    assert isinstance(model, ouro_mlx.Model)
    assert {0, 2} <= set(tok.eos_token_ids)  # config eos and <|im_end|>
    assert model.lm_head.weight.dtype == mx.float32


def test_sharded_safetensors_with_index(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "sharded")
    w = dict(mx.load(str(dst / "model.safetensors")))
    (dst / "model.safetensors").unlink()
    keys = sorted(w)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        mx.save_safetensors(str(dst / name), {k: w[k] for k in ks})
    index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    assert mx.array_equal(load_model(dst)(IDS), load_model(tiny_dir)(IDS))


def test_lazy_loading(tiny_dir):
    model = load_model(tiny_dir, lazy=True)
    assert mx.array_equal(model(IDS), load_model(tiny_dir)(IDS))


def test_bf16_checkpoint_and_dtype_override(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "bf16")
    rewrite_weights(dst, lambda w: w.update({k: v.astype(mx.bfloat16) for k, v in w.items()}))
    assert load_model(dst).lm_head.weight.dtype == mx.bfloat16
    m32 = load_model(dst, dtype="float32")
    assert m32.lm_head.weight.dtype == mx.float32
    assert np.abs(to_np(m32(IDS)) - to_np(load_model(dst)(IDS))).max() < 0.5


def test_hub_repo_id_from_local_cache_offline(tiny_dir, tmp_path):
    """The real hub code path (snapshot_download) against an HF cache layout."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ByteDance--Ouro-Tiny"
    snap = repo / "snapshots" / commit
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_dir.iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "hf-home")}
    code = ("import ouro_mlx, mlx.core as mx; m, t = ouro_mlx.load('ByteDance/Ouro-Tiny'); "
            "print(m(mx.array([[1, 2, 3]])).shape, sorted(t.eos_token_ids))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(1, 3, 512) [0, 2]" in out.stdout
    code = "import ouro_mlx; ouro_mlx.load('ByteDance/Not-Cached')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "local HF cache" in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # one line, in a few words
    assert "could not be reached" in last and "local HF cache" in last


def test_missing_config(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "noconfig")
    (dst / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(dst)


def test_other_model_type(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "llama")
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_model(dst)


def test_no_code_from_model_directory_runs(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "code")
    marker = tmp_path / "executed"
    (dst / "modeling_ouro.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_file": "modeling_ouro.py"}))
    load(dst)
    assert not marker.exists()


def test_every_bad_tensor_listed_in_one_error(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "bad")

    def edit(w):
        del w["model.norm.weight"]
        del w["model.early_exit_gate.bias"]
        w["model.layers.0.mlp.up_proj.weight"] = mx.zeros((3, 3))
        w["model.extra.weight"] = mx.zeros((2,))

    rewrite_weights(dst, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(dst)
    msg = str(err.value)
    for part in ["missing tensors (2)", "model.norm.weight", "model.early_exit_gate.bias",
                 "unexpected tensors (1)", "model.extra.weight", "wrong shapes (1)",
                 "model.layers.0.mlp.up_proj.weight: checkpoint (3, 3), model (128, 64)"]:
        assert part in msg


def test_truncated_safetensors(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "trunc")
    f = dst / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(dst)


def test_unknown_dtype(tiny_dir):
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        load_model(tiny_dir, dtype="float8")


def test_torch_weights_point_to_converter(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "bin")
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="ouro-mlx convert"):
        load_model(dst)


def test_missing_directory():
    with pytest.raises(FileNotFoundError):
        load_model("./no/such/dir")


@needs_tokenizer
def test_real_tokenizer_chat_template_and_stops(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path / "realtok")
    for f in TOKENIZER.iterdir():
        shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "vocab_size": 49152}))
    rewrite_weights(dst, lambda w: w.update(
        {k: mx.zeros((49152, 64)) for k in ("model.embed_tokens.weight", "lm_head.weight")}))
    _, tok = load(dst)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True)
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198,
                   1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]
    assert {0, 2} <= set(tok.eos_token_ids)
    assert tok.encode("12345", add_special_tokens=False) == [
        tok.convert_tokens_to_ids(c) for c in "12345"]
