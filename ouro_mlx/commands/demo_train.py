"""ouro-mlx demo-train: train the bundled demo model from nothing — task data,
tokenizer, shards, Stage I, Stage II, evaluation — into one directory.

  ouro-mlx demo-train --out runs/demo
  cp runs/demo/model/* ouro_mlx/demo/model/     # to ship it
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ouro-mlx demo-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=1.0,
                   help="Multiply the training steps (e.g. 0.01 for a smoke run).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 10:
        raise ValueError(f"--scale must be in (0, 10], got {args.scale}.")

    from ..demo.recipe import run

    run(args.out, force=args.force, scale=args.scale)
    return 0
