"""Speed and memory of `ouro-mlx lora` against stock `mlx_lm.lora` on the same model.

Both tools train LoRA on the same random Ouro checkpoint (mlx-lm loads it through
ouro-mlx's hook), the same data, rank, layers, batch and steps. Runs are interleaved
(A B B A ...) and the medians compared:

- tokens/s: each tool's own training reports after the first (compilation) report;
  ouro-mlx's "Tokens/sec" line, mlx-lm's "tok/s" column (the same count: the batch's
  unpadded tokens per second of step time);
- peak memory: mx.get_peak_memory() at the end of each process (loading, training and
  validation), read the same way for both tools by a small wrapper.

    python examples/lora_vs_mlx_lm.py     # --loss fixed vs mlx_lm.lora, then --loss ouro
    python examples/lora_vs_mlx_lm.py --repeats 5 --hidden 1024 --layers 8 --json   # on a Mac
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ouro_mlx.random_model import make_random_checkpoint

# Small enough for a CPU run of a few minutes; on a Mac pass --hidden 1024 --layers 8.
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=32, intermediate_size=352, vocab_size=512,
             max_position_embeddings=4096, rope_theta=10000.0)
# Runs a tool's CLI in-process and prints the process's peak memory at exit.
WRAPPER = ("import atexit, runpy, sys, mlx.core as mx; "
           "atexit.register(lambda: print(f'PEAK_BYTES {mx.get_peak_memory()}', flush=True)); "
           "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")
WORDS = ("the loop applies one stack of layers again and again with shared weights and an "
         "exit gate decides after each step whether the token needs more depth").split()


def write_data(d: Path, n: int, chars: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n), ("valid", 8)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(size):
                words = []
                while sum(len(w) + 1 for w in words) < chars:
                    words.append(rng.choice(WORDS))
                f.write(json.dumps({"text": " ".join(words)[:chars]}) + "\n")


def run_tool(tool: str, model: Path, data: Path, out: Path, a: argparse.Namespace,
             extra: list[str]) -> dict:
    module = "mlx_lm" if tool == "mlx_lm" else "ouro_mlx"
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"lora_parameters:\n  rank: {a.rank}\n  scale: 20.0\n  dropout: 0.0\n")
    cmd = [sys.executable, "-c", WRAPPER, module, "lora", "--model", str(model), "--train",
           "--data", str(data), "--num-layers", str(a.num_layers), "--batch-size",
           str(a.batch_size), "--iters", str(a.iters), "--steps-per-report",
           str(a.steps_per_report), "--steps-per-eval", str(10 * a.iters), "--val-batches",
           "1", "--adapter-path", str(out), "--save-every", str(10 * a.iters),
           "--max-seq-length", str(a.seq_len + 1), "-c", str(cfg), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = re.sub(r"\x1b\[[0-9;]*m", "", (p.stdout + p.stderr).replace("\r", "\n"))
    if p.returncode != 0:
        raise SystemExit(f"{tool} {' '.join(extra)} failed:\n{text[-3000:]}")
    if tool == "mlx_lm":  # "    10    2.345 ▼    1,234    12.3k"
        tps = [float(m.group(1).replace(",", "")) for m in re.finditer(
            r"^\s*\d+\s+-?[\d.]+\s+[▼▲]\s+([\d,.]+)\s+[\d.]+k\s*$", text, re.M)]
    else:  # "Iter 10: Train loss ..., Tokens/sec 1234.5, ..., Peak mem 0.1 GB"
        tps = [float(x) for x in re.findall(r"Tokens/sec ([\d.]+)", text)]
    peak = re.findall(r"PEAK_BYTES (\d+)", text)
    if len(tps) < 2 or not peak:
        raise SystemExit(f"could not read {tool}'s reports:\n{text[-3000:]}")
    return {"tokens_per_sec": statistics.median(tps[1:]), "peak_gb": int(peak[-1]) / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per tool (interleaved)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--steps-per-report", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="characters = tokens per row")
    p.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--no-ouro", action="store_true", help="skip the --loss ouro runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = {**SHAPE, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
                 "head_dim": a.hidden // SHAPE["num_attention_heads"],
                 "intermediate_size": a.hidden * 11 // 4}
        model = make_random_checkpoint(tmp / "model", shape, seed=0)
        data = tmp / "data"
        write_data(data, 200, a.seq_len)
        runs = {"mlx_lm.lora": ("mlx_lm", []),
                "ouro-mlx lora --loss fixed": ("ouro", ["--loss", "fixed"])}
        if not a.no_ouro:
            runs["ouro-mlx lora --loss ouro"] = ("ouro", ["--loss", "ouro"])
        results = {k: [] for k in runs}
        for r in range(a.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for i, name in enumerate(order):
                tool, extra = runs[name]
                res = run_tool(tool, model, data, tmp / f"ad{r}{i}", a, extra)
                results[name].append(res)
                print(f"run {r + 1}/{a.repeats} {name}: {res['tokens_per_sec']:.0f} tok/s, "
                      f"peak {res['peak_gb']:.3f} GB", file=sys.stderr)

    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tokens_per_sec", "peak_gb")}
           for k, v in results.items()}
    stock, fixed = med["mlx_lm.lora"], med["ouro-mlx lora --loss fixed"]
    summary = {
        "setup": {"shape": shape, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "rank": a.rank, "num_layers": a.num_layers, "iters": a.iters,
                  "repeats": a.repeats},
        "median": med,
        "tokens_per_sec_ratio": round(fixed["tokens_per_sec"] / stock["tokens_per_sec"], 3),
        "peak_memory_ratio": round(fixed["peak_gb"] / stock["peak_gb"], 3),
    }
    if not a.no_ouro:
        ouro = med["ouro-mlx lora --loss ouro"]
        summary["ouro_loss_time_cost"] = round(
            fixed["tokens_per_sec"] / ouro["tokens_per_sec"], 3)
        summary["ouro_loss_memory_cost"] = round(ouro["peak_gb"] / fixed["peak_gb"], 3)
    if a.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'':<28} {'tokens/s':>10} {'peak GB':>9}   (medians of {a.repeats} runs)")
    for k, v in med.items():
        print(f"{k:<28} {v['tokens_per_sec']:>10.0f} {v['peak_gb']:>9.3f}")
    print(f"ouro-mlx --loss fixed / mlx_lm.lora: tokens/s x{summary['tokens_per_sec_ratio']}, "
          f"peak memory x{summary['peak_memory_ratio']}")
    if not a.no_ouro:
        print(f"--loss ouro over --loss fixed: x{summary['ouro_loss_time_cost']} time per "
              f"token, x{summary['ouro_loss_memory_cost']} peak memory")


if __name__ == "__main__":
    main()
