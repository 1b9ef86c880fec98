"""Peak memory of QLoRA (`ouro-mlx lora` on a 4-bit model) at the Ouro-1.4B / 2.6B width:
batch 1 x 512 tokens, T = 4 loop steps, --loss ouro, rank 8 on every layer, with and
without --grad-checkpoint.

A full 24- or 48-layer step is slow on a small CPU, so this measures random 4-bit models
of the real width (hidden 2048, 16 heads, MLP 5632, vocab 49152) with a few physical
layers, reads the peak memory ouro-mlx lora itself reports ("Peak mem"), fits
peak = a + b * layers to the measured points and extrapolates to 24 layers (Ouro-1.4B)
and 48 layers (Ouro-2.6B). The fit and the measured points are both printed: the 24/48
figures are an extrapolation, not a measurement (run with --layers 24 on a machine with
the time to measure one directly).

    python examples/qlora_memory.py                    # layers 1 2 4
    python examples/qlora_memory.py --layers 1 2 --json
    python examples/qlora_memory.py --dtype float32 --layers 1 2 3 --baseline-layers 1 2
    python examples/qlora_memory.py --dtype float32 --layers 24 --baseline-layers  # direct

Run it on Apple silicon. MLX's CPU backend multiplies 4-bit weights with bfloat16
activations about 8x slower than with float32 ones (a 512-token point at bfloat16 takes
over an hour on a 2-core Linux CPU). There, --dtype float32 converts the model to float32
scales so the activations are float32: the peak is then an UPPER BOUND for the bfloat16
run (the activations take twice the bytes; the 4-bit weights are the same).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ouro_mlx.random_model import SHAPES, make_random_checkpoint

WIDTH = {k: v for k, v in SHAPES["ouro-1.4b"].items() if k != "num_hidden_layers"}
TARGETS = {"Ouro-1.4B": SHAPES["ouro-1.4b"]["num_hidden_layers"],
           "Ouro-2.6B": SHAPES["ouro-2.6b"]["num_hidden_layers"]}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ouro(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "ouro_mlx", *args], capture_output=True,
                       text=True, env=ENV)
    out = (p.stdout + p.stderr).replace("\r", "\n")
    if p.returncode != 0:
        raise SystemExit(f"ouro-mlx {' '.join(args)} failed:\n{out[-3000:]}")
    return out


def quantized_model(tmp: Path, layers: int, dtype: str) -> Path:
    src = make_random_checkpoint(tmp / f"hf{layers}", {**WIDTH, "num_hidden_layers": layers},
                                 dtype="bfloat16", seed=layers)
    dst = tmp / f"q4-{layers}"
    ouro("convert", "--hf-path", str(src), "--mlx-path", str(dst), "--dtype", dtype,
         "-q", "--q-bits", "4", "--q-group-size", "64")
    return dst


def peak_gb(model: Path, data: Path, out: Path, a, checkpoint: bool) -> tuple[float, float]:
    tic = time.perf_counter()
    text = ouro("lora", "--model", str(model), "--train", "--data", str(data),
                "--batch-size", "1", "--iters", str(a.iters), "--steps-per-report", "1",
                "--num-layers", "-1", "--max-seq-length", str(a.tokens), "--ut-steps", "4",
                "--loss", "ouro", "--adapter-path", str(out),
                *(["--grad-checkpoint"] if checkpoint else []))
    peaks = re.findall(r"Peak mem ([\d.]+) GB", text)
    if not peaks:
        raise SystemExit(f"no 'Peak mem' report in ouro-mlx lora's output:\n{text[-3000:]}")
    return float(peaks[-1]), time.perf_counter() - tic


def fit(points: dict[int, float]) -> tuple[float, float]:
    """Least squares a + b * layers."""
    xs, ys = list(points), list(points.values())
    mx_, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx_) ** 2 for x in xs)
    return my - b * mx_, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4],
                   help="physical layer counts to measure (two or more: also a fit and "
                        "the extrapolation to 24/48 layers; --layers 24: Ouro-1.4B itself)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--baseline-layers", type=int, nargs="*", default=None,
                   help="layer counts to measure without --grad-checkpoint (default: "
                        "--layers; none to skip those runs)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="activation and scale dtype; float32 is an upper bound for bfloat16")
    # The peak is reached within the first step (forward + backward); more only add time.
    p.add_argument("--iters", type=int, default=1, help="steps per run")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    baseline = set(a.layers if a.baseline_layers is None else a.baseline_layers)

    measured = {"grad_checkpoint": {}, "no_grad_checkpoint": {}}
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        rng = random.Random(0)  # byte tokenizer: one character, one token (+ eos)
        row = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(a.tokens - 1))
        (data / "train.jsonl").write_text(json.dumps({"text": row}) + "\n")
        for n in sorted(set(a.layers) | baseline):
            model = quantized_model(tmp, n, a.dtype)
            for key, gc in (("grad_checkpoint", True), ("no_grad_checkpoint", False)):
                if n not in (baseline if key == "no_grad_checkpoint" else a.layers):
                    continue
                gb, s = peak_gb(model, data, tmp / f"ad-{n}-{key}", a, gc)
                measured[key][n] = gb
                seconds[f"{n}-{key}"] = round(s, 1)
                print(f"{n} layers, {key.replace('_', ' ')}: peak {gb:.3f} GB ({s:.0f} s)",
                      file=sys.stderr)

    result = {"setup": {"width": WIDTH, "batch": 1, "tokens": a.tokens, "ut_steps": 4,
                        "bits": 4, "group_size": 64, "rank": 8, "loss": "ouro",
                        "iters": a.iters, "dtype": a.dtype},
              "measured_gb": measured, "seconds": seconds, "fit": {}, "extrapolated_gb": {}}
    measured = {k: v for k, v in measured.items() if v}
    for key, pts in measured.items():
        if len(pts) < 2:  # one count (e.g. --layers 24): a measurement, nothing to fit
            continue
        a0, b = fit(pts)
        result["fit"][key] = {"intercept_gb": round(a0, 3), "per_layer_gb": round(b, 4)}
        result["extrapolated_gb"][key] = {name: round(a0 + b * L, 2)
                                          for name, L in TARGETS.items()}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"QLoRA 4-bit, batch 1 x {a.tokens} tokens, T = 4, rank 8 on every layer "
          f"(peak memory as ouro-mlx lora reports it), {a.dtype} activations")
    if a.dtype == "float32":
        print("float32 activations: an upper bound for a bfloat16 run (same 4-bit weights)")
    for key in measured:
        pts = ", ".join(f"{n} layers {gb:.2f} GB" for n, gb in measured[key].items())
        if key not in result["fit"]:
            print(f"{key.replace('_', ' ')}: measured {pts}")
            continue
        f = result["fit"][key]
        ext = ", ".join(f"{k} ({L} layers) {result['extrapolated_gb'][key][k]:.2f} GB"
                        for k, L in TARGETS.items())
        print(f"{key.replace('_', ' ')}: measured {pts}; fit {f['intercept_gb']:.2f} + "
              f"{f['per_layer_gb']:.3f} GB/layer; extrapolated {ext}")


if __name__ == "__main__":
    main()
