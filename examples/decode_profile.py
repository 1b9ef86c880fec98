"""Where a decoded token's time goes: the host building its graph, the device running it,
and the memory-bandwidth bound, for plain and compiled fixed-depth decoding and the
unrolled mlx-lm peer, in one process.

    python examples/decode_profile.py --shape ouro-1.4b --dtype bfloat16 --prompt 512
    python examples/decode_profile.py --shape tiny --prompt 16 --tokens 8    # quick look

Random weights, batch 1, greedy, full depth; Ouro with fused projections, as
``generate`` decodes. Per token, medians over ``--tokens`` tokens (after one warm-up
run of each path):

- build: building the token's graph in Python (the layers' calls, nothing evaluated);
- run: evaluating that graph, waited for (the device's work and the host's launching
  of its kernels);
- decode: a token of the real decode loop, which builds token n+1 while token n runs
  (``mx.async_eval``), as ``generate`` and mlx-lm do;
- bound: the bytes a token reads over the bandwidth of a large matrix-vector product
  measured in this process (``ouro-mlx bench``'s bw%).

Reading it: decode close to build, with run below it, means the host's Python is the
limit (fewer graph nodes, or the compiled step); decode close to run and far above the
bound means kernel count and launch cost (fewer, larger kernels; see
``examples/graph_nodes.py``); run close to bound means the bytes (quantize).
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from ouro_mlx import bench as B
from ouro_mlx.decoding.compiled import CompiledDecoder
from ouro_mlx.decoding.steps import decode, make_rule, prefill
from ouro_mlx.random_model import SHAPES, hf_config


def split(step, y: mx.array, n: int) -> tuple[float, float, list[int]]:
    """Median (build, run) seconds of ``n`` tokens of ``step(y) -> next y``, each
    token's graph built, then evaluated and waited for; and the tokens."""
    builds, runs, tokens = [], [], []
    for _ in range(n):
        mx.synchronize()
        tic = time.perf_counter()
        y = step(y)
        built = time.perf_counter()
        mx.eval(y)
        mx.synchronize()
        builds.append(built - tic)
        runs.append(time.perf_counter() - built)
        tokens.append(y.item())
    return statistics.median(builds), statistics.median(runs), tokens


def pipelined(step, y: mx.array, n: int) -> tuple[float, list[int]]:
    """Seconds per token of ``n`` tokens decoded as ``generate`` does: token n+1's
    graph built and queued before token n is read."""
    mx.eval(y)
    mx.synchronize()
    tokens = []
    tic = time.perf_counter()
    for _ in range(n):
        nxt = step(y)
        mx.async_eval(nxt)
        tokens.append(y.item())
        y = nxt
    tokens.append(y.item())
    mx.synchronize()
    return (time.perf_counter() - tic) / n, tokens[1:]


def ouro_steps(model, rule, prompt):
    """Makers of a fresh prefilled (step, first token) for the plain and the compiled
    path."""
    def prefilled():
        cache = model.make_cache(rule.ut_steps)
        logits, _ = prefill(model, prompt[None], cache, rule, 2048)
        return cache, mx.argmax(logits, axis=-1).reshape(1, 1)

    def plain():
        cache, y0 = prefilled()
        return (lambda y: mx.argmax(decode(model, y, cache, rule)[0], axis=-1)
                .reshape(1, 1)), y0

    def compiled():
        cache, y0 = prefilled()
        decoder = CompiledDecoder(model, cache, rule.fixed_loops)
        return (lambda y: mx.argmax(decoder(y), axis=-1).reshape(1, 1)), y0

    return {"ouro plain": plain, "ouro compiled": compiled}


def peer_step(peer, prompt):
    from mlx_lm.models.cache import make_prompt_cache

    def make():
        cache = make_prompt_cache(peer)
        logits = peer(prompt[None], cache=cache)[:, -1]
        y0 = mx.argmax(logits, axis=-1).reshape(1, 1)

        def step(y):
            return mx.argmax(peer(y, cache=cache)[:, -1], axis=-1).reshape(1, 1)
        return step, y0
    return make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="ouro-1.4b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="the shape's layers, changed (graph building "
                   "grows with the layers, not the widths)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=32, help="tokens timed per path")
    p.add_argument("--json-out", help="also write the figures here")
    args = p.parse_args()

    dims = dict(SHAPES[args.shape])
    if args.layers:
        dims["num_hidden_layers"] = args.layers
    config = hf_config(dims)
    model = B.random_model(config, args.dtype)
    T = model.ut_steps
    peer = B.unrolled_peer(model, T)  # before fusing: it keeps the projections separate
    model.fuse_projections()
    rule = make_rule(model, ut_steps=T, exit_threshold=1.0)
    V = model.args.vocab_size
    prompt = mx.array([(7 * i + 3) % V for i in range(args.prompt)])
    bandwidth, _ = B.gemv_bandwidth()
    positions = B.decode_positions(args.prompt, args.tokens)
    paths = {**ouro_steps(model, rule, prompt), "mlx-lm llama, unrolled": peer_step(peer, prompt)}
    nbytes = {"mlx-lm llama, unrolled": B.peer_decode_bytes(peer, positions)}
    rows, tokens = [], {}
    for name, make in paths.items():
        step, y0 = make()
        pipelined(step, y0, 4)  # warm-up: kernels compiled, graphs traced
        step, y0 = make()
        build, run, toks = split(step, y0, args.tokens)
        step, y0 = make()
        per_token, toks2 = pipelined(step, y0, args.tokens)
        tokens[name] = toks
        if toks != toks2:
            raise RuntimeError(f"{name}: the two timed runs decoded different tokens")
        read = nbytes.get(name) or B.decode_bytes(model, T, positions)
        rows.append({"path": name, "build_ms": 1e3 * build, "run_ms": 1e3 * run,
                     "decode_ms": 1e3 * per_token, "bound_ms": 1e3 * read / bandwidth,
                     "bytes_per_token": read})
    if tokens["ouro plain"] != tokens["ouro compiled"]:
        raise RuntimeError("plain and compiled decoding gave different tokens")

    print(f"{args.shape}{f' with {args.layers} layers' if args.layers else ''}, {args.dtype}, {args.prompt}-token prompt, {args.tokens} tokens, "
          f"{len(model.layers)} layers x {T} loop steps; GEMV bandwidth "
          f"{bandwidth / 1e9:,.0f} GB/s ({mx.default_device()})")
    print("| path | build ms | run ms | decode ms/token | bound ms | decode / bound "
          "| build / decode |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['build_ms']:.2f} | {r['run_ms']:.2f} | "
              f"{r['decode_ms']:.2f} | {r['bound_ms']:.2f} | "
              f"{r['decode_ms'] / r['bound_ms']:.1f}x | "
              f"{r['build_ms'] / r['decode_ms']:.0%} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"shape": args.shape, "layers": len(model.layers), "dtype": args.dtype, "prompt": args.prompt,
                       "tokens": args.tokens, "gemv_bytes_per_s": bandwidth, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
