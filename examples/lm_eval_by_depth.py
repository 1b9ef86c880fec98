"""lm-evaluation-harness against ``ouro-mlx serve``, at each loop depth, offline.

    pip install "lm-eval[api]"
    python examples/lm_eval_by_depth.py [--n 200] [--model DIR]

For each depth (T = 1..4 loop steps per token, every token, prompt included, and the
model's adaptive exit), serves the model with ``ouro-mlx serve --ut-steps T
--exit-threshold 1.0`` (or its default exit rule) on 127.0.0.1 and runs, on the
shell-game tasks of ``examples/lm_eval_tasks`` (``--n`` held-out games):

- ``local-completions``: token-id prompts, the multiple-choice task by loglikelihood
  (``echo`` + ``logprobs``) and the generation task, the tokenizer read from the
  server (``/tokenizer_info``, ``/tokenize``: no hub download);
- ``local-chat-completions``: the generation task with ``--apply_chat_template``;

then prints them next to ``ouro-mlx demo-eval`` on the same games. Run from the
repository root (the task files name their data relative to it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from server_load import start_server  # (this directory is on sys.path when run)

HERE = Path(__file__).parent
TASKS = HERE / "lm_eval_tasks"


def lm_eval(url: str, route: str, tasks: str, out: Path, extra: list[str]) -> dict:
    """One ``lm_eval run``: {task: {metric: value}}."""
    model = "local-completions" if route == "completions" else "local-chat-completions"
    args = f"base_url={url}/v1/{route},model=ouro,max_length=64"
    if route == "completions":
        args += ",tokenizer_backend=remote,tokenized_requests=True"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args,
           "--include_path", str(TASKS), "--tasks", tasks, "--output_path", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lm_eval failed:\n{done.stderr[-3000:]}")
    results = {}
    for f in sorted(out.rglob("results_*.json")):
        for task, metrics in json.loads(f.read_text())["results"].items():
            results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                             if isinstance(v, float) and "stderr" not in k}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="held-out games")
    p.add_argument("--model", default=None, help="default: the bundled model")
    args = p.parse_args()
    from ouro_mlx.demo import model_path

    model = args.model or str(model_path())
    subprocess.run([sys.executable, str(TASKS / "make_shell_games.py"), "--n", str(args.n)],
                   check=True, capture_output=True)
    demo = json.loads(subprocess.run(
        [sys.executable, "-m", "ouro_mlx", "demo-eval", "--model", model, "--n", str(args.n),
         "--json"], check=True, capture_output=True, text=True).stdout)["accuracy"]
    depths = {str(t): ["--ut-steps", str(t), "--exit-threshold", "1.0"] for t in (1, 2, 3, 4)}
    depths["adaptive"] = []
    print(f"{args.n} held-out shell games (1-3 swaps)\n")
    print("| depth | lm-eval MC acc (completions, loglikelihood) | lm-eval exact match "
          "(completions) | lm-eval exact match (chat) | demo-eval |")
    print("|---|---:|---:|---:|---:|")
    for name, flags in depths.items():
        proc, url = start_server(model, "ouro", flags=tuple(flags))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                comp = lm_eval(url, "completions", "shell_game_mc,shell_game_gen",
                               Path(tmp) / "c", ["--batch_size", "8"])
                chat = lm_eval(url, "chat/completions", "shell_game_gen_chat",
                               Path(tmp) / "h", ["--apply_chat_template"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"| {name} | {comp['shell_game_mc']['acc']:.3f} | "
              f"{comp['shell_game_gen']['exact_match']:.3f} | "
              f"{chat['shell_game_gen_chat']['exact_match']:.3f} | {demo[name]:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
