"""ouro-mlx demo-eval: accuracy of the bundled demo model (or --model, trained on the
same task) on held-out problems at each fixed loop depth and with adaptive exit.

  ouro-mlx demo-eval --json
  {"accuracy": {"1": ..., "2": ..., "3": ..., "4": ..., "adaptive": ...}, "avg_loops_adaptive": ...}

--kv-mode last (one KV cache shared by all loop steps, 1/T of the memory) costs the
bundled model most of its accuracy: it was trained with a cache per loop step.
"""

from __future__ import annotations

import argparse
import json


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter, number, seed

    p = argparse.ArgumentParser(prog="ouro-mlx demo-eval", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="A model trained on the same task (default: the bundled demo model).")
    p.add_argument("--n", type=int, default=1000, help="Held-out problems.")
    p.add_argument("--seed", type=seed, default=None,
                   help="Problem seed (default: the held-out set's).")
    p.add_argument("--exit-threshold", type=number, default=None,
                   help="Q-exit threshold for the adaptive row (default: the model's).")
    p.add_argument("--kv-mode", choices=["full", "last"], default="full",
                   help="full: a KV cache per loop step; last: one shared cache (1/T memory).")
    p.add_argument("--json", action="store_true", help="Print only the JSON figures.")
    p.add_argument("--details", action="store_true",
                   help="With --json: also the threshold and accuracy by number of swaps.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}.")

    from ..demo import model_path
    from ..demo.evaluate import EVAL_SEED, evaluate
    from ..loading import load

    model, tokenizer = load(args.model or str(model_path()))
    r = evaluate(model, tokenizer, args.n, seed=EVAL_SEED if args.seed is None else args.seed,
                 exit_threshold=args.exit_threshold, kv_mode=args.kv_mode)
    if args.json:
        keys = None if args.details else ("accuracy", "avg_loops_adaptive")
        print(json.dumps({k: v for k, v in r.items() if keys is None or k in keys}))
        return 0
    print(f"{r['problems']} held-out problems, exact match "
          f"(adaptive: Q-exit at {r['exit_threshold']}; kv mode {r['kv_mode']})")
    print(f"{'loops':<10} {'accuracy':>9}   by number of swaps")
    for k, acc in r["accuracy"].items():
        ops = " ".join(f"{v:.2f}" for v in r["accuracy_by_swaps"][k].values())
        print(f"{k:<10} {acc:>9.3f}   {ops}")
    print(f"adaptive exit: {r['avg_loops_adaptive']:.2f} loop steps per decoded token on average")
    return 0
