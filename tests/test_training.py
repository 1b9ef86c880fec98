"""The trainer: learning, exact resume, atomic checkpoints under kill -9, NaN stop,
config checks, loop schedule, upcycling, Stage II, and 2-process data parallelism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ouro_mlx
from ouro_mlx.data import prepare
from ouro_mlx.training import TrainConfig, init_model, train, upcycle
from tests.test_cli import ENV


@pytest.fixture(scope="module")
def data_dir(tiny_dir, tmp_path_factory):
    _, tok = ouro_mlx.load(tiny_dir)
    d = tmp_path_factory.mktemp("data")
    (d / "t.jsonl").write_text("".join(
        json.dumps({"text": f"count {i} {i + 1} {i + 2} {i + 3} and so on"}) + "\n"
        for i in range(300)))
    prepare([d / "t.jsonl"], d / "shards", tok, seq_len=24)
    return d / "shards"


def config(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), model={"shape": "tiny"}, iters=8,
                batch_size=4, lr=3e-3, warmup=2, eval_every=4, eval_batches=1,
                save_every=4, plot=False)
    return TrainConfig.from_dict({**base, **kw})


def history(out):
    return [json.loads(r) for r in (Path(out) / "history.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_checkpoints_load(data_dir, tmp_path):
    last = train(config(data_dir, tmp_path / "run", iters=30, plot=True), log=lambda *_: None)
    rows = history(tmp_path / "run")
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert len(last["eval_exit_dist"]) == 4 and abs(sum(last["eval_exit_dist"]) - 1) < 1e-4
    assert (tmp_path / "run" / "training.png").stat().st_size > 1000
    ckpt = tmp_path / "run" / (tmp_path / "run" / "latest").read_text()
    assert ouro_mlx.load_model(ckpt).args.num_hidden_layers == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == [
        "ckpt-0000028", "ckpt-0000030"]  # keep=2


def test_resume_continues_the_same_curve(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "straight"), log=lambda *_: None)
    train(config(data_dir, tmp_path / "resumed", iters=4), log=lambda *_: None)
    train(config(data_dir, tmp_path / "resumed"), log=lambda *_: None)
    a = [r["loss"] for r in history(tmp_path / "straight")]
    b = [r["loss"] for r in history(tmp_path / "resumed")]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_resume_with_another_config_is_refused(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "run", iters=4), log=lambda *_: None)
    with pytest.raises(ValueError, match="config differs in batch_size"):
        train(config(data_dir, tmp_path / "run", batch_size=2), log=lambda *_: None)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    from ouro_mlx.training import NonFiniteLoss

    cfg = config(data_dir, tmp_path / "run", iters=200, lr=1e6, warmup=1, grad_clip=0.0,
                 save_every=1, eval_every=0)
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        train(cfg, log=lambda *_: None)
    latest = tmp_path / "run" / (tmp_path / "run" / "latest").read_text()
    weights = mx.load(str(latest / "model.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in weights.values())


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    def cmd(iters):
        return [sys.executable, "-m", "ouro_mlx", "train", "--data", str(data_dir), "--out",
                str(out), "--model", '{"shape": "tiny"}', "--iters", str(iters),
                "--batch-size", "2", "--save-every", "1", "--eval-every", "0", "--plot", "false"]

    for delay in (4.0, 5.3):
        proc = subprocess.Popen(cmd(100000), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (out / "latest").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(delay - 4.0 + 0.7)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = out / (out / "latest").read_text()
        model = ouro_mlx.load_model(latest)  # loads: complete and consistent
        state = json.loads((latest / "trainer_state.json").read_text())
        assert state["step"] >= 1 and model(mx.array([[1, 2]])).shape == (1, 2, 512)
    # and the run resumes from it
    latest = out / (out / "latest").read_text()
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    done = subprocess.run(cmd(step + 2), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert history(out)[-1]["step"] == step + 2


def test_loop_schedule_and_bad_options(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", loop_schedule=[[0, 8], [4, 4]])
    assert [cfg.steps_at(s) for s in (0, 3, 4, 7)] == [8, 8, 4, 4]
    train(cfg, log=lambda *_: None)
    assert [r["ut_steps"] for r in history(tmp_path / "run")] == [8] * 4 + [4] * 4
    with pytest.raises(ValueError, match="Unknown training options: colour"):
        TrainConfig.from_dict({"data": "x", "colour": 1})
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig.from_dict({"data": "x", "loss": "magic"})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_dict({"data": "x", "batch_size": 0})


def test_upcycle_duplicates_layers():
    model = init_model(TrainConfig(data="x", model={"shape": "tiny"}))
    big = upcycle(model, 2)
    assert len(big.layers) == 4
    a = dict(tree_flatten(model.layers[1].parameters()))
    b = dict(tree_flatten(big.layers[3].parameters()))
    assert all(mx.array_equal(a[k], b[k]) for k in a)
    assert big.layers[2] is not big.layers[3]


def test_stage2_changes_only_the_gate(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "s1", iters=4), log=lambda *_: None)
    s1 = tmp_path / "s1" / (tmp_path / "s1" / "latest").read_text()
    before = dict(mx.load(str(s1 / "model.safetensors")))
    train(config(data_dir, tmp_path / "s2", iters=4, loss="stage2", init_from=str(s1),
                 lr=1e-2), log=lambda *_: None)
    s2 = tmp_path / "s2" / (tmp_path / "s2" / "latest").read_text()
    after = dict(mx.load(str(s2 / "model.safetensors")))
    changed = {k for k in before if not mx.array_equal(before[k], after[k])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}


def test_two_process_data_parallel_step_equals_single_process(data_dir, tmp_path):
    common = ["--data", str(data_dir), "--model", '{"shape": "tiny"}', "--iters", "1",
              "--lr", "0.01", "--warmup", "1", "--eval-every", "0", "--plot", "false"]
    single = subprocess.run([sys.executable, "-m", "ouro_mlx", "train", "--out",
                             str(tmp_path / "one"), "--batch-size", "4", *common],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launch = Path(sys.executable).parent / "mlx.launch"
    dp = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--", sys.executable,
                         "-m", "ouro_mlx", "train", "--out", str(tmp_path / "two"),
                         "--batch-size", "2", *common],
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert dp.returncode == 0, dp.stdout + dp.stderr
    a = mx.load(str(tmp_path / "one" / "ckpt-0000001" / "model.safetensors"))
    b = mx.load(str(tmp_path / "two" / "ckpt-0000001" / "model.safetensors"))
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    # Tolerance: gradients agree to float32 summation order (~1e-7 relative); Adam's
    # first step divides each gradient by its own magnitude, which turns that into
    # up to ~1e-3·lr on weights whose gradient is near zero (lr = 0.01 here).
    assert worst < 1e-4, worst
    la, lb = history(tmp_path / "one")[0]["loss"], history(tmp_path / "two")[0]["loss"]
    assert abs(la - lb) < 1e-5


def test_tensor_parallel_training_equals_single_process_and_resumes_across(data_dir, tmp_path):
    """2 processes with the model split: the step equals the single-process step, the
    checkpoint holds whole tensors (a single process resumes it), and a tensor-parallel
    run resumes a single-process checkpoint."""
    import shutil

    common = ["--data", str(data_dir), "--model", '{"shape": "tiny"}', "--lr", "0.01",
              "--warmup", "1", "--eval-every", "0", "--plot", "false", "--batch-size", "4",
              "--save-every", "1", "--keep", "3", "--tensor-parallel", "true"]
    launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring",
              "--", sys.executable, "-m", "ouro_mlx", "train"]
    single = [sys.executable, "-m", "ouro_mlx", "train"]

    def run(cmd, out, iters):
        r = subprocess.run([*cmd, "--out", str(out), "--iters", str(iters), *common], env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def weights(out, step):
        return mx.load(str(out / f"ckpt-{step:07d}" / "model.safetensors"))

    def worst(a, b):
        assert a.keys() == b.keys()
        return max(float(mx.abs(a[k] - b[k]).max()) for k in a)

    run(single, tmp_path / "one", 2)
    log = run(launch, tmp_path / "tp", 1)
    assert "tensor parallel over 2 processes: 14 parameters split" in log
    assert worst(weights(tmp_path / "one", 1), weights(tmp_path / "tp", 1)) < 1e-4
    run(single, tmp_path / "tp", 2)  # single process resumes the gathered checkpoint
    assert worst(weights(tmp_path / "one", 2), weights(tmp_path / "tp", 2)) < 1e-4
    (tmp_path / "tp2").mkdir()
    shutil.copytree(tmp_path / "one" / "ckpt-0000001", tmp_path / "tp2" / "ckpt-0000001")
    (tmp_path / "tp2" / "latest").write_text("ckpt-0000001")
    run(launch, tmp_path / "tp2", 2)  # tensor parallel resumes a whole checkpoint
    assert worst(weights(tmp_path / "one", 2), weights(tmp_path / "tp2", 2)) < 1e-4
    la = history(tmp_path / "one")[0]["loss"]
    assert abs(la - history(tmp_path / "tp")[0]["loss"]) < 1e-5


def test_tensor_parallel_logits_equal_single_device(tiny_dir, tmp_path):
    script = Path(__file__).parent / "scripts" / "tp_logits.py"
    launch = Path(sys.executable).parent / "mlx.launch"
    out = tmp_path / "tp.npz"
    run = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--", sys.executable,
                          str(script), str(tiny_dir), str(out)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    got = np.load(out)
    model = ouro_mlx.load_model(tiny_dir)
    ids = mx.array([[5, 17, 300, 42, 7, 99, 128, 3]])
    np.testing.assert_allclose(got["logits"], np.array(model(ids, exit_threshold=0.5)), atol=1e-4)
    np.testing.assert_allclose(got["step"], np.array(model(ids)[:, -1:]), atol=1e-4)


@pytest.mark.parametrize("options,message", [
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
    ({"lr": -1e-3}, "lr must be > 0"),
    ({"min_lr": float("inf")}, "min_lr must be a finite number"),
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"iters": 0}, "iters must be >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"beta": "lots"}, "beta must be a finite number, got 'lots'"),
    ({"betas": [0.9, 1.5]}, "betas must be two numbers in"),
    ({"grad_clip": -1}, "grad_clip must be >= 0"),
    ({"save_every": 0}, "save_every must be >= 1"),
    ({"eval_every": -5}, "eval_every must be >= 0"),
    ({"decay_frac": 2}, "decay_frac must be between 0 and 1"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"ut_steps": 10**6}, "ut_steps is 1000000, above the maximum"),
    ({"loop_schedule": [[0, "eight"]]}, "loop_schedule entry's ut_steps must be an integer"),
    ({"loop_schedule": "8"}, "loop_schedule must be a list of"),
    ({"plot": "yes"}, "plot must be true or false"),
    ({"model": {"shape": "huge"}}, "unknown shape 'huge'; known shapes: tiny, small"),
    ({"model": {"shape": "tiny", "hidden_size": "64"}}, "model: hidden_size must be an integer"),
])
def test_hyper_parameters_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"data": "x", **options})


def test_yaml_numbers_without_a_dot_are_read_as_numbers():
    # YAML 1.1 reads `lr: 3e-4` as a string
    assert TrainConfig.from_dict({"data": "x", "lr": "3e-4"}).lr == 3e-4


def test_bad_flags_are_one_line(data_dir, tmp_path, capsys):
    from ouro_mlx.cli import main

    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                 "--lr", "nan"]) == 1
    err = capsys.readouterr().err
    assert err == "ouro-mlx train: error: lr must be a finite number, got nan.\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("model", [{"shape": "tiny", "hidden_size": 10**9},
                                   {"shape": "tiny", "num_hidden_layers": 10**6}])
def test_a_model_too_big_for_memory_fails_at_once(data_dir, tmp_path, model):
    tic = time.perf_counter()
    with pytest.raises(ValueError, match=r"Training this model needs about [\d,.]+ GiB but "
                                         r"this machine has"):
        train(config(data_dir, tmp_path / "run", model=model), log=lambda *_: None)
    assert time.perf_counter() - tic < 5 and not (tmp_path / "run").exists()


def test_help_describes_every_option_with_its_default():
    from dataclasses import fields

    from ouro_mlx.commands.train import build_parser

    parser = build_parser()
    helps = {a.dest: a.help for a in parser._actions}
    for f in fields(TrainConfig):
        assert len(helps[f.name].split("(default:")[0]) > 12, f.name  # a description
        assert helps[f.name].endswith(")") and "(default: " in helps[f.name], f.name
    assert "Loop steps by optimizer step, as JSON [[step, ut_steps], ...], e.g. [[0, 8], " \
           "[1000, 4]]. (default: [])" in " ".join(parser.format_help().split())


def test_non_finite_weights_are_never_saved(data_dir, tmp_path):
    import mlx.optimizers as optim

    from ouro_mlx.data import Position
    from ouro_mlx.training import NonFiniteLoss, save_checkpoint

    out = tmp_path / "run"
    train(config(data_dir, out, iters=2, save_every=2, eval_every=0), log=lambda *_: None)
    cfg = config(data_dir, out, iters=4)
    model = init_model(cfg)
    model.lm_head.weight = model.lm_head.weight * float("nan")
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    with pytest.raises(NonFiniteLoss, match=r"not finite after step 4 \(lm_head.weight.*"
                                            r"last good checkpoint is kept: .*ckpt-0000002"):
        save_checkpoint(out, 4, model, opt, Position(), cfg, None)
    assert (out / "latest").read_text() == "ckpt-0000002"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "ckpt"))) == [
        ".ouro-mlx.json", "ckpt-0000002"]


@pytest.mark.parametrize("how", ["raises", "short write"])
def test_disk_full_while_saving_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch,
                                                          capsys, how):
    """ENOSPC during the second checkpoint: one line, no partial files, latest on the
    first; mx.save_safetensors itself writes short files silently on a full disk."""
    import errno

    from ouro_mlx.cli import main

    out = tmp_path / "run"
    real = mx.save_safetensors
    calls = []

    def full_disk(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) <= 2:
            return real(path, arrays, metadata=metadata)
        if how == "raises":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arrays, metadata=metadata)
        os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    flags = ["train", "--data", str(data_dir), "--out", str(out), "--model", '{"shape": "tiny"}',
             "--iters", "4", "--batch-size", "4", "--save-every", "2", "--eval-every", "0",
             "--plot", "false"]
    assert main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ouro-mlx train: error: no space left on the device writing ")
    assert err.endswith(f"The last good checkpoint is kept: {out / 'ckpt-0000002'}.")
    assert (out / "latest").read_text() == "ckpt-0000002"
    assert sorted(p.name for p in out.iterdir()) == [".ouro-mlx.json", "ckpt-0000002",
                                                     "history.jsonl", "latest"]
    monkeypatch.setattr(mx, "save_safetensors", real)
    assert main(flags) == 0  # the retry resumes from step 2 and finishes
    assert [r["step"] for r in history(out)] == [1, 2, 3, 4]


def test_resume_skips_damaged_checkpoints_and_a_cut_history_line(data_dir, tmp_path):
    from ouro_mlx.training import plot_history

    out = tmp_path / "run"
    notes = []
    train(config(data_dir, out, iters=6, save_every=2, keep=3), log=lambda *_: None)
    first = history(out)
    # a kill left a temporary checkpoint and half a history line behind
    (out / ".ckpt-0000008.tmp-4194999").mkdir()
    with open(out / "history.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    # the newest optimizer file is truncated, the one before has a corrupt state
    opt = out / "ckpt-0000006" / "optimizer.safetensors"
    os.truncate(opt, opt.stat().st_size // 2)
    (out / "ckpt-0000004" / "trainer_state.json").write_text('{"step": 4, "posi')
    train(config(data_dir, out, iters=6, save_every=2, keep=3), log=notes.append)
    assert any("skipping" in n and "ckpt-0000006: damaged" in n for n in notes)
    assert any("ckpt-0000004: damaged" in n for n in notes)
    assert f"resumed from {out / 'ckpt-0000002'} at step 2" in notes
    rows = history(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in first], rtol=1e-5)
    assert not (out / ".ckpt-0000008.tmp-4194999").exists()
    with open(out / "history.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    assert plot_history(out / "history.jsonl", out / "p.png") is not None
    # nothing usable at all: one line, not a traceback
    for ckpt in out.glob("ckpt-*"):
        (ckpt / "trainer_state.json").write_text("[")
    with pytest.raises(ValueError, match=f"No usable checkpoint in {out}"):
        train(config(data_dir, out, iters=8), log=lambda *_: None)


def test_plot_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    import matplotlib.figure

    from ouro_mlx.training import plot_history

    (tmp_path / "history.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(OSError):
        plot_history(tmp_path / "history.jsonl", tmp_path / "training.png")
    assert [p.name for p in tmp_path.iterdir()] == ["history.jsonl"]


def test_cli_prints_rounded_figures_and_where_it_saved(data_dir, tiny_dir, tmp_path, capsys):
    """stdout: the final figures as one JSON line, rounded (history.jsonl keeps them
    whole); stderr ends with the checkpoint written and the command that uses it."""
    import shlex

    from ouro_mlx.cli import main

    out = tmp_path / "my run"
    flags = ["train", "--data", str(data_dir), "--out", str(out), "--model", '{"shape": "tiny"}',
             "--iters", "3", "--batch-size", "2", "--eval-every", "3", "--eval-batches", "1",
             "--plot", "false", "--lr", "0.0003", "--warmup", "7"]
    assert main([*flags, "--tokenizer", str(tiny_dir)]) == 0
    stdout, err = capsys.readouterr()
    last = json.loads(stdout.strip().splitlines()[-1])
    row = history(out)[-1]
    assert last["step"] == 3 and last["ut_steps"] == 4
    assert last["loss"] == round(row["loss"], 4) != row["loss"]
    assert last["lr"] == float(f"{row['lr']:.3g}") == 0.000129  # 3e-4 * 3/7
    assert last["eval_step_losses"] == [round(x, 4) for x in row["eval_step_losses"]]
    assert last["eval_expected_loops"] == round(row["eval_expected_loops"], 3)
    assert err.strip().splitlines()[-1] == (
        f"saved {out / 'ckpt-0000003'} (step 3); generate with: ouro-mlx generate --model "
        f'{shlex.quote(str(out))} --prompt "Hi"')
    ouro_mlx.load(out)  # what that command loads: the run directory's latest checkpoint
    # run again: nothing left to do, and it says so
    assert main([*flags, "--tokenizer", str(tiny_dir)]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"nothing to train: {out / 'ckpt-0000003'} is already at step 3 (raise --iters")
    # without --tokenizer the checkpoint cannot generate: it says what to pass instead
    flags[flags.index(str(out))] = str(tmp_path / "bare")
    assert main(flags) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"saved {tmp_path / 'bare' / 'ckpt-0000003'} (step 3); it holds no tokenizer, so "
        "generate cannot use it (pass --tokenizer DIR, the one the data was prepared with, "
        "so checkpoints carry it)")


@pytest.mark.parametrize("text,message", [
    ("data: x\nbogus_key: 1\n", "unknown option 'bogus_key'"),
    ("data: x\nbatch-size: 1\nlrr: 2\n",
     "unknown options 'batch-size' (did you mean 'batch_size'?), 'lrr' (did you mean 'lr'?)"),
    ("data: x\nmodel:\n  shape: tiny\n   bad: 1\n",
     "cannot read it (mapping values are not allowed here at line 4, column 7)"),
    ("data: [x\n", "cannot read it (expected ',' or ']', but got '<stream end>' at line 2, "
                   "column 1)"),
    ("- data\n- x\n", "must hold a mapping of options (key: value lines), not a list"),
    ("just words\n", "must hold a mapping of options (key: value lines), not a string"),
    (None, "cannot read it (no such file or directory)"),
    (b"\xff\xfedata: x\n", "cannot read it (not UTF-8 text)"),
    ("data: x\nlr: fast\n", "lr must be a finite number, got 'fast'."),
    ("data: x\nbatch_size: two\n", "batch_size must be an integer, got 'two'."),
    ("data: x\nmodel: {shape: huge}\n", "model: unknown shape 'huge'"),
    ("data: x\nloop_schedule: [[0, 0]]\n",
     "a loop_schedule entry's ut_steps must be an integer >= 1, got 0."),
])
def test_config_file_errors_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch,
                                                         text, message):
    from ouro_mlx.cli import main

    monkeypatch.chdir(tmp_path)
    if isinstance(text, bytes):
        Path("recipe.yaml").write_bytes(text)
    elif text is not None:
        Path("recipe.yaml").write_text(text)
    assert main(["train", "--config", "recipe.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ouro-mlx train: error: --config recipe.yaml: {message}"), err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_flag_replacing_a_bad_file_value_is_not_blamed_on_the_file(tmp_path, capsys):
    from ouro_mlx.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: x\nlr: fast\nbatch_size: 2\n")
    assert main(["train", "--config", str(recipe), "--lr", "0.01", "--batch-size", "0"]) == 1
    assert capsys.readouterr().err == "ouro-mlx train: error: batch_size must be >= 1, got 0.\n"
