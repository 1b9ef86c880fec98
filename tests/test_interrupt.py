"""Ctrl-C in train, lora and demo-train: the step in flight is saved, one line says how
to resume, the exit status is 130, and the printed command continues from that step."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time

import pytest

import ouro_mlx
from tests.test_cli import ENV

PROGRESS = re.compile(r"\|\s*([1-9]\d*)/\d+")  # a tqdm bar past its first step
MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 320,
         "max_position_embeddings": 64}


def start(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ouro_mlx", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def interrupt_when(p: subprocess.Popen, pattern: re.Pattern, timeout: float = 120
                   ) -> tuple[str, str]:
    """Read stderr until ``pattern`` shows, send SIGINT, return (stdout, stderr)."""
    err, deadline = b"", time.monotonic() + timeout
    while not pattern.search(err.decode(errors="replace")):
        assert time.monotonic() < deadline and p.poll() is None, err.decode()[-2000:]
        if select.select([p.stderr], [], [], 1)[0]:
            err += os.read(p.stderr.fileno(), 65536)
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=timeout)
    return out.decode(), (err + rest).decode()


def resume_line(err: str, verb: str) -> tuple[str, list[str]]:
    """The one line that says how to resume, and its command's argv after ouro-mlx."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0]
    assert lines[0].startswith(f"ouro-mlx {verb}: interrupted at ")
    command = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert command[:2] == ["ouro-mlx", verb]
    return lines[0], command[1:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ouro_mlx.data import prepare

    d = tmp_path_factory.mktemp("shards")
    _, tok = ouro_mlx.load("demo")
    (d / "t.jsonl").write_text("".join(
        json.dumps({"text": f"{i},{i + 1},{i + 2} ={i % 4}"}) + "\n" for i in range(60)))
    prepare([d / "t.jsonl"], d / "shards", tok, seq_len=16)
    return d / "shards"


def test_ctrl_c_in_train_saves_the_step_and_the_printed_command_resumes(shards, tmp_path):
    p = start(["train", "--data", str(shards), "--out", "run", "--model", json.dumps(MODEL),
               "--iters", "100000", "--save-every", "100000", "--batch-size", "2",
               "--ut-steps", "2", "--eval-every", "0", "--plot", "false"], tmp_path)
    out, err = interrupt_when(p, PROGRESS)
    assert p.returncode == 130, err
    line, command = resume_line(err, "train")
    step = int(re.search(r"interrupted at step (\d+); saved", line)[1])
    ckpt = f"ckpt-{step:07d}"
    assert (tmp_path / "run" / "latest").read_text() == ckpt
    assert json.loads((tmp_path / "run" / ckpt / "trainer_state.json").read_text())[
        "step"] == step
    # the printed command resumes there (here with fewer --iters, to end soon)
    done = subprocess.run([sys.executable, "-m", "ouro_mlx", *command, "--iters",
                           str(step + 2)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resumed from run/{ckpt} at step {step}" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == step + 2


def test_ctrl_c_in_lora_saves_the_iteration_and_the_printed_command_resumes(tmp_path):
    (tmp_path / "data").mkdir()
    row = {"messages": [{"role": "user", "content": "2,23,14,31"},
                        {"role": "assistant", "content": "=133"}]}
    (tmp_path / "data" / "train.jsonl").write_text((json.dumps(row) + "\n") * 4)
    p = start(["lora", "--train", "--data", "data", "--iters", "100000", "--batch-size", "2",
               "--loss", "fixed", "--ut-steps", "1", "--adapter-path", "ad"], tmp_path)
    out, err = interrupt_when(p, PROGRESS)
    assert p.returncode == 130, err
    line, command = resume_line(err, "lora")
    it = int(re.search(r"interrupted at iteration (\d+); saved ad", line)[1])
    state = json.loads((tmp_path / "ad" / "trainer_state.json").read_text())
    assert state["iteration"] == it and len(state["losses"]) == it
    done = subprocess.run([sys.executable, "-m", "ouro_mlx", *command, "--iters",
                           str(it + 1)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Resuming ad at iteration {it}." in done.stdout
    assert json.loads((tmp_path / "ad" / "trainer_state.json").read_text())[
        "iteration"] == it + 1


def test_ctrl_c_in_demo_train_resumes_with_the_printed_command(tmp_path):
    p = start(["demo-train", "--out", "dt", "--scale", "0.1"], tmp_path)
    out, err = interrupt_when(p, PROGRESS)
    assert p.returncode == 130, err
    line, command = resume_line(err, "demo-train")
    assert command == ["demo-train", "--out", "dt", "--scale", "0.1", "--resume"]
    step = int(re.search(r"interrupted at step (\d+); saved \S*dt/stage1/ckpt-", line)[1])
    # the resumed run keeps the finished stages and continues stage 1 at that step
    # (stopped again at once: the whole recipe is not this test's business)
    p = start(command, tmp_path)
    out, err = interrupt_when(p, re.compile(r"\|\s*\d+/\d+"))
    assert p.returncode == 130, err
    assert re.search(rf"resumed from \S*dt/stage1/ckpt-{step:07d} at step {step}", out), out
    assert "1/6" not in out and "2/6" not in out and "3/6" not in out
    resume_line(err, "demo-train")


def test_demo_train_resume_checks_the_run(tmp_path):
    from ouro_mlx.demo.recipe import run

    with pytest.raises(ValueError, match="no recipe.json"):
        run(tmp_path / "none", resume=True)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "recipe.json").write_text(json.dumps({"scale": 0.5}))
    with pytest.raises(ValueError, match="started with --scale 0.5"):
        run(tmp_path / "r", resume=True, scale=0.1)


def test_ctrl_c_elsewhere_is_one_line_and_130(monkeypatch, capsys):
    from ouro_mlx import cli
    from ouro_mlx.commands import generate

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "main", interrupted)
    assert cli.main(["generate", "--prompt", "x"]) == 130
    assert capsys.readouterr().err.strip() == "ouro-mlx generate: interrupted."
