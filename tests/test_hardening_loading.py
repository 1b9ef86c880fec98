"""Checkpoints from strangers: no code from a model directory, shards inside it,
one-line refusals of malformed configs, directories replaced without a gap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ouro_mlx.convert import hf_to_mlx, mlx_to_hf
from tests.conftest import TOKENIZER, needs_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
YES = "y\n" * 50
AUTO_MAP = {
    "AutoConfig": "configuration_ouro.OuroConfig",
    "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
}


def run(*args: str, stdin: str = YES) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          input=stdin, env=ENV, timeout=300)


def plant_code(path: Path, marker: Path) -> None:
    """What the released Ouro checkpoints ship (auto_map + .py files), with code
    that leaves ``marker`` behind if anything imports it."""
    for name, key in (("config.json", "auto_map"), ("tokenizer_config.json", "auto_map")):
        data = json.loads((path / name).read_text())
        data[key] = AUTO_MAP if name == "config.json" else {
            "AutoTokenizer": ["tokenization_ouro.OuroTokenizer", None]}
        (path / name).write_text(json.dumps(data))
    for module in ("configuration_ouro", "modeling_ouro", "tokenization_ouro"):
        (path / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'a').write('{module} ran\\n')\n"
            "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
            "class OuroConfig(PretrainedConfig):\n    model_type = 'ouro'\n"
            "class OuroTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        )


def assert_no_prompt(out: subprocess.CompletedProcess) -> None:
    text = out.stdout + out.stderr
    assert "custom code" not in text and "trust_remote_code" not in text, text


def test_generate_never_runs_code_from_the_model_dir(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    marker = tmp_path / "marker"
    plant_code(model, marker)
    out = run("-m", "ouro_mlx", "generate", "--model", str(model), "--prompt", "hi",
              "--max-tokens", "2")
    assert not marker.exists(), marker.read_text()
    assert out.returncode == 0, out.stderr
    assert_no_prompt(out)


@needs_tokenizer
def test_released_tokenizer_files_load_without_code(tiny_dir, tmp_path):
    """The real Ouro-1.4B tokenizer files beside a config with auto_map."""
    model = tmp_path / "ouro"
    model.mkdir()
    shutil.copy(tiny_dir / "config.json", model)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, model)
    marker = tmp_path / "marker"
    plant_code(model, marker)
    code = ("import sys; from pathlib import Path; from ouro_mlx.loading import "
            "load_tokenizer; t = load_tokenizer(Path(sys.argv[1])); "
            "print(t.encode('What is 2+2?'))")
    out = run("-c", code, str(model))
    assert not marker.exists(), marker.read_text()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1780, 314, 216, 34, 27, 34, 47]"
    assert_no_prompt(out)


def test_tokenizer_that_needs_code_is_refused_in_one_line(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    marker = tmp_path / "marker"
    plant_code(model, marker)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    out = run("-m", "ouro_mlx", "generate", "--model", str(model), "--prompt", "hi")
    assert not marker.exists()
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "tokenizer_config.json" in out.stderr
    assert "never runs code" in out.stderr


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(MLX directory, its ``convert --to-hf`` export) of the tiny checkpoint."""
    root = tmp_path_factory.mktemp("converted")
    hf_to_mlx(tiny_dir, root / "mlx")
    mlx_to_hf(root / "mlx", root / "hf")
    return root / "mlx", root / "hf"


def test_our_hf_export_loads_without_a_prompt(converted):
    out = run("-m", "ouro_mlx", "generate", "--model", str(converted[1]), "--prompt", "hi",
              "--max-tokens", "2")
    assert out.returncode == 0, out.stderr
    assert_no_prompt(out)


@pytest.mark.parametrize("which", [0, 1], ids=["mlx", "hf"])
def test_stock_mlx_lm_loads_our_outputs_quietly(converted, which):
    out = run("-m", "mlx_lm", "generate", "--model", str(converted[which]), "--prompt", "hi",
              "--max-tokens", "2")
    assert out.returncode == 0, out.stderr
    assert "model of type" not in out.stderr and "rope_scaling" not in out.stderr, out.stderr
    assert "Warning" not in out.stderr, out.stderr
    assert_no_prompt(out)
