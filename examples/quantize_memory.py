"""Peak memory of one loop-aware DWQ step on a model directory: measured.

    ouro-mlx random --shape ouro-1.4b --out r14f
    python examples/quantize_memory.py r14f --tokens 8 64 [--span 16777216]

Loads the float model, quantizes a copy that shares its arrays (4 bits, group 64,
round to nearest), then runs ``ouro_mlx.quantize.dwq`` for one step of one sample of
``--tokens`` random tokens (every token counted, batch 1, ``--grad-checkpoint``) and
prints the peak memory by MLX's count against the float model's size. ``--span``
sets the logits made at once (``ouro_mlx.quantize.LOGIT_ELEMENTS``).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 64])
    p.add_argument("--span", type=int, default=None)
    args = p.parse_args()

    from pathlib import Path

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    import ouro_mlx
    from ouro_mlx import quantize as Q
    from ouro_mlx.loading import read_config

    if args.span:
        Q.LOGIT_ELEMENTS = args.span
    teacher, _ = ouro_mlx.load(args.model)
    model_gb = sum(v.nbytes for _, v in tree_flatten(teacher.parameters())) / 1e9
    rng = np.random.default_rng(0)
    for n in args.tokens:
        student = Q.shared_copy(teacher)
        Q.rtn(student, dict(read_config(Path(args.model))), 4, 64)
        mx.eval(student.parameters())
        sample = (rng.integers(300, teacher.args.vocab_size, n + 1).tolist(), [1] * (n + 1))
        valid = (rng.integers(300, teacher.args.vocab_size, 9).tolist(), [1] * 9)
        r = Q.dwq(student, teacher, [sample], [valid], Q.DWQOptions(
            num_samples=1, batch_size=1, max_seq_length=n + 1, grad_checkpoint=True))
        peak = mx.get_peak_memory() / 1e9  # since dwq's start
        print(json.dumps({"tokens": n, "span": Q.LOGIT_ELEMENTS,
                          "model_gb": round(model_gb, 3), "peak_gb": round(peak, 3),
                          "ratio": round(peak / model_gb, 3),
                          "step_seconds": r["seconds"]}), flush=True)
        del student


if __name__ == "__main__":
    main()
