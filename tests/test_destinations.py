"""Where outputs go: every verb that writes refuses, before any work, a destination
that is, contains or lies inside what it reads, and --force replaces only what
ouro-mlx wrote itself. Each refusal is one line naming the path, exits 1, and leaves
the source byte-identical."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from ouro_mlx.cli import main
from ouro_mlx.demo import model_path
from ouro_mlx.outputs import MARKER

JSONL = "".join(json.dumps({"text": f"count {i} {i + 1} {i + 2} and so on"}) + "\n"
                for i in range(40))


def tree(path: Path) -> dict[str, str]:
    """Every file below ``path`` (or the file itself) with its hash."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def refused(capsys, argv: list[str], *names: object) -> str:
    """Run the verb in-process: exit 1 and one error line naming each of ``names``."""
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 1, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture
def model(tmp_path) -> Path:
    """A copy of the bundled model inside a parent folder of its own."""
    dst = tmp_path / "models" / "demo"
    shutil.copytree(model_path(), dst)
    return dst


@pytest.fixture
def data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text(JSONL)
    (d / "valid.jsonl").write_text(JSONL[:200])
    return d


@pytest.fixture
def adapters(tmp_path) -> Path:
    d = tmp_path / "adapters"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    (d / "adapters.safetensors").write_bytes(b"not really weights, but the user's")
    return d


@pytest.fixture
def user_dir(tmp_path) -> Path:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    (d / "sub").mkdir()
    (d / "sub" / "thesis.tex").write_text("chapter 1")
    return d


# ---------------------------------------------------------------- calibrate-exit


def test_calibrate_out_parent_of_model_is_refused(model, data, capsys):
    before = tree(model)
    refused(capsys, ["calibrate-exit", "--model", str(model), "--data", str(data),
                     "--out", str(model.parent), "--force"],
            f"--out {model.parent}", "contains the source --model", model)
    assert tree(model) == before


def test_calibrate_outputs_on_data_adapters_and_model_files_are_refused(
        model, data, adapters, capsys):
    sources = [model, data, adapters]
    before = [tree(s) for s in sources]
    base = ["calibrate-exit", "--model", str(model), "--data", str(data), "--force"]
    refused(capsys, base + ["--out", str(data)], f"--out {data}", "is the source --data")
    refused(capsys, base + ["--gate-out", str(data)], "is the source --data")
    refused(capsys, base + ["--gate-out", str(data / "train.jsonl")],
            "lies inside the source --data")
    refused(capsys, base + ["--out", str(model / "model.safetensors")],
            "lies inside the source --model")
    refused(capsys, base + ["--gate-out", str(model / "model.safetensors")],
            f"--gate-out {model / 'model.safetensors'}", "lies inside the source --model")
    with_adapters = base + ["--adapter-path", str(adapters)]
    refused(capsys, with_adapters + ["--gate-out", str(adapters / "adapters.safetensors")],
            "lies inside the source --adapter-path", adapters)
    refused(capsys, with_adapters + ["--gate-out", str(adapters)],
            "is the source --adapter-path")
    refused(capsys, with_adapters + ["--out", str(adapters)], "--out")
    assert [tree(s) for s in sources] == before


