"""Checkpoints from strangers: no code from a model directory, shards inside it,
one-line refusals of malformed configs, directories replaced without a gap."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from ouro_mlx import CheckpointError, load_model
from ouro_mlx.convert import hf_to_mlx, mlx_to_hf
from ouro_mlx.limits import MAX_UT_STEPS
from ouro_mlx.loading import atomic_directory
from ouro_mlx.model import ModelArgs, check_ut_steps, estimate_model_bytes, num_parameters
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


def ckpt(tiny_dir: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the tiny checkpoint with ``edit(config)`` applied to its config.json."""
    path = shutil.copytree(tiny_dir, tmp_path / "model")
    if edit is not None:
        config = json.loads((path / "config.json").read_text())
        config = edit(config) or config
        (path / "config.json").write_text(json.dumps(config))
    return path


def refusal(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def shard(path: Path, names: dict[str, str] | None = None) -> dict:
    """Split model.safetensors into two shards named by ``names``; returns the index."""
    w = dict(mx.load(str(path / "model.safetensors")))
    (path / "model.safetensors").unlink()
    keys = sorted(w)
    index = {}
    for part, ks in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{part + 1}-of-00002.safetensors"
        mx.save_safetensors(str(path / name), {k: w[k] for k in ks})
        index.update({k: (names or {}).get(name, name) for k in ks})
    return index


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_shards_outside_the_model_dir_are_refused(tiny_dir, tmp_path, where):
    path = ckpt(tiny_dir, tmp_path)
    outside = tmp_path / "outside.safetensors"
    index = shard(path)
    os.replace(path / "model-00002-of-00002.safetensors", outside)
    name = {"parent": "../outside.safetensors", "absolute": str(outside),
            "symlink": "model-00002-of-00002.safetensors"}[where]
    if where == "symlink":
        (path / name).symlink_to(outside)
    index = {k: name if v.startswith("model-00002") else v for k, v in index.items()}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    message = refusal(path)
    assert "model.safetensors.index.json" in message and "inside the model directory" in message


def test_unindexed_shard_linking_outside_is_refused(tiny_dir, tmp_path):
    path = ckpt(tiny_dir, tmp_path)
    os.replace(path / "model.safetensors", tmp_path / "outside.safetensors")
    (path / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert "inside the model directory" in refusal(path)


def test_hf_cache_snapshot_links_to_blobs_load(tiny_dir, tmp_path):
    """The hub cache's layout: snapshots/REV/file → ../../blobs/SHA."""
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    shutil.copytree(tiny_dir, snap)
    blobs.mkdir()
    os.replace(snap / "model.safetensors", blobs / "sha")
    (snap / "model.safetensors").symlink_to(Path("../../blobs/sha"))
    load_model(snap)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds an array; expected a JSON object"),
    ('{"metadata": {}}', "has no weight_map"),
    ('{"weight_map": ["a"]}', "has no weight_map"),
])
def test_bad_shard_index_is_refused_naming_it(tiny_dir, tmp_path, text, expected):
    path = ckpt(tiny_dir, tmp_path)
    (path / "model.safetensors.index.json").write_text(text)
    message = refusal(path)
    assert "model.safetensors.index.json" in message and expected in message


def set_(**fields):
    return lambda config: {**config, **fields}


def drop_head_dim(hidden: int):
    return lambda config: {**{k: v for k, v in config.items() if k != "head_dim"},
                           "hidden_size": hidden}


