"""Exit-gate calibration (ouro-mlx calibrate-exit): only the gate changes, the gate file
round-trips and bad ones are refused in one line, a short run teaches a gate that never
fires to stop early, and the outputs never touch the original model."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ouro_mlx
from ouro_mlx import calibrate as cal
from ouro_mlx import load
from ouro_mlx.cli import main
from ouro_mlx.demo import model_path


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    return [{"messages": [
        {"role": "user", "content": " ".join(rng.choice(words, 4))},
        {"role": "assistant", "content": " ".join(rng.choice(words, 6))}]}
        for _ in range(n)]


def write_jsonl(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


def test_calibration_changes_only_the_gate(tiny_dir):
    model, tok = load(tiny_dir)
    samples = [cal._read(write_jsonl(Path(tiny_dir).parent / "c.jsonl", chats(8)), tok, print)]
    before = params(model)
    losses = cal.train_gate(model, samples[0], iters=3, batch_size=4, learning_rate=1e-2,
                            progress=False)
    after = params(model)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith(cal.GATE):
            assert not np.array_equal(before[k], after[k]), k
        else:
            assert before[k].dtype == after[k].dtype
            assert np.array_equal(before[k], after[k]), k  # bitwise


def test_gate_loss_equals_stage2(tiny_dir, tmp_path):
    """Calibration computes the per-step losses once, outside the gradient, row by row;
    the loss is still the trainer's Stage II loss on the same batch."""
    from ouro_mlx.losses import adaptive_gate_loss, stage2

    model, tok = load(tiny_dir)
    samples = cal._read(write_jsonl(tmp_path / "c.jsonl", chats(3)), tok, print)
    batch, mask = cal.pad_batch(samples, 2048)
    hidden, ce = cal.step_losses(model, batch)
    ours, n = adaptive_gate_loss(ce, cal.gate_logits(model, hidden), mask)
    ref, n_ref = stage2(model, batch, mask)
    assert n.item() == n_ref.item() > 0
    assert abs(ours.item() - ref.item()) < 1e-5
    # the held-out figure calibrate-exit reports: the same loss, token-weighted over batches
    for batch_size in (8, 2):
        rows, held_out = cal.measure_with_gate_loss(model, samples, batch_size=batch_size)
        assert abs(held_out - ref.item()) < 1e-4
        assert rows == cal.measure(model, samples, batch_size=batch_size)


def test_gate_file_round_trips(tiny_dir, tmp_path):
    model, _ = load(tiny_dir)
    cal.reset_gate(model, bias=-3.0)
    model.model.early_exit_gate.weight = mx.arange(64, dtype=mx.float32).reshape(1, 64) / 7
    f = cal.save_gate(tmp_path / "gate.safetensors", model, 0.55)
    assert [p.name for p in tmp_path.iterdir()] == ["gate.safetensors"]  # no temp left
    fresh, _ = load(tiny_dir)
    assert ouro_mlx.load_exit_gate(fresh, f) == 0.55  # the public API
    for k in cal.GATE_KEYS:
        assert np.array_equal(np.array(cal.gate_tensors(fresh)[k]),
                              np.array(cal.gate_tensors(model)[k]))
    cal.save_gate(f, model, None)  # replaces it; no threshold chosen
    assert cal.load_exit_gate(fresh, f) is None
    # a bfloat16 model takes the gate in its own dtype
    half, _ = load(tiny_dir, dtype="bfloat16")
    cal.load_exit_gate(half, f)
    assert half.model.early_exit_gate.weight.dtype == mx.bfloat16


