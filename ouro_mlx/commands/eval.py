"""ouro-mlx eval: lm-evaluation-harness tasks at every loop depth, in-process.

  ouro-mlx eval --model DIR --tasks arc_easy --ut-steps 1-4 --exit-threshold 0.5 0.9
  ouro-mlx eval --model DIR --tasks my_task --include-path my_tasks/ --limit 200
  ouro-mlx eval --tasks shell_game shell_game_mc --output-dir results --json
  {"results": {"shell_game_mc": {"1": {"acc": ...}, ..., "q0.6": {"acc": ..., "avg_loops": ...}}}}

shell_game and shell_game_mc are the bundled model's game (always available).

Depth keys: "1", "2", ... run that many loop steps on every token (beyond the trained
depth too); "q<Q>" stops each token at the first step whose exit cdf reaches Q
(within the model's trained loop count; "avg_loops" is the loop steps per scored or
generated token). Loglikelihood tasks (multiple choice, perplexity) get every depth
from one forward pass per batch; generation tasks run once per depth.

The flags are mlx_lm.evaluate's where they mean the same, and so are the scores at
one depth. --output-dir gets lm-eval's results per depth (DEPTH/results.json),
eval.json and eval.png (accuracy and loop steps against depth). Tasks come from
lm-eval's registry or from --include-path (task YAML files and local data: nothing
is downloaded then). Needs lm-eval: pip install "lm-eval>=0.4.9,<0.5" (and matplotlib
for eval.png), or pip install ".[eval]" in a checkout of ouro-mlx.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

INSTALL = ('lm-eval is not installed: pip install "lm-eval>=0.4.9,<0.5" (or '
           'pip install ".[eval]" in a checkout of ouro-mlx)')


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter, add_model_args, add_scoring_args, seed

    p = argparse.ArgumentParser(prog="ouro-mlx eval", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names.")
    p.add_argument("--include-path", default=None,
                   help="A directory of lm-eval task YAML files to add to the registry.")
    add_scoring_args(p)
    p.add_argument("--output-dir", default=None,
                   help="Write lm-eval's results per depth, eval.json and eval.png here.")
    p.add_argument("--force", action="store_true",
                   help="Replace an --output-dir an earlier eval wrote.")
    p.add_argument("--batch-size", type=int, default=8,
                   help="Sequences scored or generated at once.")
    p.add_argument("--num-shots", type=int, default=None, help="Few-shot examples.")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="Tokens to generate per request, over the tasks' own "
                        "max_gen_toks; also the longest context scored.")
    p.add_argument("--limit", type=int, default=None, help="Examples per task.")
    p.add_argument("--seed", type=seed, default=123, help="Random seed.")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="Few-shot examples as a multi-turn chat.")
    p.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                   default=None, help="Put prompts in the chat template (default: when "
                   "the tokenizer has one).")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="Allow tasks that run code of their own (lm-eval's flag).")
    p.add_argument("--json", action="store_true", help="Print only the JSON results.")
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (("--batch-size", args.batch_size, 1),
                             ("--num-shots", args.num_shots, 0),
                             ("--max-tokens", args.max_tokens, 1),
                             ("--limit", args.limit, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}.")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise ValueError(f"--include-path {args.include_path}: not a directory.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL) from None
    import time

    import mlx.core as mx

    from ..evaluate import DepthRunner
    from ..loading import load
    from ..outputs import output_dir
    from .options import apply_compile_flag, apply_exit_gate, model_or_demo, scoring_depths

    path = model_or_demo(args)
    dest = None
    if args.output_dir is not None:
        sources = [(flag, value) for flag, value in (
            ("--model", path), ("--include-path", args.include_path),
            ("--adapter-path", args.adapter_path), ("--exit-gate", args.exit_gate)) if value]
        dest = output_dir(args.output_dir, "--output-dir", force=args.force, sources=sources)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mx.random.seed(args.seed)
    apply_compile_flag(args)
    model, tokenizer = load(path, dtype=args.dtype,
                            adapter_path=args.adapter_path)
    apply_exit_gate(model, args)
    depths = scoring_depths(args, model)
    runner = DepthRunner(model, tokenizer, depths, batch_size=args.batch_size,
                         max_tokens=args.max_tokens, use_chat_template=args.apply_chat_template,
                         progress=not args.json)
    manager = task_manager(args.tasks, args.include_path)
    runs, seconds = {}, {}
    for key in depths.keys():
        if not args.json:
            print(f"depth {key}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        runs[key] = evaluate_at(runner, key, args, manager)
        seconds[key] = time.perf_counter() - start
    table = results_table(runs, runner)
    report = {"results": table, "seconds": {k: round(v, 3) for k, v in seconds.items()},
              "passes": runner.passes}
    if dest is not None:
        write_outputs(dest, runs, report, args.force)
    if args.json:
        print(json.dumps({"results": table}))
        return 0
    print_table(table)
    if dest is not None:
        print(f"results in {args.output_dir}")
    return 0


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task registry: only --include-path's tasks when they are all there
    (indexing lm-eval's thousands of built-in tasks takes a while), else all."""
    from lm_eval.tasks import TaskManager

    from ..demo import TASKS

    paths = [str(TASKS)] + ([include_path] if include_path else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=paths)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"--tasks: no task named {', '.join(missing)}"
                         + ("" if include_path else " (add --include-path DIR for your own)"))
    return manager