def test_gate_out_force_replaces_only_a_gate_file(model, tmp_path, capsys):
    from ouro_mlx import load
    from ouro_mlx.calibrate import save_gate

    notes = tmp_path / "notes.safetensors"
    notes.write_text("mine")
    refused(capsys, ["calibrate-exit", "--model", str(model), "--data", str(model),
                     "--gate-out", str(notes), "--force"],
            f"--gate-out {notes}", "not a gate file ouro-mlx wrote")
    assert notes.read_text() == "mine"
    from ouro_mlx.commands.calibrate_exit import build_parser, check_outputs

    m, _ = load(model)
    gate = save_gate(tmp_path / "gate.safetensors", m, 0.5)
    with pytest.raises(ValueError, match="pass --force"):
        check_outputs(build_parser().parse_args(["--gate-out", str(gate)]), model)
    check_outputs(build_parser().parse_args(["--gate-out", str(gate), "--force"]), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gate.safetensors", "models", "notes.safetensors"]


# ---------------------------------------------------------------- data


def test_data_out_holding_the_input_or_the_tokenizer_or_a_user_dir(
        model, data, user_dir, capsys):
    before = [tree(model), tree(data), tree(user_dir)]
    base = ["data", "--tokenizer", str(model), "--seq-len", "16", "--force"]
    refused(capsys, base + ["--out", str(data), str(data / "train.jsonl")],
            f"--out {data}", "contains the source input", data / "train.jsonl")
    refused(capsys, base + ["--out", str(model), str(data / "train.jsonl")],
            f"--out {model}", "is the source --tokenizer")
    refused(capsys, base + ["--out", str(user_dir), str(data / "train.jsonl")],
            f"--out {user_dir}", "2 files", "notes.txt", "did not write")
    assert [tree(model), tree(data), tree(user_dir)] == before


def test_data_force_replaces_what_data_wrote(model, data, tmp_path, capsys):
    out = tmp_path / "shards"
    flags = ["data", "--tokenizer", str(model), "--seq-len", "16", "--out", str(out),
             str(data / "train.jsonl")]
    assert main(flags) == 0
    assert json.loads((out / MARKER).read_text())["verb"] == "data"
    refused(capsys, flags, f"--out {out}", "pass --force")
    assert main(flags + ["--force"]) == 0
    (out / "notes.txt").write_text("added later by the user")
    refused(capsys, flags + ["--force"], "1 file (notes.txt)")
    assert (out / "notes.txt").exists()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_out_holding_the_corpus_or_a_user_dir(data, user_dir, tmp_path, capsys):
    before = [tree(data), tree(user_dir)]
    base = ["tokenizer", "train", "--vocab-size", "300", "--force"]
    refused(capsys, base + ["--out", str(data), str(data / "train.jsonl")],
            f"--out {data}", "contains the source input")
    refused(capsys, base + ["--out", str(tmp_path), str(data / "train.jsonl")],
            "contains the source input")
    refused(capsys, base + ["--out", str(user_dir), str(data / "train.jsonl")],
            f"--out {user_dir}", "notes.txt")
    assert [tree(data), tree(user_dir)] == before
    out = tmp_path / "tok"
    assert main(base[:-1] + ["--out", str(out), str(data / "train.jsonl")]) == 0
    assert main(base + ["--out", str(out), str(data / "train.jsonl")]) == 0  # its own
    assert (out / "tokenizer.json").exists() and (out / MARKER).exists()


# ---------------------------------------------------------------- convert, random


def test_convert_refuses_source_containment_and_user_dirs(model, user_dir, tmp_path, capsys):
    before = tree(model)
    base = ["convert", "--hf-path", str(model), "--force", "--mlx-path"]
    refused(capsys, base + [str(model.parent)], "contains the source --hf-path")
    refused(capsys, base + [str(model)], "is the source --hf-path")
    refused(capsys, base + [str(model / "mlx")], "lies inside the source --hf-path")
    refused(capsys, base + [str(user_dir)], f"--mlx-path {user_dir}", "notes.txt")
    to_hf = ["convert", "--to-hf", "--mlx-path", str(model), "--force", "--hf-path"]
    refused(capsys, to_hf + [str(model.parent)], "contains the source --mlx-path")
    refused(capsys, to_hf + [str(model / "hf")], "lies inside the source --mlx-path")
    quantize = base[:-1] + ["-q", "--mlx-path", str(model)]
    refused(capsys, quantize, "is the source --hf-path")
    assert tree(model) == before and tree(user_dir)["mine/notes.txt"]


def test_a_model_directory_without_the_marker_is_never_replaced(model, tmp_path, capsys):
    """Model directories written by earlier versions carry no marker: refused, and
    the message says how to tell."""
    other = tmp_path / "older"
    shutil.copytree(model, other)
    before = tree(other)
    line = refused(capsys, ["convert", "--hf-path", str(model), "--mlx-path", str(other),
                            "--force"], f"--mlx-path {other}", MARKER, "earlier version")
    assert "config.json" in line and tree(other) == before


def test_random_force_replaces_only_its_own_output(user_dir, tmp_path, capsys):
    before = tree(user_dir)
    refused(capsys, ["random", "--out", str(user_dir), "--force"], f"--out {user_dir}")
    assert tree(user_dir) == before
    out = tmp_path / "r"
    assert main(["random", "--out", str(out)]) == 0
    first = tree(out)
    refused(capsys, ["random", "--out", str(out)], "pass --force")
    assert main(["random", "--out", str(out), "--seed", "1", "--force"]) == 0
    assert tree(out) != first and json.loads((out / MARKER).read_text())["verb"] == "random"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r"]


# ---------------------------------------------------------------- fuse


def test_fuse_refuses_source_containment(model, adapters, tmp_path, capsys):
    before = [tree(model), tree(adapters)]
    base = ["fuse", "--model", str(model), "--adapter-path", str(adapters), "--force"]
    refused(capsys, base + ["--save-path", str(adapters)], "is the source --adapter-path")
    refused(capsys, base + ["--save-path", str(model.parent)], "contains the source --model")
    refused(capsys, base + ["--save-path", str(model / "fused")],
            "lies inside the source --model")
    refused(capsys, base + ["--save-path", str(tmp_path / "f"), "--export-hf",
                            str(model / "hf")], "--export-hf", "lies inside the source --model")
    refused(capsys, base + ["--save-path", str(tmp_path / "f"), "--export-hf",
                            str(tmp_path / "f" / "hf")], "--export-hf", "--save-path")
    assert [tree(model), tree(adapters)] == before
    assert not (tmp_path / "f").exists()


# ---------------------------------------------------------------- lora


def test_lora_adapter_path_apart_from_sources(model, data, user_dir, adapters, tmp_path,
                                              capsys, monkeypatch):
    before = [tree(model), tree(data), tree(user_dir), tree(adapters)]
    base = ["lora", "--model", str(model), "--train", "--data", str(data), "--iters", "1",
            "--adapter-path"]
    refused(capsys, base + [str(data)], f"--adapter-path {data}", "is the source --data")
    refused(capsys, base + [str(model / "adapters")], "lies inside the source --model")
    refused(capsys, base + [str(model.parent)], "contains the source --model")
    refused(capsys, base + [str(user_dir)], f"--adapter-path {user_dir}", "notes.txt")
    # mlx-lm's adapters (no trainer state): never overwritten by a new run
    refused(capsys, base + [str(adapters)], "adapters.safetensors", "did not write")
    monkeypatch.chdir(tmp_path)
    refused(capsys, base + ["."], "--adapter-path .", "current directory")
    assert [tree(model), tree(data), tree(user_dir), tree(adapters)] == before


# ---------------------------------------------------------------- train


def test_train_out_apart_from_sources(model, data, user_dir, tmp_path, capsys):
    before = [tree(model), tree(data), tree(user_dir)]
    base = ["train", "--data", str(data), "--model", '{"shape": "tiny"}', "--iters", "1",
            "--out"]
    refused(capsys, base + [str(data)], f"--out {data}", "is the source --data")
    refused(capsys, base + [str(data / "run")], "lies inside the source --data")
    refused(capsys, base + [str(user_dir)], f"--out {user_dir}", "notes.txt")
    refused(capsys, base + [str(model), "--init-from", str(model)], "is the source --init-from")
    refused(capsys, base + [str(tmp_path / "r"), "--tokenizer", str(tmp_path / "r" / "tok")],
            "contains the source --tokenizer")
    assert [tree(model), tree(data), tree(user_dir)] == before
    assert not (tmp_path / "r").exists()
    other = tmp_path / "random"
    assert main(["random", "--out", str(other)]) == 0  # another verb's output
    refused(capsys, base + [str(other)], "holds the output of ouro-mlx random")


# ---------------------------------------------------------------- demo-train, bench


def test_demo_train_out_refuses_a_user_dir_and_the_cwd(user_dir, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setenv("OURO_MLX_NO_PRELOAD", "1")
    before = tree(user_dir)
    refused(capsys, ["demo-train", "--out", str(user_dir), "--force"],
            f"--out {user_dir}", "notes.txt")
    monkeypatch.chdir(user_dir)
    refused(capsys, ["demo-train", "--out", ".", "--force"], "current directory")
    assert tree(user_dir) == before


def test_bench_json_out_never_over_a_source_or_a_user_file(model, tmp_path, capsys):
    before = tree(model)
    base = ["bench", "--model", str(model), "--json-out"]
    refused(capsys, base + [str(model / "config.json")], "lies inside the source --model")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    refused(capsys, base + [str(notes)], f"--json-out {notes}", "not a bench result")
    assert tree(model) == before and notes.read_text() == '{"mine": true}'


# ---------------------------------------------------------------- a full disk


def mlx_full_disk(monkeypatch, after: int):
    """mx.save_safetensors fails as MLX does on a full disk (a RuntimeError, a short
    file left) once ``after`` files were written; the disk then reports no free space."""
    real_save, real_usage = mx.save_safetensors, shutil.disk_usage
    calls = []

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) <= after:
            return real_save(path, arrays, metadata=metadata)
        Path(path).write_bytes(b"\0" * 100)  # what a full disk leaves
        raise RuntimeError("[write] Unable to write 334556 bytes to file.")

    def usage(path):
        return real_usage(path)._replace(free=0)

    monkeypatch.setattr(mx, "save_safetensors", save)
    monkeypatch.setattr(shutil, "disk_usage", usage)

    def free_space():
        monkeypatch.setattr(mx, "save_safetensors", real_save)
        monkeypatch.setattr(shutil, "disk_usage", real_usage)
    return free_space


@pytest.fixture(scope="module")
def shards(tiny_dir, tmp_path_factory):
    import ouro_mlx
    from ouro_mlx.data import prepare

    _, tok = ouro_mlx.load(tiny_dir)
    d = tmp_path_factory.mktemp("shards")
    (d / "t.jsonl").write_text(JSONL * 4)
    prepare([d / "t.jsonl"], d / "shards", tok, seq_len=16)
    return d / "shards"


def test_train_disk_full_is_one_line_and_the_retry_works(shards, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "run"
    flags = ["train", "--data", str(shards), "--out", str(out), "--model",
             '{"shape": "tiny"}', "--iters", "4", "--batch-size", "2",
             "--save-every", "2", "--eval-every", "0", "--plot", "false"]
    free_space = mlx_full_disk(monkeypatch, after=2)  # the second checkpoint fails
    line = refused(capsys, flags, "ouro-mlx train: error: no space left on the device "
                   f"writing {out / 'ckpt-0000004'}", "The last good checkpoint is kept")
    assert line.endswith(f"{out / 'ckpt-0000002'}.")
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, "ckpt-0000002", "history.jsonl", "latest"]
    kept = tree(out / "ckpt-0000002")
    free_space()
    assert main(flags) == 0  # the retry resumes from step 2 and finishes
    assert (out / "latest").read_text() == "ckpt-0000004"
    assert tree(out / "ckpt-0000002") == kept
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_lora_disk_full_is_one_line_and_the_retry_works(data, tmp_path, monkeypatch,
                                                        capsys):
    out = tmp_path / "adapters"
    flags = ["lora", "--model", str(model_path()), "--train", "--data", str(data),
             "--iters", "2", "--save-every", "1", "--batch-size", "2", "--num-layers", "1",
             "--steps-per-eval", "100", "--val-batches", "1", "--adapter-path", str(out)]
    # each save writes adapters and optimizer state: the second save fails
    free_space = mlx_full_disk(monkeypatch, after=2)
    refused(capsys, flags, "ouro-mlx lora: error: no space left on the device writing "
            f"{out}. The last checkpoint is kept: {out} (iteration 1)")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["iteration"] == 1  # the first checkpoint, whole
    kept = tree(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapters.")]
    free_space()
    assert main(flags) == 0
    assert json.loads((out / "trainer_state.json").read_text())["iteration"] == 2
    assert kept != tree(out) and (out / "0000001_adapters.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapters.")]


def test_write_errors_name_the_destination_on_a_full_disk(tmp_path, monkeypatch):
    from ouro_mlx.loading import write_errors

    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError) as e, write_errors(tmp_path / "out", 10):
        raise RuntimeError("[write] Unable to write 10 bytes to file.")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- links, the hub cache


