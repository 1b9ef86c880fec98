"""ouro-mlx tokenizer train: learn a tokenizer (sentencepiece BPE or unigram) on a
corpus and save it in the Hugging Face format with the ChatML template.

  ouro-mlx tokenizer train --vocab-size 4096 --out my-tokenizer corpus.jsonl
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ouro-mlx tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="Train a tokenizer on .txt/.jsonl files.")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--no-default-system", action="store_true",
                   help="Chat template without Ouro's default system message.")
    t.add_argument("--force", action="store_true")
    args = p.parse_args(argv)

    from ..tokenizer import train_tokenizer

    out = train_tokenizer(args.inputs, args.out, vocab_size=args.vocab_size,
                          model_type=args.model_type, force=args.force,
                          default_system=None if args.no_default_system else
                          "You are a helpful assistant.")
    print(f"Wrote a {args.model_type} tokenizer ({args.vocab_size} tokens) to {out}")
    return 0
