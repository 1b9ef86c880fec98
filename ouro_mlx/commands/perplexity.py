"""ouro-mlx perplexity: perplexity at every loop depth, and with adaptive exit, from one
forward pass per batch.

  ouro-mlx perplexity --model DIR --data-path test.jsonl --ut-steps 1-8
  ouro-mlx perplexity --data-path answers.jsonl --json
  {"perplexity": {"1": ..., "2": ..., "q0.6": ..., "mix": ...}, "avg_loops": {...}, ...}

Depth keys: "1", "2", ... run that many loop steps on every token; "q<Q>" stops each
token at the first step whose exit cdf reaches Q (the model's own threshold by
default); "mix" is the likelihood when the exit step is drawn from the gate
(Σ_t p(exit at t) · p_t(token)). A pass at the deepest depth gives them all.

Data: a .txt file (documents separated by blank lines), a .jsonl file of {"text"},
{"prompt", "completion"} or {"messages"} lines (mlx-lm's formats), or an mlx-lm data
directory (test.jsonl, else valid.jsonl, else train.jsonl). For prompt/completion and
chat lines only the answer tokens are scored by default (--mask-prompt, as
mlx_lm.lora --mask-prompt trains them; --no-mask-prompt scores the prompt too), one
line per row; plain text is joined and cut into rows of --sequence-length tokens, as
mlx_lm.perplexity does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter, add_model_args, add_scoring_args

    p = argparse.ArgumentParser(prog="ouro-mlx perplexity", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--data-path", required=True,
                   help="A .txt or .jsonl file, or a directory holding test.jsonl, "
                        "valid.jsonl or train.jsonl.")
    add_scoring_args(p)
    p.add_argument("--sequence-length", type=int, default=512,
                   help="Tokens per row: the length plain text is cut to, and the "
                        "longest answer sample kept.")
    p.add_argument("--num-samples", type=int, default=256,
                   help="Rows to score (-1: all the data).")
    p.add_argument("--batch-size", type=int, default=8, help="Rows per forward pass.")
    mask = p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction,
                          default=True)
    # set here: older Pythons' BooleanOptionalAction appends "(default: True)" to a help
    mask.help = ("Score only the answer tokens of prompt/completion and chat lines (the "
                 "default); --no-mask-prompt scores their prompt tokens too.")
    p.add_argument("--json", action="store_true", help="Print only the JSON figures.")
    return p


def data_file(path: str) -> Path:
    """The file --data-path names: itself, or an mlx-lm directory's test split."""
    p = Path(path)
    if p.is_dir():
        for name in ("test.jsonl", "valid.jsonl", "train.jsonl"):
            if (p / name).is_file():
                return p / name
        raise ValueError(f"--data-path {path}: a directory without test.jsonl, "
                         "valid.jsonl or train.jsonl.")
    return p


def rows_of(samples, eos: int | None, length: int, mask_prompt: bool, limit: int | None,
            warn) -> tuple[list[list[int]], list[list[int]], int, bool]:
    """(rows, masks, samples read, whether data was left over). Answer samples
    (a prompt masked out) get a row each; plain text is joined, each document
    followed by eos, and cut into rows of ``length`` tokens."""
    rows, masks, stream, read = [], [], [], 0
    full = lambda: limit is not None and len(rows) >= limit  # noqa: E731
    for ids, mask in samples:
        if full():
            return rows, masks, read, True
        read += 1
        if not mask_prompt:
            mask = [1] * len(ids)
        if all(mask):  # plain text: into the stream
            stream += ids + ([] if eos is None else [eos])
            while len(stream) >= length and not full():
                rows.append(stream[:length])
                masks.append([0] + [1] * (length - 1))
                stream = stream[length:]
            continue
        if len(ids) > length:
            warn(f"sample {read}: {len(ids)} tokens, longer than --sequence-length "
                 f"{length}; skipped")
            continue
        rows.append(ids)
        masks.append(mask)
    if len(stream) >= 2 and not full():  # the text's last, shorter row
        rows.append(stream)
        masks.append([0] + [1] * (len(stream) - 1))
    return rows, masks, read, False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--sequence-length", args.sequence_length),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if args.num_samples == 0 or args.num_samples < -1:
        raise ValueError(f"--num-samples must be >= 1, or -1 for all, got {args.num_samples}.")

    from tqdm import tqdm

    from ..data import check_input, read_samples
    from ..loading import load
    from ..scoring import score
    from .options import apply_compile_flag, apply_exit_gate, model_or_demo, scoring_depths

    path = data_file(args.data_path)
    check_input(path)
    apply_compile_flag(args)
    model, tokenizer = load(model_or_demo(args), dtype=args.dtype,
                            adapter_path=args.adapter_path)
    apply_exit_gate(model, args)
    depths = scoring_depths(args, model, mixture=True)
    length = min(args.sequence_length, model.args.max_position_embeddings)
    eos = tokenizer.eos_token_id

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    limit = None if args.num_samples == -1 else args.num_samples
    rows, masks, read, left = rows_of(read_samples(path, tokenizer, warn), eos, length,
                                      args.mask_prompt, limit, warn)
    scored = [sum(m[1:]) for m in masks]
    keep = [i for i, n in enumerate(scored) if n > 0]
    rows, masks = [rows[i] for i in keep], [masks[i] for i in keep]
    if not rows:
        raise ValueError(f"--data-path {path}: no tokens to score.")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths pad less
    totals = {k: 0.0 for k in depths.keys()}
    loops = {k: 0.0 for k in depths.keys() if not k.isdigit()}
    tokens = 0
    batches = range(0, len(order), args.batch_size)
    for i in tqdm(batches, desc="scoring", unit="batch", file=sys.stderr,
                  disable=args.json or None):
        idx = order[i:i + args.batch_size]
        result = score(model, [rows[j] for j in idx], [masks[j] for j in idx], depths)
        for k, s in result.items():
            totals[k] += float(s.logprob.sum())
            if k in loops:
                loops[k] += float(s.loops.sum())
        tokens += int(next(iter(result.values())).tokens.sum())
    ppl = {k: math.exp(-v / tokens) for k, v in totals.items()}
    avg = {k: v / tokens for k, v in loops.items()}
    used = (f"{len(rows)} rows from the first {read} samples of {path.name} "
            f"(--num-samples {args.num_samples}; more data left)" if left
            else f"{len(rows)} rows, all the data in {path.name} ({read} samples)")
    if args.json:
        print(json.dumps({"perplexity": {k: round(v, 6) for k, v in ppl.items()},
                          "avg_loops": {k: round(v, 4) for k, v in avg.items()},
                          "tokens": tokens, "rows": len(rows), "samples": read,
                          "all_data": not left}))
        return 0
    what = "answer tokens" if any(not all(m[1:]) for m in masks) else "tokens"
    print(f"perplexity of {tokens} {what}: {used}")
    print(f"{'depth':<8} {'perplexity':>11} {'avg loops':>10}")
    for k, v in ppl.items():
        loops_shown = f"{avg[k]:>10.2f}" if k in avg else f"{int(k):>10d}"
        print(f"{k:<8} {v:>11.4f} {loops_shown}")
    return 0
