"""ouro-mlx fuse: merge trained adapters into the base model, as mlx_lm.fuse.

Writes a new MLX model directory (--save-path) with each LoRA/DoRA layer merged into
its base weight, exactly as mlx_lm.fuse merges it; a quantized base stays quantized (the
merged weight re-quantized with its settings) unless --dequantize. A trained exit gate
and full-finetuned layers are kept as trained. --export-hf also writes a PyTorch-layout
checkpoint that the official code loads. The original model is never modified.

Per-loop adapters (ouro-mlx lora --per-loop-adapters) give each loop step its own
weights over one shared base: there is no single weight to merge them into, so they
are refused here; use them unfused with --adapter-path on generate, chat and bench.

  ouro-mlx fuse --model ouro-1.4b --adapter-path adapters --save-path ouro-1.4b-tuned
  ouro-mlx fuse --adapter-path adapters --save-path demo-tuned   # on the bundled model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx fuse", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="demo",
                   help="The base model: a local directory, Hugging Face repo id, or demo "
                        "(the bundled demo model; a local directory named demo wins).")
    p.add_argument("--save-path", default="fused_model",
                   help="The new MLX model directory to write.")
    p.add_argument("--adapter-path", default="adapters",
                   help="The adapters directory (adapter_config.json + adapters.safetensors).")
    p.add_argument("--dequantize", action="store_true",
                   help="Write a quantized base dequantized (default: it stays quantized).")
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="Also write the fused model as an HF PyTorch-format checkpoint here.")
    p.add_argument("--force", action="store_true",
                   help="Replace --save-path / --export-hf if ouro-mlx wrote them.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..loading import destination, resolve
    from ..outputs import check_apart, real, relation

    adapters = Path(args.adapter_path).expanduser()
    if not adapters.is_dir():
        raise FileNotFoundError(f"--adapter-path {args.adapter_path}: no such directory.")
    sources = [("--model", args.model), ("--adapter-path", args.adapter_path)]
    dst = destination(args.save_path, "--save-path", args.force, sources)
    hf = None
    if args.export_hf is not None:
        hf = destination(args.export_hf, "--export-hf", args.force,
                         sources + [("--save-path", args.save_path)])
        if rel := relation(real(hf), real(dst)):
            raise ValueError(f"--export-hf {args.export_hf} {rel} --save-path "
                             f"{args.save_path}; write them apart.")
    src = resolve(args.model)
    check_apart(dst, "--save-path", [("--model", src)], args.save_path)
    if hf is not None:
        check_apart(hf, "--export-hf", [("--model", src)], args.export_hf)
    fuse(src, adapters, dst, dequantize=args.dequantize, force=args.force)
    print(f"wrote {dst}", file=sys.stderr)
    if hf is not None:
        from ..convert import mlx_to_hf

        mlx_to_hf(dst, hf, force=args.force)
        print(f"wrote {hf} (HF PyTorch layout)", file=sys.stderr)
    return 0


def fuse(src: Path, adapter_dir: Path, dst: Path, *, dequantize: bool = False,
         force: bool = False) -> None:
    """Load ``src`` with the adapters in ``adapter_dir``, merge them, write ``dst``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from ..adapters import load_adapters, read_adapter_config
    from ..loading import (
        atomic_directory,
        build_model,
        copy_support_files,
        read_config,
        write_errors,
    )

    config = read_config(src)
    model = build_model(src, config, lazy=True)
    if read_adapter_config(adapter_dir, model).get("per_loop_adapters"):
        raise ValueError(f"{adapter_dir} holds per-loop adapters (one per loop step over a "
                         "shared weight): they cannot be fused into shared weights; use them "
                         "unfused with --adapter-path on generate, chat or bench.")
    load_adapters(model, adapter_dir)
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    mx.eval(model.parameters())
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    with atomic_directory(dst, force=force, verb="fuse") as tmp, write_errors(dst, nbytes):
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        copy_support_files(src, tmp)