def bad_gate_files(tmp_path: Path, model) -> dict[str, Path]:
    w, b = cal.gate_tensors(model).values()
    good = cal.save_gate(tmp_path / "good.safetensors", model, 0.5)
    files = {}

    def write(name, tensors, meta=None):
        p = tmp_path / name
        mx.save_safetensors(str(p), tensors, metadata=meta or {})
        files[name] = p

    write("shape.safetensors", {cal.GATE_KEYS[0]: mx.zeros((1, 65)), cal.GATE_KEYS[1]: b})
    write("nan.safetensors", {cal.GATE_KEYS[0]: w, cal.GATE_KEYS[1]: mx.array([float("nan")])})
    write("missing.safetensors", {cal.GATE_KEYS[0]: w})
    write("extra.safetensors", {cal.GATE_KEYS[0]: w, cal.GATE_KEYS[1]: b,
                                "lm_head.weight": mx.zeros((2, 2))})
    write("int.safetensors", {cal.GATE_KEYS[0]: w.astype(mx.int32), cal.GATE_KEYS[1]: b})
    write("threshold.safetensors", {cal.GATE_KEYS[0]: w, cal.GATE_KEYS[1]: b},
          {"threshold": "1.5"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    files["truncated.safetensors"] = truncated
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(good.read_bytes())
        f.truncate(cal.MAX_GATE_BYTES + 1)
    files["big.safetensors"] = big
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 3)
    files["junk.bin"] = junk
    (tmp_path / "adir").mkdir()
    files["adir"] = tmp_path / "adir"
    return files


def test_bad_gate_files_are_refused_in_one_line(tiny_dir, tmp_path):
    model, _ = load(tiny_dir)
    gate_before = params(model)
    for name, path in bad_gate_files(tmp_path, model).items():
        with pytest.raises(ValueError) as e:
            cal.load_exit_gate(model, path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, (name, msg)
    with pytest.raises(FileNotFoundError, match="no such gate file"):
        cal.load_exit_gate(model, tmp_path / "absent.safetensors")
    after = params(model)
    assert all(np.array_equal(gate_before[k], after[k]) for k in after)  # nothing applied


def test_short_run_teaches_a_silent_gate_to_exit(tmp_path):
    """The bundled model with its gate reset to (almost) never fire, like the released
    checkpoints': all 4 loops at q = 0.5 before; a few steps of Stage II cut that."""
    model, tok = load(model_path())
    train, valid = cal.demo_data(tok, n_train=64, n_valid=32)
    cal.reset_gate(model)
    before, loss_before = cal.measure_with_gate_loss(model, valid, (0.5,))
    assert before["0.5"]["loops"] == 4.0
    cal.train_gate(model, train, iters=30, batch_size=8, learning_rate=3e-2, progress=False)
    after, loss_after = cal.measure_with_gate_loss(model, valid, (0.5,))
    assert after["0.5"]["loops"] < 3.5
    assert loss_after < 0.5 * loss_before  # the held-out Stage II loss falls
    assert after["full"] == before["full"]  # the LM itself is untouched


def test_diverging_training_is_refused(tiny_dir, tmp_path):
    model, tok = load(tiny_dir)
    samples = cal._read(write_jsonl(tmp_path / "c.jsonl", chats(4)), tok, print)
    model.model.early_exit_gate.bias = mx.array([float("inf")])
    with pytest.raises(ValueError, match="not finite after 1 steps; lower --learning-rate"):
        cal.train_gate(model, samples, iters=1, progress=False)


def test_choose_threshold():
    rows = {"full": {"loops": 4, "loss": 1.0, "accuracy": 0.9},
            "0.3": {"loops": 1.5, "loss": 1.2, "accuracy": 0.7},
            "0.5": {"loops": 2.0, "loss": 1.005, "accuracy": 0.895},
            "0.9": {"loops": 3.0, "loss": 1.0, "accuracy": 0.9}}
    qs = (0.3, 0.5, 0.9)
    assert cal.choose_threshold(rows, qs, 0.01) == 0.5
    assert cal.choose_threshold(rows, qs, 0.0) == 0.9
    assert cal.choose_threshold(rows, qs, 0.5) == 0.3
    assert cal.choose_threshold(rows, qs, 0.01, "accuracy") == 0.5
    rows["0.9"]["loss"] = 2.0
    assert cal.choose_threshold(rows, (0.9,), 0.01) is None


def test_cli_gate_out_and_out_dir(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chats(12), ("{not json",))
    write_jsonl(data / "valid.jsonl", chats(4, seed=1))
    original = digest(tiny_dir)
    gate = tmp_path / "gate.safetensors"
    assert main(["calibrate-exit", "--model", str(tiny_dir), "--data", str(data), "--iters",
                 "2", "--gate-out", str(gate), "--json", "--max-seq-length", "96"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert f"{data / 'train.jsonl'}:13: skipped, not valid JSON" in err
    assert "16 samples are longer than --max-seq-length 96 tokens and are cut" in err
    assert r["train_samples"] == 12 and r["valid_samples"] == 4
    assert set(r["before"]) == {"full", "0.3", "0.5", "0.7", "0.9", "tokens"}
    assert set(r["stage2_loss"]) == {"first", "last", "valid_before", "valid_after"}
    assert all(isinstance(v, float) for v in r["stage2_loss"].values())
    assert r["before"]["full"] == r["after"]["full"]
    model, _ = load(tiny_dir)
    q = cal.load_exit_gate(model, gate)
    assert q == r["threshold"]

    # a new model directory: the same gate, the chosen threshold, loadable; original intact
    dest = tmp_path / "calibrated"
    assert main(["calibrate-exit", "--model", str(tiny_dir), "--data", str(data), "--iters",
                 "2", "--tolerance", "10", "--out", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "chosen threshold: 0.3" in text and f"wrote {dest}" in text
    # the loss before and after: on the held-out samples the table uses, labelled so
    assert re.search(r"^2 steps on 12 samples \(held-out Stage II loss \d\.\d{4} -> "
                     r"\d\.\d{4}[^)]*\); table on 4 held-out samples", text, re.M), text
    new, _ = load(dest)
    assert new.exit_threshold == 0.3
    old, _ = load(tiny_dir)
    a, b = params(new), params(old)
    assert all(np.array_equal(a[k], b[k]) for k in a if not k.startswith(cal.GATE))
    assert not np.array_equal(a[cal.GATE_KEYS[1]], b[cal.GATE_KEYS[1]])
    assert digest(tiny_dir) == original


@pytest.mark.parametrize("flags, message", [
    (["--out", "{model}", "--force"], "is the source --model"),
    (["--gate-out", "{model}/model.safetensors", "--force"], "lies inside the source --model"),
    (["--gate-out", "{model}/model.safetensors"], "lies inside the source --model"),
    (["--gate-out", "{tmp}"], "is a directory"),
    (["--thresholds", "0.5,1"], "--thresholds must be numbers in (0, 1)"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--adapter-path", "{tmp}", "--out", "{tmp}/o"], "--out writes the model without"),
    ([], "--data is required with --model"),
    (["--data", "{tmp}/absent.jsonl"], "absent.jsonl: no such file or directory"),
])
def test_cli_refusals(tiny_dir, tmp_path, capsys, flags, message):
    flags = [f.format(model=tiny_dir, tmp=tmp_path) for f in flags]
    original = digest(tiny_dir)
    assert main(["calibrate-exit", "--model", str(tiny_dir), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert digest(tiny_dir) == original


def test_data_without_valid_file_holds_out_the_end(tiny_dir, tmp_path):
    _, tok = load(tiny_dir)
    f = write_jsonl(tmp_path / "all.jsonl", chats(20))
    train, valid = cal.load_data(f, tok)
    assert (len(train), len(valid)) == (18, 2)
    with pytest.raises(ValueError, match="no train.jsonl"):
        cal.load_data(tmp_path, tok)


def test_cli_with_adapters_trains_only_the_gate(tiny_dir, tmp_path, capsys):
    """--adapter-path: the gate is calibrated for the adapted model; the adapters stay."""
    from ouro_mlx.adapters import adapter_config, apply_adapters, save_adapters

    model, _ = load(tiny_dir)
    apply_adapters(model, num_layers=1)
    save_adapters(tmp_path / "adapters", model, adapter_config({"num_layers": 1}))
    saved = (tmp_path / "adapters" / "adapters.safetensors").read_bytes()
    data = write_jsonl(tmp_path / "d.jsonl", chats(10))
    gate = tmp_path / "gate.safetensors"
    assert main(["calibrate-exit", "--model", str(tiny_dir), "--adapter-path",
                 str(tmp_path / "adapters"), "--data", str(data), "--iters", "2",
                 "--gate-out", str(gate), "--json"]) == 0
    capsys.readouterr()
    assert (tmp_path / "adapters" / "adapters.safetensors").read_bytes() == saved
    adapted, _ = load(tiny_dir, adapter_path=tmp_path / "adapters")
    before = cal.gate_tensors(adapted)[cal.GATE_KEYS[1]].tolist()
    cal.load_exit_gate(adapted, gate)
    assert cal.gate_tensors(adapted)[cal.GATE_KEYS[1]].tolist() != before


def test_help_describes_every_flag(capsys):
    from ouro_mlx.commands.calibrate_exit import build_parser

    for action in build_parser()._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit) as e:
        main(["calibrate-exit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help wraps lines at any width
    assert e.value.code == 0 and "usage: ouro-mlx calibrate-exit" in out
    for default in ("(default: 200)", "(default: 8)", "(default: 0.3,0.5,0.7,0.9)",
                    "(default: 0.01)", "(default: 0)", "2 / hidden_size"):
        assert default in out, default


def test_report_labels_the_loss_change(capsys):
    """The before/after loss is the held-out one; a rise says what to try. Without
    held-out figures, the training batches are named as such."""
    from ouro_mlx.commands.calibrate_exit import print_report

    row = {"loops": 4.0, "loss": 1.0}
    r = {"iters": 5, "train_samples": 2000, "valid_samples": 50, "threshold": 0.5,
         "metric": "loss", "tolerance": 0.01, "written": None,
         "before": {"full": row, "0.5": row, "tokens": 245},
         "after": {"full": row, "0.5": row, "tokens": 245},
         "stage2_loss": {"first": 0.48861, "last": 0.92779, "valid_before": 0.48964,
                         "valid_after": 1.04954}}
    print_report(r, [0.5], 4)
    assert capsys.readouterr().out.splitlines()[0] == (
        "5 steps on 2,000 samples (held-out Stage II loss 0.4896 -> 1.0495, higher: try "
        "more --iters or a lower --learning-rate); table on 50 held-out samples, 245 answer "
        "tokens, teacher forced")
    r["stage2_loss"].update(valid_after=0.3)
    print_report(r, [0.5], 4)
    assert "(held-out Stage II loss 0.4896 -> 0.3000); table" in capsys.readouterr().out
    r["stage2_loss"] = {"first": 0.48861, "last": 0.92779}
    print_report(r, [0.5], 4)
    assert "(Stage II loss on the first batch 0.4886, on the last 0.9278); table" in \
        capsys.readouterr().out
