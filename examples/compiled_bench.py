"""Decode speed of the compiled loop step against the plain path, in one process.

    python examples/compiled_bench.py                  # the bundled demo model
    python examples/compiled_bench.py --hidden 2048 --layers 2 --dtype bfloat16

Full depth, greedy, batch 1. Rounds alternate plain and compiled runs (fresh cache
each, same prompt); the table shows each one's median decode tok/s and the median of
the per-round ratios. The two runs of a round must give the same tokens.
"""

import argparse
import statistics

import mlx.core as mx

import ouro_mlx
from ouro_mlx.bench import random_model, timed
from ouro_mlx.demo import model_path
from ouro_mlx.decoding.plain import generate_step
from ouro_mlx.decoding.steps import make_rule
from ouro_mlx.random_model import SHAPES, hf_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, help="a random model of this hidden size "
                   "(Ouro-1.4B's other dims); default: the bundled demo model")
    p.add_argument("--layers", type=int, default=2, help="random model: layers")
    p.add_argument("--dtype", default="bfloat16", help="random model: dtype")
    p.add_argument("--ut-steps", type=int, default=4)
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=40, help="decoded tokens per run")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if args.hidden:
        dims = dict(SHAPES["ouro-1.4b"], hidden_size=args.hidden, num_hidden_layers=args.layers,
                    head_dim=128, num_attention_heads=args.hidden // 128,
                    num_key_value_heads=args.hidden // 128)
        model = random_model(hf_config(dims, total_ut_steps=args.ut_steps), args.dtype)
        name = f"random hidden {args.hidden}, {args.layers} layers, {args.dtype}"
    else:
        model, _ = ouro_mlx.load(model_path())
        name = "bundled demo model"
    rule = make_rule(model, ut_steps=args.ut_steps, exit_threshold=1.0)
    prompt = mx.array([(7 * i + 3) % model.args.vocab_size for i in range(args.prompt)])

    def run(compiled: bool) -> tuple[float, list[int]]:
        cache = model.make_cache(rule.ut_steps)
        gen = generate_step(prompt, model, rule, cache, max_tokens=args.tokens + 1,
                            compile_step=compiled)
        tokens = []
        _, tps, _ = timed((tokens.append(t[0]) or t for t in gen), prompt.size, args.tokens)
        return tps, tokens

    run(False), run(True)  # warm up both
    plain, comp, ratios = [], [], []
    for _ in range(args.rounds):
        (a, ta), (b, tb) = run(False), run(True)
        if ta != tb:
            raise RuntimeError("compiled and plain decoding gave different tokens")
        plain.append(a)
        comp.append(b)
        ratios.append(b / a)
    med = statistics.median
    print(f"{name}: {args.ut_steps} loop steps, {args.prompt}-token prompt, "
          f"{args.tokens} tokens, {args.rounds} rounds")
    print("| path | decode tok/s (median) |\n|---|---|")
    print(f"| plain | {med(plain):.1f} |\n| compiled | {med(comp):.1f} |")
    print(f"compiled / plain: {med(ratios):.2f}x (median of per-round ratios; "
          f"min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
