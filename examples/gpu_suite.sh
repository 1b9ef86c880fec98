#!/usr/bin/env bash
# Every decode target at the Ouro-1.4B shape, measured in one go on a GPU machine:
#
#   bash examples/gpu_suite.sh                # where MLX has a GPU backend
#   bash .gpu/run bash examples/gpu_suite.sh  # through the project's offline CUDA kit
#
# Random weights, bfloat16, batch 1, a 512-token prompt, 128 generated tokens, each
# process warmed up before timing (CUDA compiles its kernels on first use):
#   (a) full-depth decode against mlx-lm's llama unrolled to the same depth, and its
#       share of the memory-bandwidth bound (bench's bw%)
#   (b) --compile-step against plain decoding
#   (c) --pipeline k=1 on a 24-layer hidden-2048 model whose loop steps agree
#       (examples/pipeline_bench.py --agree 0.02) against plain decoding
#   (d) adaptive exit q=0.5 against the same per-token depths at fixed depth
#   (e) 4-bit decode against bfloat16 decode
# then examples/decode_profile.py: per token, the host's graph building, the device's
# run and the bandwidth bound of plain, compiled and peer decoding.
# It prints each step's own table, then a summary of every target with its threshold.
# A failing step is named and the others still run; a step still running after
# SUITE_STEP_TIMEOUT seconds (130) is stopped. Expected to take 3-5 minutes on an
# H200 (estimated from figures measured there, not yet timed).
#
# Sizes and thresholds come from the environment, e.g. a quick check on a CPU:
#   SUITE_MODEL=tiny SUITE_PROMPT=16 SUITE_TOKENS=8 SUITE_REPEATS=1 SUITE_ROUNDS=1 \
#   SUITE_PIPE_LAYERS=2 SUITE_PIPE_HIDDEN= SUITE_PYTHON=python bash examples/gpu_suite.sh
set -u

MODEL=${SUITE_MODEL:-ouro-1.4b}       # a shape of `ouro-mlx bench --random`
PROMPT=${SUITE_PROMPT:-512}
TOKENS=${SUITE_TOKENS:-128}
REPEATS=${SUITE_REPEATS:-3}           # bench's interleaved runs per median
ROUNDS=${SUITE_ROUNDS:-3}             # pipeline_bench's rounds
PIPE_LAYERS=${SUITE_PIPE_LAYERS:-24}
PIPE_HIDDEN=${SUITE_PIPE_HIDDEN-2048}  # empty: pipeline_bench's tiny width (hidden 64)
PY=${SUITE_PYTHON:-python3}
OUT=${SUITE_OUT:-$(mktemp -d)}
STEP_TIMEOUT=${SUITE_STEP_TIMEOUT:-130}  # seconds; four steps stay under 9 minutes
export MIN_PEER=${SUITE_MIN_PEER:-1.30}          # (a) Ouro / unrolled peer, full depth
export MIN_BW=${SUITE_MIN_BW:-0.35}              # (a) share of the bandwidth bound
export MIN_COMPILED=${SUITE_MIN_COMPILED:-1.10}  # (b) compiled / plain
export MIN_PIPELINE=${SUITE_MIN_PIPELINE:-1.30}  # (c) pipeline k=1 / plain
export MAX_ADAPTIVE=${SUITE_MAX_ADAPTIVE:-1.10}  # (d) adaptive / same depths fixed
export MIN_4BIT=${SUITE_MIN_4BIT:-1.30}          # (e) 4-bit / bfloat16 decode
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$OUT"
rm -f "$OUT/bf16.json" "$OUT/quant.json" "$OUT/pipeline.json" "$OUT/profile.json"  # no stale figures
failed=()

limit=()
command -v timeout >/dev/null && limit=(timeout "$STEP_TIMEOUT")

step() {  # step NAME COMMAND...: run it, keep going if it fails
  local name=$1 start=$SECONDS rc
  shift
  echo
  echo "######## $name: $*"
  ${limit[@]+"${limit[@]}"} "$@"  # (bash 3.2 calls an empty array unbound)
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "######## $name: done in $((SECONDS - start)) s"
  else
    [ $rc -eq 124 ] && echo "######## $name: stopped after $STEP_TIMEOUT s"
    echo "######## $name: FAILED (exit $rc) after $((SECONDS - start)) s"
    failed+=("$name")
  fi
}

bench=("$PY" -m ouro_mlx bench --random "$MODEL" --dtype bfloat16 --prompt-tokens "$PROMPT"
       --gen-tokens "$TOKENS" --repeats "$REPEATS" --no-fixed)
# (a), (b), (d): peer, full depth, compiled step and adaptive q0.5 in one process
step bf16 "${bench[@]}" --exits q0.5 --compile-step --json-out "$OUT/bf16.json"
# (e): bfloat16 then 4-bit, each with its peer, in one process
step 4bit "${bench[@]}" --quant none,4 --exits "" --json-out "$OUT/quant.json"
# (c): plain, pipeline k=1 always and adaptive, interleaved rounds
pipe=("$PY" "$here/pipeline_bench.py" --layers "$PIPE_LAYERS" --agree 0.02 --dtype bfloat16
      --ks 1 --prompt-tokens "$PROMPT" --tokens "$TOKENS" --rounds "$ROUNDS"
      --json-out "$OUT/pipeline.json")
