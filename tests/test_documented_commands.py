"""Every shell command shown in README.md and docs/*.md, run as a reader would: with the
installed ``ouro-mlx`` (the console script beside this Python), from a scratch
directory outside the source tree, offline.

- Commands come from the ```bash blocks (continuation lines joined, comments dropped,
  ``a && b`` split into its commands) and from ``$ `` lines of transcripts.
- Each documentation file runs in document order in its own directory, so a command
  can use what an earlier one wrote (convert, then generate the converted model). A
  command shown twice in one file runs once.
- Hugging Face repo ids (``ByteDance/Ouro-1.4B``, ...) resolve, with
  ``HF_HUB_OFFLINE=1``, to a local hub cache holding tiny random checkpoints under
  those ids; the files a reader brings (``data/``, ``corpus.jsonl``, ``weights.pt``,
  ...) are written small by ``reader_files``.
- Long runs get small sizes from ``OVERRIDES``, each with its reason; servers are
  started, asked once and stopped; interactive commands get their input on stdin.
- A command is either run or listed in ``EXCEPTIONS`` with the reason it is not; a
  documented command that is neither fails ``test_every_documented_command_is_run_or_excused``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # the venv the package is installed in
OURO = BIN / "ouro-mlx"
TIMEOUT = 300  # seconds per command; every one takes seconds at these sizes

# Commands not run, and why. Patterns match the whole command (re.fullmatch).
EXCEPTIONS: list[tuple[str, str]] = [
    (r"python3 -m venv \.venv", "creates the virtual environment this test already runs in"),
    (r"\. \.venv/bin/activate", "activates that environment (the test calls its scripts)"),
    (r"pip install .*", "installs packages from the network; this environment has the "
                        "package and its extras installed already"),
    (r"pytest( -n auto)?", "runs the test suite, this test included"),
    (r"ouro-mlx app( .*)?", "opens a window; tests/test_desktop.py drives the app offscreen"),
    (r"mlx\.launch --hostfile hosts\.json .*",
     "needs the Macs hosts.json names, reached over ssh; the same training runs with two "
     "local processes in `mlx.launch -n 2 ...` (docs/training.md)"),
    (r"mlx\.launch -n 2 --backend ring -- python -m ouro_mlx train --config recipe\.yaml",
     "tests/test_training.py runs this launch (two local processes, ring backend) and "
     "checks its steps against one process; here it would add a minute of CPU"),
    (r"(LD_PRELOAD=\S+ )?python examples/.*",
     "a measurement script of the source checkout (examples/ is not installed) that "
     "runs for minutes to hours; the figures it printed are in the docs"),
    (r"ouro-mlx eval --model ByteDance/\S+ --tasks arc_easy .*",
     "lm-eval's arc_easy and hellaswag download their datasets from the Hugging Face hub; "
     "tests/test_eval.py runs eval on the bundled and local task files"),
    (r"(bash \.gpu/run )?bash examples/gpu_suite\.sh",
     "the GPU measurement script of the source checkout (examples/ is not installed), "
     "minutes at the 1.4B shape; tests/test_bench.py runs it with a tiny model"),
]

# Small sizes for long runs: (pattern searched in the command, replacement or None,
# flags appended, reason). Every matching row applies, in order.
OVERRIDES: list[tuple[str, str | None, str, str]] = [
    (r"--iters \d+", "--iters 2", "", "2 optimizer steps show the run works"),
    (r"^ouro-mlx lora (?!.*--iters)", None, "--iters 2",
     "2 steps instead of mlx-lm's default 1,000"),
    (r"--batch-size 32", "--batch-size 2", "", "the reader's data here is a few examples"),
    (r"^ouro-mlx calibrate-exit (?!.*--reset-gate)", None, "--iters 2 --val-samples 4",
     "2 gate steps, 4 held-out samples instead of 200 each"),
    (r"^ouro-mlx calibrate-exit .*--reset-gate", None, "--iters 2",
     "2 gate steps instead of 200"),
    (r"--demo-problems \d+", "--demo-problems 20", "", "20 games instead of 1,000"),
    (r"^ouro-mlx quantize (?!.*--num-samples)", None, "--num-samples 16",
     "2 DWQ steps instead of 256"),
    (r"^ouro-mlx eval (?!.*--limit)", None, "--limit 20", "20 games instead of 1,000"),
    (r"^python -m ouro_mlx\.demo\.task --n 1000 ", "python -m ouro_mlx.demo.task --n 50 ", "",
     "50 games instead of 1,000"),
    (r"^ouro-mlx demo-eval", None, "--n 20", "20 held-out games instead of 1,000"),
    (r"^ouro-mlx demo-train", None, "--scale 0.002",
     "the recipe's steps × 0.002 instead of 13 minutes of training"),
    (r"--n 20000", "--n 200", "", "200 games instead of 20,000"),
    (r"--random (ouro-1\.4b|custom( --layers \d+)?)", "--random tiny", "",
     "a tiny random model instead of minutes per run at the real width"),
    (r"--shape ouro-1\.4b", "--shape tiny", "", "not 2.9 GB of random weights"),
    (r"--repeats \d+", "--repeats 1", "", "one round of the interleaved runs"),
    (r"--vocab-size 8192", "--vocab-size 300", "",
     "the reader's corpus here is a few kB, too small for 8,192 pieces"),
    (r"--seq-len 1024", "--seq-len 64", "", "rows the small corpus fills"),
    (r"train --config recipe\.yaml", None,
     "--batch-size 2 --grad-accum 1 --model '{\"hidden_size\": 64, \"num_hidden_layers\": "
     "1, \"num_attention_heads\": 2, \"num_key_value_heads\": 2, \"intermediate_size\": "
     "128, \"vocab_size\": 8192}'",
     "the documented recipe.yaml, with a model 8x narrower than its own and a batch the "
     "small corpus fills"),
    (r"--model M (.*)--ut-steps U", r"--model ouro-1.4b-4bit \1--ut-steps 1", "",
     "M and U are placeholders: the 4-bit model written just before, 1 loop step"),
]

# Servers: started in the background, asked GET /v1/models, stopped at the end of
# their block; the block's later commands (curl) talk to them on a free port.
SERVERS = r"(ouro-mlx serve|mlx_lm\.server)( .*)?"
# Interactive: what they read on stdin.
STDIN = {r"ouro-mlx chat( .*)?": "4,34,12,23\n/stats\n/exit\n"}


@dataclass
class Command:
    doc: str  # e.g. README.md
    line: int
    text: str  # as documented
    block: int  # code blocks are numbered within their file
    run: str = ""  # as run, after OVERRIDES
    why: list[str] = field(default_factory=list)  # the overrides' reasons

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _complete(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return not text.endswith("\\")


def documented_commands(doc: Path) -> list[Command]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    i, block = 0, 0
    while i < len(lines):
        m = re.match(r"(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2)
        block += 1
        j, cur, start = i + 1, None, 0
        while j < len(lines) and not re.match(r"\s*```\s*$", lines[j]):
            raw = lines[j][indent:] if not lines[j][:indent].strip() else lines[j]
            j += 1
            if lang in ("bash", "sh", "shell"):
                text = raw
            elif lang == "" and raw.startswith("$ "):  # a transcript's command line
                text = raw[2:]
            elif cur is None:
                continue
            else:
                text = raw
            if cur is None:
                if not text.strip() or text.lstrip().startswith("#"):
                    continue
                cur, start = text.rstrip(), j
            else:
                cur = (cur[:-1].rstrip() + " " + text.strip() if cur.endswith("\\")
                       else cur + "\n" + text)
            if _complete(cur):
                for part in _split_and(_strip_comment(cur)):
                    out.append(Command(doc.name, start, part, block))
                cur = None
        i = j + 1
    return out


def _strip_comment(text: str) -> str:
    """Drop a trailing # comment outside quotes."""
    quote = None
    for k, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or text[k - 1].isspace()):
            return text[:k].rstrip()
    return text.rstrip()


