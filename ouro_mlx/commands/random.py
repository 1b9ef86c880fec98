"""ouro-mlx random: write a random-weight Ouro checkpoint in the HF layout."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from ..random_model import SHAPES, make_random_checkpoint

    p = argparse.ArgumentParser(prog="ouro-mlx random", description=__doc__)
    p.add_argument("--out", required=True, help="Destination directory.")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--ut-steps", type=int, default=4, help="total_ut_steps in the config.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    args = p.parse_args(argv)
    path = make_random_checkpoint(args.out, args.shape, dtype=args.dtype, seed=args.seed,
                                  total_ut_steps=args.ut_steps, force=args.force)
    print(f"Wrote a random {args.shape} Ouro checkpoint ({args.dtype}) to {path}")
    return 0
