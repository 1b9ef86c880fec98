"""Quantization methods on the bundled model, at every loop depth: measured.

    python examples/quantize_quality.py [--bits 2 3 4] [--methods rtn gptq dwq ...]
                                        [--games 300] [--num-samples 2048] [--seed 0]
                                        [--stats-offset 0]

Calibrates on the bundled model's shell games (``ouro_mlx.calibrate.demo_data``, the
seeds ``ouro-mlx quantize`` uses) and evaluates on games of another seed (those of
``ouro-mlx demo-eval``). Per method and bit width (group 32) it prints accuracy at
T = 1..4 and with adaptive exit (q = 0.6, the model's threshold), the average loops,
the KL to the float model after each loop step and the share of answer tokens whose
exit step (q = 0.6) agrees with the float model's, teacher-forced on held-out games.

Methods: ``rtn`` (round to nearest), ``gptq``/``awq`` (loop-aware statistics),
``gptq-stock``/``awq-stock`` (one pooled pass, as mlx-lm's), ``awq-gptq`` (AWQ's
scales, then GPTQ's rounding; measured, not offered by ``ouro-mlx quantize``), ``dwq`` (loop-aware
distillation from loop-aware gptq, ``ouro-mlx quantize``'s default), ``dwq-rtn`` (the
same from round-to-nearest, ``--dwq-init rtn``), ``dwq-final`` (``--no-loop-aware
--dwq-init rtn``: the float model's output only, from round-to-nearest, as stock DWQ), ``mlx-dwq:LR`` (mlx-lm's own ``dwq_quantize`` from
round-to-nearest on the same data and budget, learning rate LR).
"""

from __future__ import annotations

import argparse
import json
import time

METHODS = ["rtn", "gptq", "gptq-stock", "awq", "awq-stock", "awq-gptq", "dwq", "dwq-rtn", "dwq-final",
           "mlx-dwq:1e-6", "mlx-dwq:1e-4", "mlx-dwq:1e-3"]
STATS = 256  # samples gptq/awq gather statistics from, as ``ouro-mlx quantize``


def stock_dwq(student, teacher, train, valid, lr, batch_size, seed) -> None:
    """mlx-lm's DWQ loop as ``mlx_lm.dwq`` runs it (final logits, temperature 2, every
    token), its targets from the float model, on our samples."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize

    from ouro_mlx.quantize import make_trainable

    make_trainable(student)
    dwq_quantize(student, lambda batch, i, split: teacher(batch),
                 optim.Adam(learning_rate=lr, bias_correction=True),
                 [(t, 0) for t, _ in train], [(t, 0) for t, _ in valid],
                 batch_size, 512, seed, dtype=mx.float32)
    student.freeze()


def quantize(method: str, teacher, train, valid, bits: int, num_samples: int,
             stats: int = STATS, seed: int = 0, offset: int = 0):
    from ouro_mlx import quant_stats
    from ouro_mlx import quantize as Q

    student = Q.shared_copy(teacher)
    calib = train[offset:offset + stats]
    loop_aware = not method.endswith(("-stock", "-final"))
    if method.startswith("awq-gptq"):
        quant_stats.awq(student, {}, calib, bits, 32, loop_aware=loop_aware,
                        then_gptq=True)
    elif method.startswith(("gptq", "awq")) or method == "dwq":
        fn = getattr(quant_stats, "awq" if method.startswith("awq") else "gptq")
        fn(student, {}, calib, bits, 32, loop_aware=loop_aware)
    else:
        Q.rtn(student, {}, bits, 32)
    if method.startswith("dwq"):
        Q.dwq(student, teacher, train, valid[:50],
              Q.DWQOptions(num_samples=num_samples, loop_aware=loop_aware, seed=seed))
    elif method.startswith("mlx-dwq:"):
        stock_dwq(student, teacher, train[:num_samples], valid[:32],
                  float(method.split(":")[1]), 8, seed)
    return student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--games", type=int, default=300)
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--stats-samples", type=int, default=STATS,
                   help="samples gptq/awq gather statistics from")
    p.add_argument("--stats-offset", type=int, default=0,
                   help="index of the first sample gptq/awq gather statistics from "
                        "(another calibration set)")
    p.add_argument("--seed", type=int, default=0, help="data order of the DWQ methods")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    import ouro_mlx
    from ouro_mlx import quantize as Q
    from ouro_mlx.calibrate import demo_data
    from ouro_mlx.demo import model_path
    from ouro_mlx.demo.evaluate import evaluate

    teacher, tok = ouro_mlx.load(model_path())
    train, valid = demo_data(tok, args.num_samples, 200)

    def row(name, model, seconds):
        r = evaluate(model, tok, args.games, exit_threshold=0.6)
        q = Q.quality(model, teacher, valid, 0.6)
        acc = [r["accuracy"][k] for k in ("1", "2", "3", "4", "adaptive")]
        out = {"method": name, "accuracy": acc, "avg_loops": r["avg_loops_adaptive"],
               "kl_by_step": q["kl_by_step"], "exit_agreement": q["exit_agreement"],
               "seconds": round(seconds, 1)}
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc)
              + f" | {out['avg_loops']:.2f} | "
              + " / ".join(f"{k:.2g}" for k in q["kl_by_step"])
              + f" | {100 * q['exit_agreement']:.1f}% | {seconds:.0f} |", flush=True)
        return out

    print("| method | T1 | T2 | T3 | T4 | adaptive | avg loops | KL step 1/2/3/4 "
          "| exit agrees | s |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [row("float32", teacher, 0.0)]
    for bits in args.bits:
        for method in args.methods:
            start = time.perf_counter()
            model = quantize(method, teacher, train, valid, bits, args.num_samples,
                             args.stats_samples, args.seed, args.stats_offset)
            rows.append(row(f"{bits}-bit {method}", model, time.perf_counter() - start))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