def _split_and(text: str) -> list[str]:
    return [part.strip() for part in re.split(r"\s&&\s", text) if part.strip()]


def excuse(text: str) -> str | None:
    return next((why for pattern, why in EXCEPTIONS if re.fullmatch(pattern, text)), None)


def with_overrides(cmd: Command) -> Command:
    text = cmd.text
    for pattern, replacement, extra, why in OVERRIDES:
        if re.search(pattern, text):
            if replacement is not None:
                text = re.sub(pattern, replacement, text)
            if extra:
                text = f"{text} {extra}"
            cmd.why.append(why)
    cmd.run = text
    return cmd


ALL = [c for doc in DOCS for c in documented_commands(doc)]
TO_RUN = {doc.name: [with_overrides(c) for c in ALL if c.doc == doc.name and not excuse(c.text)]
          for doc in DOCS}


# ---------------------------------------------------------------------------- setup


def hub_cache(root: Path) -> Path:
    """A Hugging Face cache with a tiny random checkpoint under every repo id the docs
    name (models--ORG--NAME/snapshots/REV + refs/main, as the hub client writes it)."""
    from ouro_mlx.random_model import make_random_checkpoint

    repos = sorted({m for c in ALL for m in re.findall(r"\bByteDance/Ouro-[\w.-]+", c.text)})
    # one layer, and a head size of 64 so that --kv-bits 8 applies as on Ouro's
    tiny = make_random_checkpoint(root / "tiny", dict(
        hidden_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, intermediate_size=256, vocab_size=512, max_position_embeddings=2048,
        rope_theta=10000.0), seed=3)
    rev = "0" * 40
    for repo in repos:
        entry = root / "hub" / ("models--" + repo.replace("/", "--"))
        shutil.copytree(tiny, entry / "snapshots" / rev)
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(rev)
    return root / "hub"


