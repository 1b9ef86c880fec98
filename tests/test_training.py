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
