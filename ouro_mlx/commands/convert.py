"""ouro-mlx convert: HF PyTorch-format ↔ MLX checkpoints.

  HF → MLX:  ouro-mlx convert --hf-path ByteDance/Ouro-1.4B --mlx-path ouro-1.4b-4bit -q
  MLX → HF:  ouro-mlx convert --mlx-path ouro-1.4b-lora --hf-path ouro-1.4b-hf --to-hf
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from ..convert import Q_MODES, Q_SUPPORTED

    p = argparse.ArgumentParser(prog="ouro-mlx convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", "--model", required=True,
                   help="HF checkpoint: directory, hub repo id, or a .bin/.pt file (with "
                        "--config); the destination with --to-hf.")
    p.add_argument("--mlx-path", required=True,
                   help="MLX directory: the destination, or the source with --to-hf.")
    p.add_argument("--to-hf", action="store_true",
                   help="Export --mlx-path to --hf-path (default: HF → MLX).")
    p.add_argument("--config", default=None,
                   help="config.json (or its directory) for a raw .bin/.pt weights file.")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="Cast floating weights to this dtype (default: as stored).")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="Quantize (HF → MLX); the exit gate and norms stay in full precision.")
    affine_bits = "/".join(map(str, Q_SUPPORTED["affine"][1]))
    affine_sizes = "/".join(map(str, Q_SUPPORTED["affine"][0]))
    p.add_argument("--q-bits", type=int, default=None,
                   help=f"Bits per weight with -q: {affine_bits} in affine mode; the fp modes "
                        "have fixed bits (default: 4, mxfp8: 8).")
    p.add_argument("--q-group-size", type=int, default=None,
                   help=f"Weights per scale with -q: {affine_sizes} in affine mode "
                        "(default: 64; mxfp4/mxfp8: 32, nvfp4: 16, fixed).")
    p.add_argument("--q-mode", choices=list(Q_MODES), default=None,
                   help="Quantization mode with -q (default: affine).")
    p.add_argument("--mixed", action="store_true",
                   help="With -q: keep embeddings and lm_head at 8 bits.")
    p.add_argument("-d", "--dequantize", action="store_true",
                   help="Read a quantized MLX directory as --hf-path and write it "
                        "dequantized to --mlx-path (as mlx-lm's convert -d).")
    p.add_argument("--force", action="store_true",
                   help="Replace a destination that ouro-mlx wrote (it holds only what "
                        "ouro-mlx put there), never one that holds the source.")
    p.add_argument("--verify", action="store_true",
                   help="Run the written model on a few tokens against the converted one "
                        "(OK within rounding, else exit 1 and write nothing) and report how "
                        "far a cast or quantization moved it from the source.")
    p.add_argument("--revision", default=None,
                   help="Hub revision (branch, tag or commit) of --hf-path (default: main).")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..convert import hf_to_mlx, mlx_to_hf

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to_hf:
        hf_only = {"-q": args.quantize, "-d": args.dequantize,
                   "--q-bits": args.q_bits is not None,
                   "--q-group-size": args.q_group_size is not None,
                   "--q-mode": args.q_mode is not None, "--mixed": args.mixed,
                   "--config": args.config is not None, "--revision": args.revision is not None}
        if unused := [flag for flag, given in hf_only.items() if given]:
            parser.error(f"{', '.join(unused)}: not with --to-hf (only when writing "
                         "--mlx-path).")
        result = mlx_to_hf(args.mlx_path, args.hf_path, dtype=args.dtype,
                           force=args.force, verify=args.verify)
        dest = args.hf_path
    else:
        result = hf_to_mlx(
            args.hf_path, args.mlx_path, config_path=args.config, dtype=args.dtype,
            quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
            q_mode=args.q_mode, mixed=args.mixed, dequantize=args.dequantize,
            force=args.force, verify=args.verify, revision=args.revision,
        )
        dest = args.mlx_path
    print(f"Wrote {dest}")
    if result is not None:
        print(result)
    return 0