def reader_files(cwd: Path, doc: Path) -> None:
    """What the docs assume the reader has: a data directory in mlx-lm's chat format,
    a corpus, a state dict with its config, the recipe and LoRA YAML the docs show."""
    cwd.mkdir(parents=True, exist_ok=True)
    games = [(f"{a}+{b}", str(a + b)) for a in range(12) for b in range(12)]
    data = cwd / "data"
    data.mkdir()
    for name, rows in (("train", games[:96]), ("valid", games[96:120]),
                       ("test", games[120:])):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]}) + "\n"
            for q, a in rows))
    text = [f"Loop {i} adds {i % 7} to {i * 3}; the sum is {i % 7 + i * 3}." for i in range(300)]
    (cwd / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    (cwd / "notes.txt").write_text("\n\n".join(text[::3]) + "\n")
    doc_text = doc.read_text(encoding="utf-8")
    if m := re.search(r"```yaml\n# recipe\.yaml\n(.*?)```", doc_text, re.S):
        (cwd / "recipe.yaml").write_text(m.group(1))  # the documented recipe, verbatim
    elif "recipe.yaml" in doc_text:  # the README names it; docs/training.md shows it
        m = re.search(r"```yaml\n# recipe\.yaml\n(.*?)```",
                      (REPO / "docs" / "training.md").read_text(encoding="utf-8"), re.S)
        (cwd / "recipe.yaml").write_text(m.group(1))
    # lora.yaml / lora-rank2.yaml as docs/finetune.md describes them
    (cwd / "lora.yaml").write_text("lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}\n")
    (cwd / "lora-rank2.yaml").write_text(
        "lora_parameters: {rank: 2, scale: 20.0, dropout: 0.0}\n")
    if "my-weights/weights.pt" in doc_text:  # a raw PyTorch state dict and its config
        import numpy as np
        import torch
        from safetensors.numpy import load_file

        from ouro_mlx.random_model import make_random_checkpoint

        src = make_random_checkpoint(cwd / ".pt-source", "tiny", seed=4)
        weights = {k: torch.from_numpy(np.ascontiguousarray(v))
                   for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
        (cwd / "my-weights").mkdir()
        torch.save(weights, cwd / "my-weights" / "weights.pt")
        shutil.copy(src / "config.json", cwd / "my-weights" / "config.json")
        shutil.rmtree(src)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- running


@dataclass
class Result:
    cmd: Command
    ok: bool
    detail: str = ""
    seconds: float = 0.0


def environment(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               HF_HOME=str(root / "hf-home"), HF_HUB_CACHE=str(root / "hub"),
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", NO_COLOR="1")
    return env


def start_server(cmd: Command, cwd: Path, env: dict, port: int) -> tuple[subprocess.Popen, str]:
    text = re.sub(r"--port \d+", f"--port {port}", cmd.run)
    if "--port" not in text:
        text += f" --port {port}"
    proc = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc, f"exited with status {proc.returncode}: {proc.stdout.read()[-2000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                models = json.load(r)
            if models.get("data"):
                return proc, ""
            return proc, f"GET /v1/models listed no model: {models}"
        except OSError:
            time.sleep(0.5)
    return proc, "did not answer GET /v1/models within 120 s"


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check_output(cmd: Command, out: subprocess.CompletedProcess) -> str:
    """What a successful run must also show: no traceback; a curl answer is a
    completion, not an error body."""
    text = out.stdout + out.stderr
    if "Traceback (most recent call last)" in text:
        return "printed a traceback:\n" + text[-3000:]
    if cmd.run.startswith("curl"):
        try:
            body = json.loads(out.stdout)
        except json.JSONDecodeError:
            return f"answered no JSON: {out.stdout[-1000:]!r}"
        if "choices" not in body:
            return f"answered no completion: {body}"
    return ""


# Files run one after the other in one directory: docs/training.md repeats the
# README's Train commands and goes on from their output.
GROUPS = [["README.md", "training.md"], ["benchmarks.md"], ["finetune.md"]]
GROUPS += [[d.name] for d in DOCS if d.name not in sum(GROUPS, [])]


def run_group(docs: list[str], root: Path) -> list[Result]:
    cwd = root / "cwd" / docs[0].removesuffix(".md")
    reader_files(cwd, next(d for d in DOCS if d.name == docs[0]))
    env = environment(root)
    results: list[Result] = []
    done: set[str] = set()
    server, server_block, port = None, None, None
    try:
        for cmd in [c for doc in docs for c in TO_RUN[doc]]:
            # a server stays up for the commands of its block and those that call it
            if server is not None and cmd.block != server_block and ":8080" not in cmd.text:
                stop_server(server)
                server = None
            if cmd.run in done:  # shown twice: it ran already
                continue
            done.add(cmd.run)
            tic = time.monotonic()
            if re.fullmatch(SERVERS, cmd.run):
                if server is not None:
                    stop_server(server)
                port = free_port()
                server, problem = start_server(cmd, cwd, env, port)
                server_block = cmd.block
                results.append(Result(cmd, not problem, problem, time.monotonic() - tic))
                continue
            text = cmd.run
            if port is not None:
                text = re.sub(r"(localhost|127\.0\.0\.1):8080", rf"\g<1>:{port}", text)
            stdin = next((s for p, s in STDIN.items() if re.fullmatch(p, cmd.run)), "")
            try:
                out = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, input=stdin,
                                     capture_output=True, text=True, timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                results.append(Result(cmd, False, f"still running after {TIMEOUT} s",
                                      time.monotonic() - tic))
                continue
            problem = (f"exit status {out.returncode}:\n{(out.stdout + out.stderr)[-3000:]}"
                       if out.returncode else check_output(cmd, out))
            results.append(Result(cmd, not problem, problem, time.monotonic() - tic))
    finally:
        if server is not None:
            stop_server(server)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[Result]]:
    """Every group of files, two groups at a time (each group in document order)."""
    assert OURO.exists(), f"the console script {OURO} is missing: install the package"
    root = tmp_path_factory.mktemp("documented")
    hub_cache(root)
    tic = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        runs = [r for f in [pool.submit(run_group, g, root) for g in GROUPS]
                for r in f.result()]
    out = {doc.name: [r for r in runs if r.cmd.doc == doc.name] for doc in DOCS}
    total = time.monotonic() - tic
    slowest = sorted((r for rs in out.values() for r in rs), key=lambda r: -r.seconds)[:12]
    print(f"\ndocumented commands: {sum(map(len, out.values()))} run in {total:.0f} s; "
          "slowest: " + "; ".join(f"{r.seconds:.0f} s {r.cmd.where()}" for r in slowest))
    return out


# ---------------------------------------------------------------------------- tests


def test_every_documented_command_is_run_or_excused():
    """A command added to the docs runs here unless EXCEPTIONS says why not; every
    exception and override still matches a documented command (no stale rows)."""
    assert len(ALL) > 40, [c.where() for c in ALL]  # the parser found the blocks
    ran = {id(c) for cs in TO_RUN.values() for c in cs}
    assert all(id(c) in ran or excuse(c.text) for c in ALL)
    for pattern, why in EXCEPTIONS:
        assert any(re.fullmatch(pattern, c.text) for c in ALL), f"stale exception: {pattern}"
    for pattern, _, _, why in OVERRIDES:
        assert any(re.search(pattern, c.text) for c in ALL), f"stale override: {pattern}"
    for doc in DOCS:  # a command in an indented block would escape this test
        fenced = False
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            fenced ^= line.lstrip().startswith("```")
            assert fenced or not re.match(r"    +(\$ )?(ouro-mlx|python|mlx_lm|mlx\.launch|"
                                          r"pip|curl) ", line), \
                f"{doc.name}:{n}: a command outside a ```bash block: {line.strip()}"
    # what the parser makes of a comment and of commands joined by &&
    assert _strip_comment('ouro-mlx x -p "a # b"   # note') == 'ouro-mlx x -p "a # b"'
    assert _split_and("a && b && c") == ["a", "b", "c"]


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_documented_commands_work(doc, results):
    failed = [r for r in results[doc] if not r.ok]
    assert not failed, "\n\n".join(
        f"{r.cmd.where()}\n  ran: {r.cmd.run}\n  {r.detail}" for r in failed)
