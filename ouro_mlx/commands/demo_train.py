"""ouro-mlx demo-train: train the bundled demo model from nothing — task data,
tokenizer, shards, Stage I, Stage II, evaluation — into one directory.

  ouro-mlx demo-train --out runs/demo
  ouro-mlx demo-train --out runs/demo --resume  # after Ctrl-C: continues where it stopped
  ouro-mlx generate --model runs/demo/model --prompt "4,34,12,23" --show-depth
  ouro-mlx demo-eval --model runs/demo/model    # the trained model, as the bundled one
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter

    p = argparse.ArgumentParser(prog="ouro-mlx demo-train", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True,
                   help="Directory for the data, tokenizer, checkpoints and the final model.")
    p.add_argument("--scale", type=float, default=1.0,
                   help="Multiply the training steps (e.g. 0.01 for a smoke run).")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    p.add_argument("--resume", action="store_true",
                   help="Continue an interrupted run in --out (same --scale): finished "
                        "stages are kept, training resumes from its last checkpoint.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.scale <= 10:
        raise ValueError(f"--scale must be in (0, 10], got {args.scale}.")
    if args.force and args.resume:
        raise ValueError("--force starts over and --resume continues; give one of them.")

    from ..demo.recipe import OPENBLAS, run

    if _should_preload(OPENBLAS):  # ~8× faster GEMMs on Linux CPUs: say so and re-run
        print(f"note: re-running with LD_PRELOAD={OPENBLAS} (MLX's Linux CPU wheel uses the "
              "reference BLAS; set OURO_MLX_NO_PRELOAD=1 to keep it)", file=sys.stderr)
        env = {**os.environ, "LD_PRELOAD": OPENBLAS}
        os.execve(sys.executable, [sys.executable, "-m", "ouro_mlx", "demo-train", *(
            sys.argv[2:] if argv is None else argv)], env)
    try:
        run(args.out, force=args.force, scale=args.scale, resume=args.resume)
    except KeyboardInterrupt as e:  # Ctrl-C: a training stage saved its step first
        import shlex

        resume = shlex.join(["ouro-mlx", "demo-train", "--out", args.out, "--scale",
                             str(args.scale), "--resume"])
        print(f"\nouro-mlx demo-train: {str(e) or 'interrupted'}. Resume with: {resume}",
              file=sys.stderr)
        return 130
    return 0


def _should_preload(lib: str) -> bool:
    return (sys.platform == "linux" and os.path.exists(lib)
            and lib not in os.environ.get("LD_PRELOAD", "")
            and not os.environ.get("OURO_MLX_NO_PRELOAD"))
