"""ouro-mlx random: write a random-weight Ouro checkpoint in the HF layout."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from ..random_model import SHAPES

    p = argparse.ArgumentParser(prog="ouro-mlx random", description=__doc__)
    p.add_argument("--out", required=True,
                   help="Destination directory (created; must be empty unless --force).")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny",
                   help="Model size: the released 1.4B/2.6B shapes or tiny test ones "
                        "(default: tiny).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="Weight dtype (default: float32).")
    p.add_argument("--ut-steps", type=int, default=4,
                   help="total_ut_steps in the config: loop steps per token (default: 4).")
    p.add_argument("--seed", type=int, default=0,
                   help="Random seed, 0 to 2**64 - 1 (default: 0).")
    p.add_argument("--force", action="store_true",
                   help="Replace --out when ouro-mlx wrote it (never a directory of yours).")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..model import check_ut_steps
    from ..random_model import make_random_checkpoint

    p = build_parser()
    args = p.parse_args(argv)
    check_ut_steps(args.ut_steps, "--ut-steps")
    if not 0 <= args.seed < 2**64:
        p.error(f"argument --seed: must be from 0 to 2**64 - 1, got {args.seed}.")
    path = make_random_checkpoint(args.out, args.shape, dtype=args.dtype, seed=args.seed,
                                  total_ut_steps=args.ut_steps, force=args.force)
    print(f"Wrote a random {args.shape} Ouro checkpoint ({args.dtype}) to {path}")
    return 0