def test_links_are_followed_to_the_source(model, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(model.parent)
    before = tree(model)
    refused(capsys, ["convert", "--hf-path", str(model), "--mlx-path", str(link / "demo"),
                     "--force"], "is the source --hf-path")
    refused(capsys, ["random", "--out", str(link), "--force"], f"--out {link}", "link")
    assert tree(model) == before


def test_a_repo_id_source_protects_its_cached_snapshot(model, tmp_path, capsys, monkeypatch):
    """A source named by its hub repo id: its snapshot in the local cache, and the
    blobs its links point to, are sources too (found offline, never downloaded)."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "blobs").mkdir()
    shutil.copytree(model, snapshot)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree(repo)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(JSONL)
    base = ["data", "--tokenizer", "org/tiny", "--force", str(corpus), "--out"]
    refused(capsys, base + [str(snapshot)], "is the source --tokenizer org/tiny")
    refused(capsys, base + [str(repo / "blobs")], "lies inside the source --tokenizer")
    refused(capsys, base + [str(tmp_path / "hub")], "contains the source --tokenizer")
    assert tree(repo) == before


def test_bench_replaces_only_its_own_results(tmp_path):
    from ouro_mlx.commands.bench import is_bench_result
    from ouro_mlx.outputs import output_file

    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text(json.dumps({"config": {}, "runs": {}}))
    theirs.write_text("[1, 2, 3]")
    assert output_file(mine, "--json-out", force=None, ours=is_bench_result) == mine
    with pytest.raises(ValueError, match="--json-out .*theirs.json exists and is not a "
                                         "bench result"):
        output_file(theirs, "--json-out", force=None, ours=is_bench_result,
                    kind="bench result")
