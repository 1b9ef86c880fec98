"""ouro-mlx data: tokenize .txt/.jsonl files into packed training shards.

  ouro-mlx data --tokenizer ByteDance/Ouro-1.4B --seq-len 2048 --out data/train a.jsonl b.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .options import HelpFormatter

    p = argparse.ArgumentParser(prog="ouro-mlx data", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE",
                   help=".txt (documents separated by blank lines) or .jsonl (text, "
                        "prompt/completion or messages) files")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="A model directory (or repo id) with a tokenizer.")
    p.add_argument("--out", required=True, metavar="DIR", help="Directory for the shards.")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="Tokens per training sequence (each row holds one more, the target).")
    p.add_argument("--shard-sequences", type=int, default=4096,
                   help="Sequences per shard file.")
    p.add_argument("--no-pack", action="store_true",
                   help="One document per row, padded (short chat samples); longer ones "
                        "are skipped.")
    p.add_argument("--force", action="store_true",
                   help="Replace --out if ouro-mlx wrote it (never a directory of yours).")
    args = p.parse_args(argv)
    if args.seq_len < 2:
        p.error(f"argument --seq-len: must be at least 2, got {args.seq_len}")
    if args.shard_sequences < 1:
        p.error(f"argument --shard-sequences: must be at least 1, got {args.shard_sequences}")

    from ..data import check_input, prepare
    from ..loading import load_tokenizer, read_config, resolve
    from ..outputs import output_dir

    for f in args.inputs:  # before loading the tokenizer: fail at once
        check_input(Path(f))
    inputs = [("input", f) for f in args.inputs]
    output_dir(args.out, "--out", force=args.force,
               sources=[("--tokenizer", args.tokenizer), *inputs])
    path = resolve(args.tokenizer)
    tokenizer = load_tokenizer(path, read_config(path) if (path / "config.json").exists() else None)
    meta = prepare(args.inputs, args.out, tokenizer, args.seq_len,
                   shard_sequences=args.shard_sequences, force=args.force,
                   pack=not args.no_pack)
    print(f"{meta.documents} documents → {meta.sequences} sequences of {meta.seq_len + 1} "
          f"tokens in {len(meta.shards)} shard(s) at {args.out}"
          + (f"; {meta.skipped} lines skipped" if meta.skipped else ""))
    return 0
