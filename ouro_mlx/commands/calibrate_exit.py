"""ouro-mlx calibrate-exit: teach the exit gate when your tokens are done (gate only).

Trains only the exit gate, the language model frozen, on your own data (mlx-lm's
layout: a directory with train.jsonl and optionally valid.jsonl, or one .jsonl/.txt
file; chat, completions or text lines). Prints, before and after, the gate's Stage II
loss and the average loops per answer token with Q-exit at each threshold and the loss
at that depth (teacher forced, on held-out samples), then the threshold with the fewest
loops whose loss is within --tolerance of full depth. The original model is never edited:

  ouro-mlx calibrate-exit --model DIR --data data/ --gate-out gate.safetensors
  ouro-mlx generate --model DIR --exit-gate gate.safetensors --prompt "..."
  ouro-mlx calibrate-exit --model DIR --data data/ --out DIR-calibrated

Without --model it calibrates the bundled demo model on generated shell games and
also measures its accuracy with real adaptive generation; --reset-gate first makes
its gate (almost) never fire, like the released checkpoints':

  ouro-mlx calibrate-exit --reset-gate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter, number, seed

    p = argparse.ArgumentParser(prog="ouro-mlx calibrate-exit", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="Local directory or Hugging Face repo id (default: the bundled "
                        "demo model).")
    p.add_argument("--adapter-path", default=None,
                   help="Calibrate the gate for the model with these adapters (ouro-mlx lora "
                        "or mlx_lm.lora), applied unfused; use the result with --gate-out.")
    p.add_argument("--data", default=None, metavar="DIR_OR_FILE",
                   help="train.jsonl (+ valid.jsonl) directory or one .jsonl/.txt file; "
                        "without a valid.jsonl the last 10%% is held out (default for the "
                        "demo model: generated shell games).")
    p.add_argument("--iters", type=int, default=200, help="Training steps.")
    p.add_argument("--batch-size", type=int, default=8, help="Sequences per step.")
    p.add_argument("--learning-rate", type=number, default=None,
                   help="Adam learning rate of the gate (default: 2 / hidden_size, e.g. "
                        "0.001 for Ouro-1.4B, 0.03 for the demo model).")
    p.add_argument("--max-seq-length", type=int, default=2048,
                   help="Longer sequences are cut to this many tokens.")
    p.add_argument("--val-samples", type=int, default=200,
                   help="Held-out samples the table is measured on (at most).")
    p.add_argument("--thresholds", default="0.3,0.5,0.7,0.9",
                   help="Q-exit thresholds to measure, comma-separated, each in (0, 1).")
    p.add_argument("--tolerance", type=number, default=0.01,
                   help="Chosen threshold: the fewest loops whose loss is at most "
                        "(1 + TOL) x the full-depth loss (0.01: 1%% more), or, for the demo "
                        "model, whose accuracy is at most TOL below full depth (0.01: one "
                        "point).")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, metavar="DIR",
                     help="Write a new model directory: the weights with the new gate, "
                          "config.json with the chosen early_exit_threshold.")
    out.add_argument("--gate-out", default=None, metavar="FILE",
                     help="Write only the gate (a small safetensors file with the chosen "
                          "threshold) for --exit-gate on generate and chat.")
    p.add_argument("--force", action="store_true",
                   help="Replace an existing --out model directory or --gate-out file.")
    p.add_argument("--reset-gate", action="store_true",
                   help="First re-initialise the gate to (almost) never fire: weight 0, "
                        "bias -6, so every token runs all loops (an experiment's start).")
    p.add_argument("--demo-problems", type=int, default=500,
                   help="Demo model only: held-out games for the generation accuracy.")
    p.add_argument("--seed", type=seed, default=0,
                   help="Data order (and demo data) seed (default: 0).")
    p.add_argument("--json", action="store_true", help="Print only the JSON figures.")
    return p


def parse_thresholds(text: str) -> list[float]:
    try:
        qs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds must be comma-separated numbers, got {text!r}.") \
            from None
    if not qs or not all(0 < q < 1 for q in qs):
        raise ValueError(f"--thresholds must be numbers in (0, 1), got {text!r}.")
    return sorted(set(qs))


def check_args(args: argparse.Namespace) -> list[float]:
    for flag, value, low in (("--iters", args.iters, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-seq-length", args.max_seq_length, 2),
                             ("--val-samples", args.val_samples, 1),
                             ("--demo-problems", args.demo_problems, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}.")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ValueError(f"--learning-rate must be > 0, got {args.learning_rate}.")
    if not args.tolerance >= 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}.")
    return parse_thresholds(args.thresholds)


def check_outputs(args: argparse.Namespace, source: str | Path | None) -> None:
    """Before any work: the outputs are writable and apart from everything read (the
    model, its adapters, the data), and --force replaces only what ouro-mlx wrote."""
    from ..calibrate import is_gate_file
    from ..outputs import output_dir, output_file

    if args.out and args.adapter_path:
        raise ValueError("--out writes the model without its adapters; with --adapter-path "
                         "use --gate-out (or fuse the adapters first with ouro-mlx fuse).")
    sources = [("--model", source), ("--data", args.data),
               ("--adapter-path", args.adapter_path)]
    if args.out:
        output_dir(args.out, "--out", force=args.force, sources=sources)
    if args.gate_out:
        output_file(args.gate_out, "--gate-out", force=args.force, sources=sources,
                    ours=is_gate_file, kind="gate file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    thresholds = check_args(args)
    from ..loading import names_demo

    demo = args.model is None or names_demo(args.model)
    if demo and not args.json:
        from ..demo import NOTE

        print(NOTE, file=sys.stderr)
    if demo:
        from ..demo import model_path

        source = model_path()
    else:
        source = args.model
    check_outputs(args, source)
    if args.data is None and not demo:
        raise ValueError("--data is required with --model (a directory with train.jsonl, "
                         "or a .jsonl file).")
    if args.data is not None and not os.path.exists(args.data):  # before loading the model
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")

    from .. import calibrate as cal
    from ..loading import load, resolve

    path = resolve(str(source) if demo else args.model)
    model, tokenizer = load(path, adapter_path=args.adapter_path)
    warn = lambda msg: print(f"ouro-mlx calibrate-exit: {msg}", file=sys.stderr)  # noqa: E731
    if args.data is None:
        train, valid = cal.demo_data(tokenizer, seed=args.seed)
    else:
        train, valid = cal.load_data(args.data, tokenizer, warn=warn)
    train, valid = cal.cut_to(train, valid, args.max_seq_length,
                              args.data or "the demo data", warn)
    valid = valid[:args.val_samples]
    if long := sum(len(t) > args.max_seq_length for t, _ in train + valid):
        warn(f"{long:,} samples are longer than --max-seq-length {args.max_seq_length} "
             "tokens and are cut to it")
    if args.reset_gate:
        cal.reset_gate(model)

    metric = "accuracy" if demo else "loss"
    before, gate_before = cal.measure_with_gate_loss(model, valid, thresholds,
                                                     max_seq_length=args.max_seq_length)
    demo_before = cal.demo_accuracy(model, tokenizer, thresholds, args.demo_problems) \
        if demo else None
    losses = cal.train_gate(model, train, iters=args.iters, batch_size=args.batch_size,
                            learning_rate=args.learning_rate,
                            max_seq_length=args.max_seq_length, seed=args.seed,
                            progress=not args.json)
    after, gate_after = cal.measure_with_gate_loss(model, valid, thresholds,
                                                   max_seq_length=args.max_seq_length)
    demo_after = cal.demo_accuracy(model, tokenizer, thresholds, args.demo_problems) \
        if demo else None
    chosen = cal.choose_threshold(demo_after if demo else after, thresholds, args.tolerance,
                                  metric)

    written = None
    if args.gate_out:
        written = cal.save_gate(args.gate_out, model, chosen)
    elif args.out:
        written = cal.save_model_dir(args.out, path, model, chosen, force=args.force)

    result = {"before": before, "after": after, "threshold": chosen, "metric": metric,
              "tolerance": args.tolerance, "train_samples": len(train),
              "valid_samples": len(valid), "iters": args.iters,
              # first/last: the first and last training batch; valid_*: the held-out
              # samples before and after training (the figures to compare)
              "stage2_loss": {"first": losses[0], "last": losses[-1],
                              "valid_before": gate_before, "valid_after": gate_after},
              "written": str(written) if written else None}
    if demo:
        result.update(demo_before=demo_before, demo_after=demo_after)
    if args.json:
        print(json.dumps(result))
        return 0
    print_report(result, thresholds, model.ut_steps)
    return 0


def print_report(r: dict, thresholds: list[float], T: int) -> None:
    from ..calibrate import _key

    s2 = r["stage2_loss"]
    if s2.get("valid_before") is not None:
        change = (f"held-out Stage II loss {_loss(s2['valid_before'])} -> "
                  f"{_loss(s2['valid_after'])}")
        if s2["valid_after"] > s2["valid_before"]:  # e.g. a few steps overshooting
            change += ", higher: try more --iters or a lower --learning-rate"
    else:
        change = (f"Stage II loss on the first batch {_loss(s2['first'])}, on the last "
                  f"{_loss(s2['last'])}")
    print(f"{r['iters']} steps on {r['train_samples']:,} samples ({change}); table on "
          f"{r['valid_samples']:,} held-out samples, {r['before']['tokens']:,} answer tokens, "
          "teacher forced")
    rows = [("full", f"full (T={T})")] + [(_key(q), f"q = {q:g}") for q in thresholds]
    head = f"{'exit':<12} {'loops':>6} {'loss':>8}   ->  {'loops':>6} {'loss':>8}"
    demo = r.get("demo_after") is not None
    if demo:
        head += f"   | generation: {'loops':>6} {'acc':>6}   ->  {'loops':>6} {'acc':>6}"
    print(head)
    for key, label in rows:
        b, a = r["before"][key], r["after"][key]
        line = (f"{label:<12} {b['loops']:>6.2f} {_loss(b['loss']):>8}   ->  "
                f"{a['loops']:>6.2f} {_loss(a['loss']):>8}")
        if demo:
            db, da = r["demo_before"][key], r["demo_after"][key]
            line += (f"   | {'':<11} {db['loops']:>6.2f} {db['accuracy']:>6.3f}   ->  "
                     f"{da['loops']:>6.2f} {da['accuracy']:>6.3f}")
        print(line)
    q = r["threshold"]
    tol = (f"accuracy at most {r['tolerance'] * 100:g} point(s) below full depth"
           if r["metric"] == "accuracy" else
           f"loss at most {r['tolerance'] * 100:g}% above full depth")
    if q is None:
        print(f"no threshold keeps the {tol}; the gate is kept with no threshold chosen "
              "(use the full depth, or retry with more --iters or a larger --tolerance)")
    else:
        rows_after = r["demo_after"] if demo else r["after"]
        print(f"chosen threshold: {q:g} ({rows_after[_key(q)]['loops']:.2f} loops, {tol})")
    if r["written"]:
        print(f"wrote {r['written']}")
    else:
        print("nothing written (pass --gate-out FILE or --out DIR to keep the gate)")


def _loss(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"