def evaluate_at(runner, key: str, args: argparse.Namespace, manager) -> dict:
    """lm-eval's results dict for the model at depth ``key``."""
    import logging

    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomKwargsNote) for f in task_log.filters):
        task_log.addFilter(_CustomKwargsNote())
    return lm_eval.simple_evaluate(
        model=runner.lm(key), tasks=args.tasks, task_manager=manager,
        num_fewshot=args.num_shots, limit=args.limit,
        apply_chat_template=runner.use_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        log_samples=False)


class _CustomKwargsNote:
    """Drops lm-eval's note on every task with a dataset function (the bundled ones)."""

    def filter(self, record) -> bool:
        return not str(record.msg).endswith("For details see task Readme.")


def results_table(runs: dict, runner) -> dict:
    """{task: {depth: {metric: value}}}, with avg_loops for the adaptive depths."""
    from ..evaluate import metrics

    table: dict = {}
    for key, run in runs.items():
        loops = runner.avg_loops(key)
        for task, result in run["results"].items():
            row = metrics(result)
            if not key.isdigit() and task in loops:
                row["avg_loops"] = round(loops[task], 4)
            table.setdefault(task, {})[key] = row
    return table


def metric_names(row: dict) -> list[str]:
    """A results row's scores: not their standard errors, not the loop count."""
    return [m for m in row if not m.endswith("_stderr") and m != "avg_loops"]


def print_table(table: dict) -> None:
    for task, by_depth in table.items():
        names = metric_names(next(iter(by_depth.values())))
        print(f"\n{task}")
        print(f"{'depth':<8} " + " ".join(f"{n:>12}" for n in names) + f" {'avg loops':>10}")
        for key, row in by_depth.items():
            loops = row.get("avg_loops", int(key) if key.isdigit() else float("nan"))
            vals = " ".join(f"{row.get(n, float('nan')):>12.4f}" for n in names)
            print(f"{key:<8} {vals} {loops:>10.2f}")


def write_outputs(dest, runs: dict, report: dict, force: bool) -> None:
    """DEPTH/results.json (lm-eval's), eval.json and eval.png, written together."""
    from lm_eval.utils import handle_non_serializable

    from ..loading import atomic_directory

    with atomic_directory(dest, force=force, verb="eval") as tmp:
        for key, run in runs.items():
            (tmp / key).mkdir()
            body = {k: v for k, v in run.items() if k != "samples"}
            (tmp / key / "results.json").write_text(
                json.dumps(body, indent=2, default=handle_non_serializable))
        (tmp / "eval.json").write_text(json.dumps(report, indent=2))
        if not plot(report["results"], tmp / "eval.png"):
            print("(no eval.png: pip install matplotlib for the plot)", file=sys.stderr)


def plot(table: dict, path) -> bool:
    """Each task's main metric against loop depth (fixed depths as a line, adaptive
    exits as points at their average loop steps). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (task, by_depth) in enumerate(table.items()):
        color = f"C{i % 10}"
        names = metric_names(next(iter(by_depth.values())))
        if not names:
            continue
        metric = names[0]
        fixed = sorted((int(k), r[metric]) for k, r in by_depth.items()
                       if k.isdigit() and metric in r)
        if fixed:
            ax.plot(*zip(*fixed), "o-", color=color, label=f"{task} ({metric})")
        for k, r in by_depth.items():
            if not k.isdigit() and "avg_loops" in r and metric in r:
                ax.plot(r["avg_loops"], r[metric], "D", color=color, mfc="white")
                ax.annotate(k, (r["avg_loops"], r[metric]), textcoords="offset points",
                            xytext=(5, -10), fontsize=8, color=color)
    ax.set_xlabel("loop steps per token (lines: fixed depth; ◇: adaptive exit, avg)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
