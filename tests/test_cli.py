"""The command line, and Ouro inside mlx-lm's own tools (subprocesses)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ouro_mlx.convert import hf_to_mlx

# NO_COLOR from the caller's shell would turn off the colours some tests look for
ENV = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"},
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          input=stdin, env=ENV, timeout=timeout)


def ouro(*args: str, **kw):
    return run("-m", "ouro_mlx", *args, **kw)


@pytest.fixture(scope="module")
def mlx_dir(tiny_dir, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mlx") / "tiny-8bit"
    hf_to_mlx(tiny_dir, dst, quantize=True, q_bits=8, q_group_size=32)
    return dst


def test_help_and_unknown_verb():
    out = ouro("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "convert" in out.stdout
    out = ouro("frobnicate")
    assert out.returncode == 2
    assert out.stderr == ("ouro-mlx: unknown verb 'frobnicate'; ouro-mlx --help lists "
                          "the verbs.\n")
    out = ouro("generat")
    assert out.returncode == 2
    assert out.stderr == "ouro-mlx: unknown verb 'generat'; did you mean 'generate'?\n"
    out = ouro()  # no verb: a usage error, the verbs listed on stderr
    assert out.returncode == 2 and out.stdout == "" and "generate" in out.stderr


def test_random_then_generate(tmp_path):
    out = ouro("random", "--out", str(tmp_path / "m"), "--seed", "3")
    assert out.returncode == 0, out.stderr
    out = ouro("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello",
               "--max-tokens", "6", "--ut-steps", "2", "--exit-threshold", "0.5")
    assert out.returncode == 0, out.stderr
    stats = out.stderr.strip().splitlines()[-1]
    assert "prompt:" in stats and "generation:" in stats and "peak memory" in stats
    assert "tokens" in stats and "tok/s" in stats


def test_generate_is_reproducible_with_seed_and_reads_stdin(tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "-", "--max-tokens", "8",
            "--temp", "1.0", "--top-p", "0.9", "--seed", "7", "--no-chat-template"]
    a, b = ouro(*args, stdin="abc"), ouro(*args, stdin="abc")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--ut-steps", "0"], "--ut-steps must be >= 1, got 0."),
    (["--prompt", "x", "--exit-at-step", "-1"], "--exit-at-step must be >= 0, got -1."),
    (["--prompt", "x", "--exit-threshold", "1.5"], "--exit-threshold must be in [0, 1]"),
    (["--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["--prompt", "x" * 3000], "positions"),
    (["--prompt", "x", "--kv-mode", "middle"], "invalid choice"),
    (["--prompt", "x", "--min-loops", "9"], "--min-loops must be in [1, 4]"),
    # absurd depths fail at once, before anything is allocated
    (["--prompt", "x", "--ut-steps", "1000000"], "--ut-steps: 1000000 loop steps per token "
                                                 "are above the limit of 64"),
    (["--prompt", "x", "--max-loops", "1000000"], "--max-loops: 1000000 loop steps"),
    (["--prompt", "x", "--exit-at-step", "1000000"], "--exit-at-step: 1000001 loop steps"),
    # non-finite numbers would pass every range check
    (["--prompt", "x", "--temp", "nan"], "argument --temp: must be a finite number"),
    (["--prompt", "x", "--top-p", "nan"], "argument --top-p: must be a finite number"),
    (["--prompt", "x", "--repetition-penalty", "nan"], "argument --repetition-penalty: must"),
    (["--prompt", "x", "--exit-threshold", "nan"], "argument --exit-threshold: must be a"),
    (["--prompt", "x", "--hidden-eps", "inf"], "argument --hidden-eps: must be a finite"),
    (["--prompt", "x", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**64)"),
    (["--prompt", "x", "--top-p", "2"], "--top-p must be in [0, 1], got 2.0."),
    (["--prompt", "x", "--kv-bits", "4"], "--kv-bits is unavailable for this model: its "
                                          "head_dim (16)"),
])
def test_generate_bad_input_is_a_clear_error(tiny_dir, args, message):
    out = ouro("generate", "--model", str(tiny_dir), *args)
    assert out.returncode in (1, 2) and message in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("ouro-mlx generate: error: ")


def test_errors_name_flags_as_typed():
    """A bad option is named as the user typed it (--max-loops, not max_loops), also
    where the check lives in the library, in one style across generate and chat."""
    import re

    from ouro_mlx.commands.options import flag_names

    assert flag_names("max_loops must be in [min_loops=3, 4], got 2.") == \
        "--max-loops must be in [--min-loops 3, 4], got 2."
    assert flag_names("config.json: early_exit_threshold must be") == \
        "config.json: early_exit_threshold must be"  # a config field stays a field
    for verb, flags, flag in [
        ("generate", ["--exit-threshold", "1.5"], "--exit-threshold must be in [0, 1]"),
        ("generate", ["--min-loops", "3", "--max-loops", "2"], "--max-loops must be in"),
        ("generate", ["--compile-step"], "--compile-step needs a fixed depth"),
        ("chat", ["--ut-steps", "2", "--exit-at-step", "5"], "--exit-at-step must be in"),
        ("chat", ["--exit-threshold", "1", "--draft-loops", "4"], "--draft-loops must be"),
    ]:
        out = ouro(verb, *(["-p", "4,34,12,23"] if verb == "generate" else []), *flags,
                   stdin="/exit\n")
        line = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 1 and line.startswith(f"ouro-mlx {verb}: error: {flag}"), \
            (flags, out.stderr)
        assert not re.search(r"\b[a-z]+_[a-z_]+\b", line), line  # no Python names


def test_generate_rejects_non_utf8_prompt(tiny_dir):
    """argv bytes that are not UTF-8 arrive as surrogate escapes: one line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "ouro_mlx", "generate", "--model", str(tiny_dir),
                          "--prompt", b"ab\xff"], capture_output=True, env=ENV, timeout=300)
    assert out.returncode == 2 and b"argument --prompt/-p: not valid UTF-8" in out.stderr
    assert b"Traceback" not in out.stderr


