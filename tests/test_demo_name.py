"""The bundled model's short name ``demo``, every verb's default model, and a training
run directory that loads its latest checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import ouro_mlx
from ouro_mlx import demo
from ouro_mlx.loading import CheckpointError, resolve
from tests.test_cli import ENV


def ouro(*args: str, cwd, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "ouro_mlx", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=timeout)


def test_demo_names_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("demo") == demo.model_path()
    model, tokenizer = ouro_mlx.load("demo")
    assert model.args.hidden_size == 64 and "<|im_end|>" in tokenizer.get_vocab()


def test_a_local_directory_named_demo_wins(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "demo")
    assert resolve("demo").resolve() == (tmp_path / "demo").resolve()
    assert ouro_mlx.load_model("demo").args.num_hidden_layers == 2  # the tiny one, not ours


def test_a_run_directory_and_its_latest_file_load_the_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(demo.model_path(), run / f"ckpt-{step:07d}")
    (run / "latest").write_text("ckpt-0000004")
    assert resolve(run) == run / "ckpt-0000004"
    assert resolve(run / "latest") == run / "ckpt-0000004"
    assert resolve(run / "ckpt-0000002") == run / "ckpt-0000002"
    for bad in ("../../etc", "ckpt-0000009", ""):
        (run / "latest").write_text(bad)
        with pytest.raises(CheckpointError, match="does not name a checkpoint"):
            resolve(run)


def test_train_then_generate_from_the_run_directory(tmp_path):
    """A 2-step run of `ouro-mlx train`, then `generate --model out` and
    `--model out/latest`, as docs/training.md says."""
    from ouro_mlx.data import prepare

    _, tok = ouro_mlx.load("demo")
    (tmp_path / "t.jsonl").write_text("".join(
        json.dumps({"text": f"{i},{i + 1},{i + 2} ={i % 4}"}) + "\n" for i in range(60)))
    prepare([tmp_path / "t.jsonl"], tmp_path / "shards", tok, seq_len=16)
    model = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 320,
             "max_position_embeddings": 64}
    out = ouro("train", "--data", "shards", "--out", "out", "--model", json.dumps(model),
               "--iters", "2", "--batch-size", "2", "--ut-steps", "2", "--eval-every", "0",
               "--plot", "false", "--tokenizer", "demo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "latest").read_text() == "ckpt-0000002"
    assert (tmp_path / "out" / "ckpt-0000002" / "tokenizer.json").is_file()
    for model_arg in ("out", "out/latest"):
        out = ouro("generate", "--model", model_arg, "--prompt", "1,2,3", "-m", "3",
                   cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "avg loops: 2.00" in out.stderr


@pytest.mark.parametrize("verb", [
    ["generate", "--prompt", "2,23,14,31", "-m", "4"],
    ["bench", "--quality"],
    ["demo-eval", "--n", "5"],
])
def test_verbs_default_to_the_bundled_model(tmp_path, verb):
    out = ouro(*verb, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    explicit = ouro(*verb, "--model", "demo", cwd=tmp_path)
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout == out.stdout


def test_lora_and_fuse_without_model_use_the_bundled_model(tmp_path):
    """The first commands of a new user, offline: no hub download, no mlx_model."""
    data = tmp_path / "data"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "2,23,14,31"},
                        {"role": "assistant", "content": "=133"}]}
    (data / "train.jsonl").write_text((json.dumps(row) + "\n") * 4)
    out = ouro("lora", "--train", "--data", "data", "--iters", "2", "--batch-size", "2",
               "--loss", "fixed", "--ut-steps", "1", "--adapter-path", "tmp", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "tmp" / "adapter_config.json").read_text())["model"] == "demo"
    out = ouro("fuse", "--adapter-path", "tmp", "--save-path", "tmp2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fused = ouro_mlx.load_model(tmp_path / "tmp2")
    assert fused.args.hidden_size == 64
    out = ouro("generate", "--model", "tmp2", "--prompt", "2,23,14,31", "-m", "4",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_lora_without_data_says_so(tmp_path):
    out = ouro("lora", "--train", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "ouro-mlx lora: error: --data is required: a directory with train.jsonl (and "
        "valid.jsonl, test.jsonl) in mlx-lm's formats."]


def test_help_texts_name_the_default():
    from ouro_mlx.commands import bench, fuse, generate, lora

    for mod in (generate, fuse, lora, bench):
        text = " ".join(mod.build_parser().format_help().split())
        assert "demo" in text and "bundled demo model" in text, mod.__name__
    assert "--trust-remote-code" not in lora.build_parser().format_help()
