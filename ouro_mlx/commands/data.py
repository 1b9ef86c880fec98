"""ouro-mlx data: tokenize .txt/.jsonl files into packed training shards.

  ouro-mlx data --tokenizer ByteDance/Ouro-1.4B --seq-len 2048 --out data/train a.jsonl b.txt
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ouro-mlx data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".txt or .jsonl files")
    p.add_argument("--tokenizer", required=True,
                   help="A model directory (or repo id) with a tokenizer.")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--shard-sequences", type=int, default=4096)
    p.add_argument("--no-pack", action="store_true",
                   help="One document per row, padded (short chat samples); longer ones "
                        "are skipped.")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)

    from ..data import prepare
    from ..loading import load_tokenizer, read_config, resolve

    path = resolve(args.tokenizer)
    tokenizer = load_tokenizer(path, read_config(path) if (path / "config.json").exists() else None)
    meta = prepare(args.inputs, args.out, tokenizer, args.seq_len,
                   shard_sequences=args.shard_sequences, force=args.force,
                   pack=not args.no_pack)
    print(f"{meta.documents} documents → {meta.sequences} sequences of {meta.seq_len + 1} "
          f"tokens in {len(meta.shards)} shard(s) at {args.out}"
          + (f"; {meta.skipped} lines skipped" if meta.skipped else ""))
    return 0
