"""ouro-mlx quantize: quantize a model, keeping every loop step and its exit decisions.

  ouro-mlx quantize --model DIR --mlx-path OUT --bits 2 --group-size 32 --data DATA_DIR

--method rtn rounds to nearest (as convert -q). gptq and awq choose the rounding from
activation statistics gathered over every loop step, each step weighted by the float
model's chance to exit there, layer by layer so later steps see earlier steps' error,
the embedding (and, for awq, every layer) on grids searched for the least error. dwq
(the default) starts from loop-aware gptq (or --dwq-init rtn) and trains the quantization
scales and biases (the integer weights stay frozen) so that every loop step's output and the exit
decisions match the float model. --no-loop-aware gives the stock objectives, for
comparison. DATA_DIR: mlx-lm's layout, train.jsonl and optionally valid.jsonl (chat,
prompt/completion or text lines; bad lines are reported as file:line and skipped).
The report prints, for round-to-nearest and each stage, the KL to the float model at
every loop step, how often the exit step agrees at q, and the average loops. dwq's
loss is a sum of logarithms of small errors: negative, and lower is better.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys


STATS_SAMPLES = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="The float model: a local directory, a hub repo id, or demo "
                        "(default: the bundled model).")
    p.add_argument("--mlx-path", required=True, help="Where to write the quantized model.")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8],
                   help="Bits per weight (default: 4).")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128],
                   help="Weights per scale (default: 64).")
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "dwq"], default="dwq",
                   help="rtn: round to nearest; gptq, awq: from activation statistics "
                        "over every loop step; dwq (default): distil every loop step and "
                        "the exit decisions.")
    p.add_argument("--dwq-init", choices=["rtn", "gptq"], default="gptq",
                   help="Where dwq starts (default: gptq; rtn as mlx_lm.dwq).")
    p.add_argument("--data", default=None,
                   help="Calibration data: a directory with train.jsonl (and valid.jsonl); "
                        "default for the bundled model: its shell games.")
    p.add_argument("--mixed", action="store_true",
                   help="Keep embeddings and lm_head at 8 bits.")
    p.add_argument("--num-samples", type=int, default=None,
                   help="Samples dwq trains on (default: 2048) or gptq/awq gather "
                        f"statistics from (default: {STATS_SAMPLES}; dwq's gptq start "
                        f"uses the first {STATS_SAMPLES}).")
    p.add_argument("--max-seq-length", type=int, default=512,
                   help="Tokens per sample at most (default: 512).")
    p.add_argument("--batch-size", type=int, default=8, help="Samples per step (default: 8).")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="DWQ learning rate (default: 1%% of the shared layers' median "
                        "quantization scale, e.g. 2.3e-4 at 4 bits and 1e-3 at 2 bits "
                        "on the bundled model).")
    p.add_argument("--seed", type=int, default=0, help="Data order (default: 0).")
    p.add_argument("--no-loop-aware", dest="loop_aware", action="store_false",
                   help="For comparison: distil only the final output (stock DWQ's "
                        "objective); gptq/awq from one pooled pass (as mlx-lm's).")
    p.add_argument("--gate-weight", type=float, default=4.0,
                   help="Weight of the exit-distribution term (default: 4.0).")
    p.add_argument("--cdf-weight", type=float, default=8.0,
                   help="Weight of the exit-cdf term, which keeps the exit decisions at "
                        "every threshold (default: 8.0).")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="Recompute each layer in the backward pass: less memory, slower.")
    p.add_argument("--exit-q", type=float, default=None,
                   help="The threshold at which the report compares exit steps (default: "
                        "the model's own exit threshold, else 0.5).")
    p.add_argument("--force", action="store_true",
                   help="Replace a --mlx-path that ouro-mlx wrote (never the source).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_model

    from .. import quantize as Q
    from ..calibrate import cut_to, demo_data, load_data
    from ..demo import model_path
    from ..loading import (atomic_directory, copy_support_files, destination, load,
                           names_demo, read_config, resolve, write_errors)
    from .options import model_or_demo

    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}.")
    opts = Q.DWQOptions(num_samples=args.num_samples or Q.DWQOptions.num_samples,
                        batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length,
                        learning_rate=args.learning_rate, seed=args.seed,
                        loop_aware=args.loop_aware, gate_weight=args.gate_weight,
                        cdf_weight=args.cdf_weight,
                        grad_checkpoint=args.grad_checkpoint)
    try:
        opts.check()
    except ValueError as e:
        raise ValueError("--" + str(e).replace("_", "-", 2)) from None
    if args.exit_q is not None and not 0 <= args.exit_q <= 1:
        raise ValueError(f"--exit-q must be in [0, 1], got {args.exit_q}.")
    demo = not args.model or names_demo(args.model)
    path = model_or_demo(args) if not args.model else args.model
    out = destination(args.mlx_path, "--mlx-path", args.force,
                      sources=[("--model", path)] + ([("--data", args.data)] if args.data
                                                     else []))
    source = resolve(str(model_path()) if demo else path)
    if "quantization" in read_config(source):
        raise ValueError(f"--model {path}: already quantized; quantize the float model.")
    if not args.data and not demo:
        raise ValueError("--data is required (a directory with train.jsonl) for a model "
                         "other than the bundled one.")
    teacher, tokenizer = load(source)

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    if args.data:
        train, valid = load_data(args.data, tokenizer, warn=warn)
    else:
        train, valid = demo_data(tokenizer, n_train=max(opts.num_samples, STATS_SAMPLES),
                                 n_valid=100)
    train, valid = cut_to(train, valid, opts.max_seq_length, args.data or "the demo data",
                          warn=warn)
    config = read_config(source)
    q = args.exit_q if args.exit_q is not None else (
        teacher.exit_threshold if teacher.exit_threshold not in (None, 1.0) else 0.5)
    from tqdm import tqdm

    def measure(model) -> dict:
        return Q.quality(model, teacher, valid, q, max_seq_length=args.max_seq_length)

    @contextlib.contextmanager
    def quiet():  # mlx-lm prints notes on stdout, which is the report's
        notes = io.StringIO()
        with contextlib.redirect_stdout(notes):
            yield
        for line in notes.getvalue().splitlines():  # its bits per weight: ours at the end
            if not line.startswith("[INFO] Quantized model with"):
                print(line, file=sys.stderr)

    with quiet():
        rtn = Q.rtn(Q.shared_copy(teacher), dict(config), args.bits, args.group_size,
                    args.mixed)[0]
    report = {"rtn": measure(rtn)}
    del rtn
    student = Q.shared_copy(teacher)
    init = args.dwq_init if args.method == "dwq" else args.method
    if init == "rtn":
        with quiet():
            student, config = Q.rtn(student, config, args.bits, args.group_size, args.mixed)
    else:
        from .. import quant_stats

        stats = train[:args.num_samples or STATS_SAMPLES] if args.method != "dwq" \
            else train[:STATS_SAMPLES]
        with tqdm(desc=init, unit="stage", file=sys.stderr) as bar, quiet():
            def stage(n, total):
                bar.total = total
                bar.update(1)

            student, config = getattr(quant_stats, init)(
                student, config, stats, args.bits, args.group_size, args.mixed,
                loop_aware=args.loop_aware, batch_size=args.batch_size,
                max_seq_length=args.max_seq_length, progress=stage)
        report[init] = measure(student)
    if args.method == "dwq":
        with tqdm(total=max(1, opts.num_samples // args.batch_size), desc="dwq",
                  unit="step", file=sys.stderr) as bar:
            def progress(n, total, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            report["train"] = Q.dwq(student, teacher, train, valid, opts, progress)
        report["dwq"] = measure(student)
    nbytes = sum(v.nbytes for _, v in tree_flatten(student.parameters()))
    with atomic_directory(out, force=args.force, verb="quantize") as tmp, \
            write_errors(out, nbytes):
        save_model(tmp, student)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_support_files(source, tmp)
    print(json.dumps(report, indent=2))
    from mlx_lm.utils import compute_bits_per_weight

    mixed = ", embeddings and lm_head at 8 bits" if args.mixed else ""
    print(f"Wrote {out}: {args.bits}-bit weights in groups of {args.group_size}{mixed}; "
          f"{compute_bits_per_weight(student):.2f} bits per parameter overall, counting "
          "the groups' scales and biases and the float norms and exit gate.")
    return 0