[ -n "$PIPE_HIDDEN" ] && pipe+=(--hidden "$PIPE_HIDDEN")
step pipeline "${pipe[@]}"
# where a token's time goes (host graph building, device run, bandwidth bound) for
# plain, compiled and the peer: what is left where a target is missed
step profile "$PY" "$here/decode_profile.py" --shape "$MODEL" --dtype bfloat16 \
  --prompt "$PROMPT" --tokens "$TOKENS" --json-out "$OUT/profile.json"

echo
fails=${failed[*]-}
echo "######## summary ($MODEL, bfloat16, batch 1, $PROMPT-token prompt, $TOKENS tokens;"
echo "######## results in $OUT${fails:+; failed: $fails})"
"$PY" - "$OUT" <<'EOF'
import json
import os
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
env = {k: float(os.environ[k]) for k in ("MIN_PEER", "MIN_BW", "MIN_COMPILED",
                                         "MIN_PIPELINE", "MAX_ADAPTIVE", "MIN_4BIT")}


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def full_decode(run):  # median decode tok/s of the full-depth runs
    runs = run["target_ratio_runs"]["runs_tok_per_s"]["full"]
    return statistics.median_high(d for _, d in runs)


rows = []  # (target, measured, threshold, verdict)


def add(target, get, fmt, op, limit, step):
    bound = f"{op} {fmt.format(limit)}"
    try:
        value = get()
    except (KeyError, TypeError, IndexError, StopIteration, ZeroDivisionError):
        rows.append((target, f"no figure (step {step} failed)", bound, "-"))
        return
    ok = value >= limit if op == ">=" else value <= limit
    rows.append((target, fmt.format(value), bound, "met" if ok else "NOT met"))


bf16, quant, pipe = load("bf16.json"), load("quant.json"), load("pipeline.json")
b = bf16 and bf16["runs"]["bfloat16"]
add("(a) full-depth decode / unrolled mlx-lm peer",
    lambda: b["summary"]["decode vs unrolled peer"], "{:.3f}x", ">=", env["MIN_PEER"], "bf16")
add("(a) full-depth decode, share of the bandwidth bound",
    lambda: b["summary"]["full-depth decode, share of the memory-bandwidth bound"],
    "{:.1%}", ">=", env["MIN_BW"], "bf16")
add("(b) --compile-step / plain decode",
    lambda: b["summary"]["compiled decode speed-up over full depth"], "{:.3f}x", ">=",
    env["MIN_COMPILED"], "bf16")
add("(c) --pipeline k=1 / plain decode (agreeing model)",
    lambda: next(r["vs_plain"] for r in pipe["rows"]
                 if r["k"] == 1 and not r["adaptive"] and r["path"] == "plain"),
    "{:.3f}x", ">=", env["MIN_PIPELINE"], "pipeline")
add("(c) --pipeline k=1 adaptive / plain decode",
    lambda: next(r["vs_plain"] for r in pipe["rows"]
                 if r["k"] == 1 and r["adaptive"] and r["path"] == "plain"),
    "{:.3f}x", ">=", env["MIN_PIPELINE"], "pipeline")
add("(d) adaptive q=0.5 time / same depths fixed",
    lambda: b["adaptive_overhead"]["q0.5"]["ratio"], "{:.3f}", "<=", env["MAX_ADAPTIVE"],
    "bf16")
add("(e) 4-bit decode / bfloat16 decode",
    lambda: (full_decode(quant["runs"]["bfloat16, 4-bit"])
             / full_decode(quant["runs"]["bfloat16"])),
    "{:.3f}x", ">=", env["MIN_4BIT"], "4bit")

w = [max(len(str(r[i])) for r in rows + [("target", "measured", "threshold", "verdict")])
     for i in range(4)]
for r in [("target", "measured", "threshold", "verdict"), tuple("-" * n for n in w), *rows]:
    print("  ".join(str(c).ljust(n) for c, n in zip(r, w)))

notes = []
try:
    notes.append(f"(a): full depth {full_decode(b):,.1f} tok/s (median); GEMV bandwidth "
                 f"{bf16['gemv_bandwidth']['gb_per_s']:,.1f} GB/s; "
                 f"{b['ouro'][0]['bytes_per_token'] / 1e9:.3g} GB read per token")
except (KeyError, TypeError, IndexError):
    pass
if b and b["adaptive_overhead"].get("q0.5", {}).get("note"):
    notes.append("(d): " + b["adaptive_overhead"]["q0.5"]["note"])
if pipe:
    p1 = next((r for r in pipe["rows"] if r["k"] == 1 and not r["adaptive"]), None)
    if p1:
        notes.append(f"(c): {p1['passes_per_token']:.2f} passes of the layers per token "
                     f"(plain decoding: {pipe['loop_steps']}) on {pipe['model']}")
    if pipe["runs_differing"]:
        notes.append(f"(c): {pipe['runs_differing']} runs gave other tokens than plain "
                     "decoding")
prof = load("profile.json")
for r in (prof or {}).get("rows", []):
    notes.append(f"profile: {r['path']}: {r['decode_ms']:.2f} ms/token decoding; building "
                 f"its graph {r['build_ms']:.2f} ms, running it {r['run_ms']:.2f} ms, "
                 f"bandwidth bound {r['bound_ms']:.2f} ms")
for n in notes:
    print("  " + n)
EOF
if [ -n "$fails" ]; then
  echo "failed steps: $fails (their output is above)"
  exit 1
fi