@pytest.mark.parametrize("edit, expected", [
    (lambda config: [config], "config.json holds an array; expected a JSON object"),
    (set_(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (set_(num_key_value_heads=-2), "num_key_value_heads must be a positive integer"),
    (set_(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
    (set_(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (set_(vocab_size=2.5), "vocab_size must be a positive integer"),
    (set_(intermediate_size=True), "intermediate_size must be a positive integer"),
    (drop_head_dim(66), "hidden_size (66) must be a multiple of num_attention_heads (4)"),
    (set_(rms_norm_eps="x"), "rms_norm_eps must be a positive number"),
    (set_(early_exit_threshold=2), "early_exit_threshold must be in [0, 1]"),
    (set_(eos_token_id="x"), "eos_token_id must be a token id or a list of them, got 'x'"),
    (set_(eos_token_id=[0, None]), "eos_token_id must be a token id"),
    (set_(quantization="yes"), "quantization must be an object with bits and group_size"),
    (set_(quantization={"bits": "4", "group_size": 64}), "quantization.bits must be a"),
    (set_(quantization={"bits": 4, "group_size": 64, "model.norm": 3}),
     "quantization.model.norm must be true, false or an object"),
    (set_(total_ut_steps=10**6), "total_ut_steps is 1000000, above the maximum"),
    (set_(total_ut_steps=0), "total_ut_steps must be an integer >= 1"),
    (set_(num_hidden_layers=10**7), "needs about"),
    (set_(hidden_size=10**9, head_dim=None), "needs about"),
])
def test_bad_config_is_refused_in_one_line(tiny_dir, tmp_path, edit, expected):
    message = refusal(ckpt(tiny_dir, tmp_path, edit))
    assert "config.json" in message and expected in message, message


def test_absurd_sizes_fail_at_once(tiny_dir, tmp_path):
    path = ckpt(tiny_dir, tmp_path, set_(num_hidden_layers=10**7, vocab_size=10**9))
    start = time.perf_counter()
    assert "needs about" in refusal(path)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("text, expected", [
    ("[0]", "holds an array"),
    ('{"eos_token_id": "x"}', "eos_token_id must be a token id"),
    ("{", "is not valid JSON"),
])
def test_bad_generation_config_is_refused_naming_it(tiny_dir, tmp_path, text, expected):
    path = ckpt(tiny_dir, tmp_path)
    (path / "generation_config.json").write_text(text)
    message = refusal(path)
    assert "generation_config.json" in message and expected in message


def test_deeply_nested_config_is_refused(tiny_dir, tmp_path):
    path = ckpt(tiny_dir, tmp_path)
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in refusal(path)


def test_integer_weights_where_floats_belong_are_refused(tiny_dir, tmp_path):
    path = ckpt(tiny_dir, tmp_path)
    w = dict(mx.load(str(path / "model.safetensors")))
    w["model.norm.weight"] = w["model.norm.weight"].astype(mx.int32)
    mx.save_safetensors(str(path / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match=r"wrong dtypes \(1\):\n    model.norm.weight: "
                                              r"checkpoint mlx.core.int32, model mlx.core.float32"):
        load_model(path)


def test_quantized_checkpoint_still_loads(converted, tmp_path):
    hf_to_mlx(converted[0], tmp_path / "q", quantize=True, q_bits=8, q_group_size=32)
    load_model(tmp_path / "q")


def test_loop_steps_are_capped_unless_raised(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="set OURO_MLX_MAX_UT_STEPS to allow more"):
        check_ut_steps(MAX_UT_STEPS + 1)
    with pytest.raises(ValueError, match="ut_steps is 65"):
        load_model(tiny_dir, ut_steps=65)
    path = ckpt(tiny_dir, tmp_path, set_(total_ut_steps=100))
    monkeypatch.setenv("OURO_MLX_MAX_UT_STEPS", "100")
    assert load_model(path).ut_steps == 100
    assert check_ut_steps(100) == 100


def test_estimate_model_bytes_counts_every_parameter(tiny_dir):
    model = load_model(tiny_dir)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert num_parameters(model.args) == n
    overhead = model.args.num_hidden_layers * 2**17
    assert estimate_model_bytes(model.args, 2) == 2 * n + overhead


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def write_dir(dest: Path, text: str, force: bool = True) -> None:
    with atomic_directory(dest, force=force) as tmp:
        (tmp / "file.txt").write_text(text)


KILL_AT_SECOND_RENAME = """
import os, signal, sys
from pathlib import Path
from ouro_mlx import loading
calls, replace = [], os.replace
def killing_replace(src, dst):
    calls.append(src)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
loading.os.replace = killing_replace
with loading.atomic_directory(Path(sys.argv[1]), force=True) as tmp:
    (tmp / "file.txt").write_text("new")
"""


def test_run_killed_between_renames_is_restored_by_the_next(tmp_path, capfd):
    dest = tmp_path / "out"
    write_dir(dest, "old")
    killed = run("-c", KILL_AT_SECOND_RENAME, str(dest), stdin="")
    assert killed.returncode == -9
    assert not dest.exists() and [n.split("-")[0] for n in siblings(dest)] == [
        ".out.old", ".out.tmp"]
    with pytest.raises(FileExistsError):  # the old copy is back, so this refuses
        write_dir(dest, "newer", force=False)
    assert "restored" in capfd.readouterr().err
    assert (dest / "file.txt").read_text() == "old" and siblings(dest) == []
    write_dir(dest, "newer")
    assert (dest / "file.txt").read_text() == "newer" and siblings(dest) == []


def test_leftovers_of_dead_runs_go_and_of_live_runs_stay(tmp_path):
    dest = tmp_path / "out"
    write_dir(dest, "current")
    dead, live = dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}-0a1b", f".out.old-{dead}", f".out.tmp-{live}-2c3d",
                 f".out.old-{live}", ".outer.tmp-1-00", ".out.tmp-unknown"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.bin").write_bytes(b"x" * 1000)
    write_dir(dest, "next")
    assert (dest / "file.txt").read_text() == "next"
    assert siblings(dest) == sorted([f".out.tmp-{live}-2c3d", f".out.old-{live}",
                                     ".out.tmp-unknown"])
    assert (tmp_path / ".outer.tmp-1-00").exists()


def test_error_inside_leaves_the_old_copy_and_no_temporary(tmp_path):
    dest = tmp_path / "out"
    write_dir(dest, "old")
    with pytest.raises(OSError), atomic_directory(dest, force=True) as tmp:
        (tmp / "part.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (dest / "file.txt").read_text() == "old" and siblings(dest) == []


def test_force_never_replaces_a_file_or_link(tmp_path):
    # `--out /dev/null --force` once made /dev/null a directory.
    file, target = tmp_path / "file", tmp_path / "target"
    file.write_text("keep")
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    for dest in (file, link):
        with pytest.raises(FileExistsError, match="is not a directory"):
            with atomic_directory(dest, force=True):
                pass
    assert file.read_text() == "keep" and link.is_symlink()
    assert siblings(file) == [] and siblings(link) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_directories_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_dir(tmp_path / "a" / "out", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a" / "out").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == mode


def test_model_args_check_values_for_every_loader():
    """mlx-lm's own loader builds ModelArgs too: the checks live there."""
    dims = dict(model_type="ouro", hidden_size=64, num_hidden_layers=1,
                intermediate_size=8, num_attention_heads=4, vocab_size=8)
    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer"):
        ModelArgs(**{**dims, "num_attention_heads": 0})
    with pytest.raises(ValueError, match="total_ut_steps is 1000000, above the maximum"):
        ModelArgs(**dims, total_ut_steps=10**6)
    assert ModelArgs(**dims).head_dim == 16


def test_cli_refuses_a_bad_config_in_one_line(tiny_dir, tmp_path):
    path = ckpt(tiny_dir, tmp_path, set_(num_attention_heads="4"))
    out = run("-m", "ouro_mlx", "generate", "--model", str(path), "--prompt", "hi", stdin="")
    assert out.returncode == 1
    assert out.stderr == (f"ouro-mlx generate: error: {path / 'config.json'}: "
                          "num_attention_heads must be a positive integer, got '4'.\n")
