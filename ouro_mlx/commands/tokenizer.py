"""ouro-mlx tokenizer train: learn a tokenizer (sentencepiece BPE or unigram) on a
corpus and save it in the Hugging Face format with the ChatML template.

  ouro-mlx tokenizer train --vocab-size 4096 --out my-tokenizer corpus.jsonl
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    from .options import HelpFormatter

    p = argparse.ArgumentParser(prog="ouro-mlx tokenizer", description=__doc__,
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="Train a tokenizer on .txt/.jsonl files.",
                       description="Train a tokenizer on .txt/.jsonl files.",
                       formatter_class=HelpFormatter)
    t.add_argument("inputs", nargs="+", metavar="FILE",
                   help=".txt (documents separated by blank lines) or .jsonl (text, "
                        "prompt/completion or messages) files")
    t.add_argument("--out", required=True, metavar="DIR", help="Directory for the tokenizer.")
    t.add_argument("--vocab-size", type=int, default=4096,
                   help="Tokens wanted; a small corpus may support fewer (the output says "
                        "how many were made).")
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="sentencepiece algorithm.")
    t.add_argument("--no-default-system", action="store_true",
                   help="Chat template without Ouro's default system message.")
    t.add_argument("--force", action="store_true",
                   help="Replace --out if ouro-mlx wrote it (never a directory of yours).")
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    from ..tokenizer import MAX_VOCAB, SPECIALS, train_tokenizer

    if not len(SPECIALS) + 264 <= args.vocab_size <= MAX_VOCAB:
        t.error(f"argument --vocab-size: must be between {len(SPECIALS) + 264} (special and "
                f"byte tokens and a few pieces) and {MAX_VOCAB}, got {args.vocab_size}")

    from ..outputs import output_dir

    output_dir(args.out, "--out", force=args.force,
               sources=[("input", f) for f in args.inputs])
    out = train_tokenizer(args.inputs, args.out, vocab_size=args.vocab_size,
                          model_type=args.model_type, force=args.force,
                          default_system=None if args.no_default_system else
                          "You are a helpful assistant.")
    size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    fewer = f"; {args.vocab_size} asked, the corpus supports no more" \
        if size < args.vocab_size else ""
    print(f"Wrote a {args.model_type} tokenizer ({size} tokens{fewer}) to {out}")
    return 0
