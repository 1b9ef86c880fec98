"""ouro-mlx demo-eval: accuracy of the bundled demo model (or --model, trained on the
same task) on held-out problems at each fixed loop depth and with adaptive exit.

  ouro-mlx demo-eval --json
  {"accuracy": {"1": ..., "2": ..., "3": ..., "4": ..., "adaptive": ...}, "avg_loops_adaptive": ...}

--kv-mode last (one KV cache shared by all loop steps, 1/T of the memory) costs the
bundled model most of its accuracy: it was trained with a cache per loop step.

The shipped model was trained on 1 to 3 swaps. --swaps 1-4 adds 4-swap games (only
games held out of finetuning data, see python -m ouro_mlx.demo.task --help), the new
skill a LoRA adapter teaches it (docs/finetune.md):

  ouro-mlx demo-eval --swaps 1-4 --adapter-path adapters
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
    p.add_argument("--adapter-path", default=None,
                   help="LoRA adapters to apply to the model (ouro-mlx lora's output).")
    p.add_argument("--n", type=int, default=1000, help="Held-out problems.")
    p.add_argument("--swaps", type=swap_range, default=None, metavar="K or MIN-MAX",
                   help="Number of swaps per game, in equal shares (default: 1-3, the "
                        "shipped model's skill).")
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


def swap_range(text: str) -> tuple[int, int]:
    """``4`` or ``1-4`` as (min, max) swaps."""
    from ..demo.task import LONGEST

    lo, sep, hi = text.partition("-")
    try:
        r = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or MIN-MAX, e.g. 4 or 1-4: {text!r}")
    if not 1 <= r[0] <= r[1] <= LONGEST:
        raise argparse.ArgumentTypeError(
            f"swaps between 1 and {LONGEST} (the demo model's 64 positions), min <= max: "
            f"{text!r}")
    return r


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}.")

    from ..demo import model_path
    from ..demo.evaluate import EVAL_SEED, evaluate
    from ..demo.task import MAX_SWAPS
    from ..loading import load

    extra = {} if args.adapter_path is None else {"adapter_path": args.adapter_path}
    model, tokenizer = load(args.model or str(model_path()), fuse=True, **extra)
    r = evaluate(model, tokenizer, args.n, seed=EVAL_SEED if args.seed is None else args.seed,
                 exit_threshold=args.exit_threshold, kv_mode=args.kv_mode,
                 swaps=args.swaps or (1, MAX_SWAPS))
    if args.json:
        keys = None if args.details else ("accuracy", "avg_loops_adaptive")
        print(json.dumps({k: v for k, v in r.items() if keys is None or k in keys}))
        return 0
    print(f"{r['problems']} held-out problems, exact match "
          f"(adaptive: Q-exit at {r['exit_threshold']}; kv mode {r['kv_mode']})")
    ks = " ".join(f"{k:>4}" for k in next(iter(r["accuracy_by_swaps"].values())))
    print(f"{'loops':<10} {'accuracy':>9}   by number of swaps:{ks}")
    for k, acc in r["accuracy"].items():
        ops = " ".join(f"{v:>4.2f}" for v in r["accuracy_by_swaps"][k].values())
        print(f"{k:<10} {acc:>9.3f}   {ops}")
    print(f"adaptive exit: {r['avg_loops_adaptive']:.2f} loop steps per decoded token on average")
    return 0
