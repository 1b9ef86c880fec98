"""Pipelined loop decoding against plain full-depth decoding, in one process.

    python examples/pipeline_bench.py                          # the bundled demo model
    python examples/pipeline_bench.py --layers 24 --agree 0.02  # 24 layers, steps agree
    python examples/pipeline_bench.py --layers 2 --hidden 2048  # a wide model on the CPU
    python examples/pipeline_bench.py --layers 24 --hidden 2048 --agree 0.02 --ks 1 \
        --prompt-tokens 512 --json-out pipeline.json          # examples/gpu_suite.sh

Greedy, fixed full depth, batch 1. Each round runs plain decoding, then the pipeline
for draft_loops k = 1, 2, 3 (``--ks``; fresh cache each, same prompt), always and
adaptive (measured against plain decoding every 16 tokens); every run should give the
plain run's tokens (a note counts the runs that did not: a backend that is not bitwise
repeatable, such as CUDA, can differ where two tokens' logits nearly tie). The table
shows passes of the layer stack per token (plain decoding: the depth), the median
tok/s and the median of the per-round ratios to plain decoding of the same round; with
``--compile-step`` the same through compiled graphs, against compiled plain decoding.
depth / passes is what the pipeline would give if a pass of a few rows cost what a
pass of one does.

Random models (``--layers``): the tiny shape (hidden 64) or ``--hidden``; ``--agree s``
scales every sub-layer output by s (and sets a unit final norm), so a loop step changes
the state a little and early readouts often match the last step's, as in a model whose
easy tokens are settled after a loop or two.
"""

import argparse
import json
import statistics

import mlx.core as mx

import ouro_mlx
from ouro_mlx.bench import random_model, timed
from ouro_mlx.demo import model_path
from ouro_mlx.encoding import encode_text
from ouro_mlx.decoding.plain import generate_step
from ouro_mlx.decoding.steps import make_rule
from ouro_mlx.decoding.pipeline import PipelineStats, pipelined_step
from ouro_mlx.random_model import SHAPES, hf_config

med = statistics.median


def load(args):
    if args.layers is None:
        model, tok = ouro_mlx.load(model_path())
        return model, mx.array(encode_text(tok, args.text), dtype=mx.int32), "bundled demo model"
    dims = dict(SHAPES["tiny"], num_hidden_layers=args.layers,
                max_position_embeddings=max(4096, args.prompt_tokens + args.tokens + 8))
    if args.hidden:
        dims.update(hidden_size=args.hidden, head_dim=128, num_attention_heads=args.hidden // 128,
                    num_key_value_heads=args.hidden // 128, intermediate_size=args.hidden * 11 // 4)
    model = random_model(hf_config(dims), args.dtype)
    if args.agree:
        model.model.norm.weight = mx.ones_like(model.model.norm.weight)
        for layer in model.model.layers:
            for norm in (layer.input_layernorm_2, layer.post_attention_layernorm_2):
                norm.weight = args.agree * norm.weight
        mx.eval(model.parameters())
    prompt = mx.array([(7 * i + 3) % 500 for i in range(args.prompt_tokens)], dtype=mx.int32)
    name = (f"random model, hidden {dims['hidden_size']}, {args.layers} layers, {args.dtype}"
            + (f", sub-layer outputs x{args.agree}" if args.agree else ""))
    return model, prompt, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="2,23,14,31 -> =", help="prompt (bundled model)")
    p.add_argument("--tokens", type=int, default=48, help="decoded tokens per run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile-step", action="store_true", help="also compiled rows")
    p.add_argument("--layers", type=int, default=None, help="a random model of this many layers")
    p.add_argument("--hidden", type=int, default=None, help="random model: hidden size")
    p.add_argument("--agree", type=float, default=None,
                   help="random model: scale sub-layer outputs (e.g. 0.02)")
    p.add_argument("--dtype", default="float32", help="random model: dtype")
    p.add_argument("--prompt-tokens", type=int, default=16, help="random model: prompt length")
    p.add_argument("--ks", default="1,2,3", help="comma list of draft_loops k to run")
    p.add_argument("--json-out", help="also write the table here")
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    model, prompt, name = load(args)
    rule = make_rule(model, exit_threshold=1.0)
    T = rule.ut_steps
    modes = (False, True) if args.compile_step else (False,)
    # k = 0: plain decoding; "adaptive": the pipeline checked against plain decoding
    settings = [(k, c, False) for c in modes for k in (0, *ks)]
    settings += [(k, c, True) for c in modes for k in ks]

    def run(setting):
        k, c, adaptive = setting
        cache, stats = model.make_cache(T), PipelineStats()
        if k == 0:
            gen = generate_step(prompt, model, rule, cache, max_tokens=args.tokens + 1,
                                compile_step=c)
        else:
            gen = pipelined_step(prompt, model, rule, cache, draft_loops=k,
                                 max_tokens=args.tokens + 1, compile_step=c,
                                 adaptive=adaptive, stats=stats)
        tokens = []
        _, tps, _ = timed((tokens.append(t[0]) or t for t in gen), prompt.size, args.tokens)
        gen.close()  # the pipeline's counts are final once it is closed
        piped = stats.tokens / (stats.tokens + stats.plain_tokens) if stats.tokens else 0
        return tps, tokens[:args.tokens], (stats.ticks_per_token or T, piped)

    for s in settings:  # warm up (and trace)
        run(s)
    tps = {s: [] for s in settings}
    passes, differing = {}, []
    for _ in range(args.rounds):
        want = None
        for s in settings:
            t, got, passes[s] = run(s)
            want = want or got
            if got != want:
                differing.append(sum(a != b for a, b in zip(got, want)))
            tps[s].append(t)
    print(f"{name}: {T} loop steps, greedy, {prompt.size}-token prompt, {args.tokens} "
          f"tokens, {args.rounds} rounds, medians")
    print("| path | k | passes / token | depth / passes | pipelined tokens | tok/s | "
          "vs plain (same path) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for s in settings:
        k, c, adaptive = s
        ratio = med(a / b for a, b in zip(tps[s], tps[0, c, False]))
        p, piped = passes[s]
        print(f"| {'compiled' if c else 'plain'} | {k or 'plain decoding'}"
              f"{' adaptive' if adaptive else ''} | {p:.2f} | {T / p:.2f}x | "
              f"{piped:.0%} | {med(tps[s]):.1f} | {ratio:.2f}x |")
        rows.append(dict(path="compiled" if c else "plain", k=k, adaptive=adaptive,
                         passes_per_token=p, pipelined_tokens=piped, tok_s=med(tps[s]),
                         vs_plain=ratio))
    if differing:
        print(f"note: {len(differing)} of {args.rounds * (len(settings) - 1)} runs gave "
              f"other tokens than plain decoding (up to {max(differing)} of {args.tokens}; "
              "a backend that is not bitwise repeatable does this where logits nearly tie)")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"model": name, "loop_steps": T, "prompt_tokens": int(prompt.size),
                       "tokens": args.tokens, "rounds": args.rounds, "rows": rows,
                       "runs_differing": len(differing)}, f, indent=2)


if __name__ == "__main__":
    main()