def test_generate_stdin_drops_one_trailing_newline_and_says_why_it_stopped():
    """--prompt - reads like $(cat): "2,23,14,31\n" is the prompt "2,23,14,31"."""
    args = ["generate", "-p", "2,23,14,31", "--show-depth"]
    typed, piped = ouro(*args), ouro(*args[:2], "-", *args[3:], stdin="2,23,14,31\n")
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout == piped.stdout == "=133\n"
    summary = typed.stderr.strip().splitlines()[-1]
    assert summary.endswith("finished: end of answer")
    assert "loop steps per token: " in typed.stderr  # piped: the per-token list
    assert "e+" not in summary and " tok/s" in summary  # plain numbers
    short = ouro("generate", "-p", "2,23,14,31", "-m", "2", "--ignore-chat-template")
    assert short.stderr.strip().endswith("finished: --max-tokens 2 reached")


def test_generate_rejects_non_utf8_stdin(tiny_dir):
    out = subprocess.run([sys.executable, "-m", "ouro_mlx", "generate", "--model", str(tiny_dir),
                          "--prompt", "-"], input=b"ab\xff\xfe", capture_output=True, env=ENV,
                         timeout=300)
    assert out.returncode == 1 and b"not valid UTF-8" in out.stderr


def test_convert_cli_round_trip_and_errors(tiny_dir, tmp_path):
    out = ouro("convert", "--hf-path", str(tiny_dir), "--mlx-path", str(tmp_path / "m"),
               "-q", "--q-bits", "8", "--q-group-size", "32", "--verify")
    assert out.returncode == 0, out.stderr
    assert "verify: OK — largest |logit difference|" in out.stdout
    out = ouro("convert", "--hf-path", str(tmp_path / "h"), "--mlx-path",
               str(tmp_path / "m"), "--to-hf", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "h" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    out = ouro("convert", "--hf-path", str(tiny_dir), "--mlx-path", str(tmp_path / "m"))
    assert out.returncode == 1 and "--force" in out.stderr
    out = ouro("convert", "--hf-path", str(tmp_path / "none"), "--mlx-path", str(tmp_path / "x"))
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_mlx_lm_generate_runs_ouro_without_remote_code(mlx_dir):
    out = run("-m", "mlx_lm", "generate", "--model", str(mlx_dir), "--prompt", "hi",
              "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "Generation: 4 tokens" in out.stdout or "Generation:" in out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_serves_ouro(mlx_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(mlx_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 3}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=body, headers={"Content-Type": "application/json"})
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    reply = json.loads(r.read())
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] <= 3
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_examples_run(tiny_dir):
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = run(str(examples / "generate.py"), str(tiny_dir), "hi", "2")
    assert out.returncode == 0, out.stderr
    out = run(str(examples / "loop_depth.py"), str(tiny_dir), "The capital")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("step ") == 4 + 3 and "p(exit here)" in out.stdout
    out = run(str(examples / "measure_load.py"), str(tiny_dir))
    assert out.returncode == 0, out.stderr
    assert "load" in out.stdout and "MLX peak" in out.stdout



def test_examples_default_to_the_bundled_model_and_print_usage():
    """No arguments: the bundled demo model, not an IndexError; --help: usage."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = run(str(examples / "generate.py"))
    assert out.returncode == 0 and out.stdout.strip() == "=133", out.stderr
    out = run(str(examples / "loop_depth.py"))
    assert out.returncode == 0 and "p(exit here)" in out.stdout, out.stderr
    out = run(str(examples / "measure_load.py"))
    assert out.returncode == 0 and "demo" in out.stdout, out.stderr
    out = run(str(examples / "train_step_cost.py"), "tiny", "8")
    assert out.returncode == 0 and "tokens/s" in out.stdout, out.stderr
    for script in sorted(examples.glob("*.py")):
        out = run(str(script), "--help")
        assert out.returncode == 0 and out.stdout.startswith("usage: "), script
    out = run(str(examples / "train_step_cost.py"), "no-such-shape")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("verb", ["generate", "chat", "bench", "demo-eval", "demo-train"])
def test_help_describes_every_flag_with_its_default(verb):
    import importlib

    module = importlib.import_module(f"ouro_mlx.commands.{verb.replace('-', '_')}")
    out = ouro(verb, "--help")
    assert out.returncode == 0 and "usage: ouro-mlx " + verb in out.stdout
    for action in module.build_parser()._actions:
        assert action.help, f"{verb} {action.option_strings} has no help"
    if verb in ("generate", "chat"):
        assert "(default: 512)" in out.stdout and "-m MAX_TOKENS" in out.stdout
    if verb == "generate":
        assert "-p PROMPT" in out.stdout and "--ignore-chat-template" in out.stdout
        text = " ".join(out.stdout.split())
        for words in ("Temperature (0 = greedy). (default: 0.0)", "(0 = off). (default: 0)",
                      "Stop every token after loop step K (0 = one loop, 1 = two loops, "
                      "...; default: off)", "the model's trained loop count, 4 for Ouro"):
            assert words in text, words
    # the user's terms: no module paths or config keys
    for words in ("ouro_mlx.decoding", "total_ut_steps", "early_exit_threshold", "mx.compile"):
        assert words not in out.stdout, (verb, words)
