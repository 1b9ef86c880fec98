"""ouro-mlx convert: HF PyTorch-format ↔ MLX checkpoints.

  HF → MLX:  ouro-mlx convert --hf-path ByteDance/Ouro-1.4B --mlx-path ouro-1.4b-4bit -q
  MLX → HF:  ouro-mlx convert --mlx-path ouro-1.4b-lora --hf-path ouro-1.4b-hf --to-hf
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from ..convert import Q_MODES

    p = argparse.ArgumentParser(prog="ouro-mlx convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True,
                   help="HF checkpoint: directory, repo id, or a .bin/.pt file (with --config).")
    p.add_argument("--mlx-path", required=True, help="MLX directory.")
    p.add_argument("--to-hf", action="store_true",
                   help="Export --mlx-path to --hf-path (default: HF → MLX).")
    p.add_argument("--config", default=None,
                   help="config.json (or its directory) for a raw .bin/.pt weights file.")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="Output dtype (default: as stored).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize (HF → MLX).")
    p.add_argument("--q-bits", type=int, default=None)
    p.add_argument("--q-group-size", type=int, default=None)
    p.add_argument("--q-mode", choices=list(Q_MODES), default="affine")
    p.add_argument("--mixed", action="store_true",
                   help="Keep embeddings and lm_head at 8 bits when quantizing.")
    p.add_argument("--force", action="store_true", help="Replace a non-empty destination.")
    p.add_argument("--verify", action="store_true",
                   help="Run source and result on a few tokens; "
                        "report the largest logit difference.")
    p.add_argument("--revision", default=None, help="Hub revision of --hf-path.")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..convert import hf_to_mlx, mlx_to_hf

    args = build_parser().parse_args(argv)
    if args.to_hf:
        if args.quantize:
            raise ValueError("--quantize applies to HF → MLX only.")
        diff = mlx_to_hf(args.mlx_path, args.hf_path, dtype=args.dtype,
                         force=args.force, verify=args.verify)
        dest = args.hf_path
    else:
        diff = hf_to_mlx(
            args.hf_path, args.mlx_path, config_path=args.config, dtype=args.dtype,
            quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
            q_mode=args.q_mode, mixed=args.mixed, force=args.force, verify=args.verify,
            revision=args.revision,
        )
        dest = args.mlx_path
    print(f"Wrote {dest}")
    if diff is not None:
        print(f"verify: largest |logit difference| source vs result = {diff:.3e}")
    return 0
