"""Decode speed with fused projections (``Model.fuse_projections``) against separate
ones, in one process.

    python examples/fused_bench.py                                 # the bundled demo model
    python examples/fused_bench.py --layers 24 --hidden 256 --dtype bfloat16
    python examples/fused_bench.py --layers 24 --hidden 256 --quant 4

Full depth, greedy, batch 1, on the plain decode path and the compiled one
(``--compile-step``). The fused model is a copy of the other, fused. Each round runs
both models on each path, in an order that alternates from round to round (fresh
cache each, same prompt); they must give the same tokens. The table shows the median
decode tok/s and the median of the per-round ratios fused / separate.
"""

import argparse
import contextlib
import copy
import io
import statistics

import mlx.core as mx

import ouro_mlx
from ouro_mlx.bench import quantize, random_model, timed
from ouro_mlx.demo import model_path
from ouro_mlx.decoding.plain import generate_step
from ouro_mlx.decoding.steps import make_rule
from ouro_mlx.random_model import SHAPES, hf_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, help="a random model of this many layers "
                   "(the small shape's other dims); default: the bundled demo model")
    p.add_argument("--hidden", type=int, default=256, help="random model: hidden size")
    p.add_argument("--dtype", default="bfloat16", help="random model: dtype")
    p.add_argument("--quant", type=int, choices=[4, 8], help="random model: quantize")
    p.add_argument("--ut-steps", type=int, default=4)
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=40, help="decoded tokens per run")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--paths", default="plain,compiled", help="comma list: plain, compiled")
    args = p.parse_args()
    if args.layers:
        heads = args.hidden // 64
        dims = dict(SHAPES["small"], num_hidden_layers=args.layers, hidden_size=args.hidden,
                    num_attention_heads=heads, num_key_value_heads=heads,
                    intermediate_size=args.hidden * 11 // 4)
        config = hf_config(dims, total_ut_steps=args.ut_steps)
        model = random_model(config, args.dtype)
        name = f"random, {args.layers} layers, hidden {args.hidden}, {args.dtype}"
        if args.quant:
            with contextlib.redirect_stdout(io.StringIO()):
                model = quantize(model, config, args.quant)
            name += f", {args.quant}-bit"
    else:
        model, _ = ouro_mlx.load(model_path())
        name = "bundled demo model"
    fused = copy.deepcopy(model)
    if not fused.fuse_projections():
        raise SystemExit("nothing to fuse")
    models = {"separate": model, "fused": fused}
    rule = make_rule(model, ut_steps=args.ut_steps, exit_threshold=1.0)
    prompt = mx.array([(7 * i + 3) % model.args.vocab_size for i in range(args.prompt)])

    def run(m, compiled: bool) -> tuple[float, list[int]]:
        cache = m.make_cache(rule.ut_steps)
        gen = generate_step(prompt, m, rule, cache, max_tokens=args.tokens + 1,
                            compile_step=compiled)
        tokens = []
        _, tps, _ = timed((tokens.append(t[0]) or t for t in gen), prompt.size, args.tokens)
        return tps, tokens

    paths = args.paths.split(",")
    tps = {(p, k): [] for p in paths for k in models}
    ratios = {p: [] for p in paths}
    for p in paths:  # warm up (and trace the compiled graphs)
        for m in models.values():
            run(m, p == "compiled")
    for r in range(args.rounds):
        for p in paths:
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            got = {k: run(models[k], p == "compiled") for k in order}
            if got["separate"][1] != got["fused"][1]:
                raise RuntimeError(f"{p}: fused and separate projections gave different tokens")
            for k, (t, _) in got.items():
                tps[p, k].append(t)
            ratios[p].append(got["fused"][0] / got["separate"][0])
    med = statistics.median
    print(f"{name}: {args.ut_steps} loop steps, {args.prompt}-token prompt, "
          f"{args.tokens} tokens, {args.rounds} rounds")
    print("| path | separate tok/s | fused tok/s | fused / separate (min-max) |")
    print("|---|---|---|---|")
    for p in paths:
        rs = ratios[p]
        print(f"| {p} | {med(tps[p, 'separate']):.1f} | {med(tps[p, 'fused']):.1f} | "
              f"{med(rs):.3f}x ({min(rs):.3f}-{max(rs):.3f}) |")


if __name__ == "__main__":
    main()
