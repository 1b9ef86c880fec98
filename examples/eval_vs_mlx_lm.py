"""``ouro-mlx eval`` against ``mlx_lm.evaluate`` by loop depth, scores and time.

    python examples/eval_vs_mlx_lm.py [--limit 1000] [--tasks shell_game_mc shell_game]

mlx_lm.evaluate sees one depth per run: for each depth it runs on a copy of the model
whose config is set to that depth (``total_ut_steps`` = T and ``early_exit_threshold``
1.0, or the model's own threshold for ``q``), in this process, with the same task
manager, seed and limit. ``ouro-mlx eval`` then runs every depth at once
(``ouro_mlx.commands.eval``'s own steps). Prints both tables and the seconds each
took, model loading and lm-eval's start-up left out of both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--tasks", nargs="+", default=["shell_game_mc", "shell_game"])
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    import lm_eval
    from mlx_lm.evaluate import MLXLM

    from ouro_mlx.commands.eval import evaluate_at, results_table, task_manager
    from ouro_mlx.demo import model_path
    from ouro_mlx.evaluate import DepthRunner, metrics
    from ouro_mlx.loading import load
    from ouro_mlx.scoring import Depths

    manager = task_manager(args.tasks, None)
    model, tokenizer = load(model_path())
    keys = ["1", "2", "3", "4", f"q{model.exit_threshold:g}"]
    stock, stock_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            d = Path(tmp) / key
            shutil.copytree(model_path(), d)
            if not key.startswith("q"):
                cfg = json.loads((d / "config.json").read_text())
                cfg.update(total_ut_steps=int(key), early_exit_threshold=1.0)
                (d / "config.json").write_text(json.dumps(cfg))
            lm = MLXLM(str(d), batch_size=args.batch_size)
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # batch_generate's progress lines
                r = lm_eval.simple_evaluate(
                    model=lm, tasks=args.tasks, task_manager=manager, limit=args.limit,
                    apply_chat_template=lm.use_chat_template, log_samples=False,
                    random_seed=123, numpy_random_seed=123, torch_random_seed=123,
                    fewshot_random_seed=123)
            stock_s[key] = time.perf_counter() - start
            stock[key] = {t: metrics(m) for t, m in r["results"].items()}

    runner = DepthRunner(model, tokenizer, Depths((1, 2, 3, 4), (model.exit_threshold,)),
                         batch_size=args.batch_size, progress=False)
    ns = argparse.Namespace(tasks=args.tasks, num_shots=None, limit=args.limit,
                            fewshot_as_multiturn=False, seed=123, confirm_run_unsafe_code=False)
    start = time.perf_counter()
    runs = {key: evaluate_at(runner, key, ns, manager) for key in keys}
    ours_s = time.perf_counter() - start
    ours = results_table(runs, runner)

    print(f"{args.limit} games, batch size {args.batch_size}\n")
    print("| task | depth | mlx_lm.evaluate | ouro-mlx eval | avg loops |")
    print("|---|---|---:|---:|---:|")
    for task in args.tasks:
        for key in keys:
            row = ours[task][key]
            metric = next(m for m in row if not m.endswith("_stderr") and m != "avg_loops")
            loops = row.get("avg_loops", key)
            print(f"| {task} | {key} | {stock[key][task][metric]:.3f} | {row[metric]:.3f} "
                  f"| {loops} |")
    total = sum(stock_s.values())
    print(f"\nmlx_lm.evaluate: {total:.1f} s for {len(keys)} runs "
          + ", ".join(f"{k} {v:.1f}" for k, v in stock_s.items()))
    print(f"ouro-mlx eval: {ours_s:.1f} s for all {len(keys)} depths "
          f"({ours_s / total:.2f}x; {runner.passes} scoring passes)")


if __name__ == "__main__":
    main()
