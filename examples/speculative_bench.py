"""Self-speculative decoding against plain full-depth decoding, in one process.

    python examples/speculative_bench.py                     # the bundled demo model
    python examples/speculative_bench.py --verify-hidden 2048 --layers 2

Default: greedy, full depth, batch 1. Each round runs plain decoding, then every
(draft_loops k, num_draft_tokens n) setting, fixed n and adaptive (fresh cache each,
same prompt); the table shows each setting's acceptance, median decode tok/s and the
median of its per-round ratios to the plain run of the same round. Every run must give
the plain run's tokens. ``--compile-step`` adds the same settings through compiled
graphs, with their ratios to compiled plain decoding too.

``--verify-hidden H``: on a random model of hidden size H, the time of ONE call that
runs n tokens through every loop step (what a verify does, at full depth) over the
time of n single-token decode steps: it decides the speed-up on any model, given its
acceptance.
"""

import argparse
import statistics
import time

import mlx.core as mx

import ouro_mlx
from ouro_mlx.bench import random_model, timed
from ouro_mlx.demo import model_path
from ouro_mlx.encoding import encode_text
from ouro_mlx.decoding.plain import generate_step
from ouro_mlx.decoding.steps import decode, make_rule, prefill
from ouro_mlx.random_model import SHAPES, hf_config
from ouro_mlx.decoding.speculative import SpecStats, round_gain, shadow_decode, speculative_step

med = statistics.median


def speed_table(args) -> None:
    model, tok = ouro_mlx.load(model_path())
    rule = make_rule(model, ut_steps=args.ut_steps, exit_threshold=1.0)
    prompt = mx.array(encode_text(tok, args.text), dtype=mx.int32)
    compiled = (False, True) if args.compile_step else (False,)
    settings = [(k, n, False, c) for c in compiled for k in (1, 2, 3) for n in (2, 4, 8)]
    settings += [(k, 8, True, c) for c in compiled for k in (1, 2, 3)]
    if args.compile_step:
        settings.insert(0, (0, 0, False, True))  # plain decoding, compiled

    def run(setting) -> tuple[float, list[int], float]:
        cache, stats = model.make_cache(rule.ut_steps), SpecStats()
        if setting is None or setting[0] == 0:
            gen = generate_step(prompt, model, rule, cache, max_tokens=args.tokens + 1,
                                compile_step=setting is not None)
        else:
            k, n, adaptive, c = setting
            gen = speculative_step(prompt, model, rule, cache, draft_loops=k,
                                   num_draft_tokens=n, adaptive=adaptive,
                                   max_tokens=args.tokens + 1, stats=stats, compile_step=c)
        tokens = []
        _, tps, _ = timed((tokens.append(t[0]) or t for t in gen), prompt.size, args.tokens)
        return tps, tokens, stats.acceptance

    for s in [None, *settings]:  # warm up
        run(s)
    plain, tps = [], {s: [] for s in settings}
    ratios, acc = {s: [] for s in settings}, {}
    for _ in range(args.rounds):
        base, want, _ = run(None)
        plain.append(base)
        for s in settings:
            t, got, a = run(s)
            if got[:args.tokens] != want[:args.tokens]:
                raise RuntimeError(f"{s}: speculative tokens differ from plain decoding")
            tps[s].append(t)
            ratios[s].append(t / base)
            acc[s] = a
    print(f"bundled demo model: {rule.ut_steps} loop steps, greedy, prompt {args.text!r} "
          f"({prompt.size} tokens), {args.tokens} tokens, {args.rounds} rounds")
    print(f"plain full depth: {med(plain):.0f} tok/s (median)\n")
    print("\nper-token acceptance of k-step drafts (shadow drafts over a plain run) and the "
          "best expected speed-up any round could give with a free verify call:")
    print("| k | acceptance | best n | bound |\n|---|---|---|---|")
    for k in (1, 2, 3):
        alpha = shadow_acceptance(model, rule, prompt, k, args.tokens)
        n = max(range(1, 9), key=lambda n: round_gain(alpha, k, rule.ut_steps, n))
        print(f"| {k} | {alpha:.2f} | {n} | {round_gain(alpha, k, rule.ut_steps, n):.2f}x |")
    print()
    base = (0, 0, False, True)
    print("| path | k | n | acceptance | tok/s | vs plain |"
          + (" vs compiled plain |\n|---|---|---|---|---|---|---|" if args.compile_step
             else "\n|---|---|---|---|---|---|"))
    for s in settings:
        k, n, adaptive, c = s
        row = (f"| {'compiled' if c else 'plain'} | {k or '-'} | "
               f"{'≤' if adaptive else ''}{n or '-'}{' adaptive' if adaptive else ''} | "
               f"{acc[s]:.2f} | {med(tps[s]):.0f} | {med(ratios[s]):.2f}x |")
        if args.compile_step:
            row += (f" {med(a / b for a, b in zip(tps[s], tps[base])):.2f}x |" if c else " |")
        print(row)


def shadow_acceptance(model, rule, prompt, k: int, n: int) -> float:
    """How often steps 0..k-1 propose the token full depth decodes, over n greedy
    tokens: the per-position acceptance of k-step drafts."""
    cache = model.make_cache(rule.ut_steps)
    logits, _ = prefill(model, prompt[None], cache, rule)
    y, hits = mx.argmax(logits, axis=-1), 0
    for _ in range(n):
        logits, draft = shadow_decode(model, y[None], cache, rule.ut_steps, k)
        y = mx.argmax(logits, axis=-1)
        hits += int(draft.item() == y.item())
    return hits / n


def verify_cost(args) -> None:
    H = args.verify_hidden
    dims = dict(SHAPES["ouro-1.4b"], hidden_size=H, num_hidden_layers=args.layers,
                head_dim=128, num_attention_heads=H // 128, num_key_value_heads=H // 128)
    model = random_model(hf_config(dims, total_ut_steps=args.ut_steps), args.dtype)
    rule = make_rule(model, ut_steps=args.ut_steps, exit_threshold=1.0)
    T = rule.ut_steps
    cache = model.make_cache(T)
    ids = mx.array([[(7 * i + 3) % 1000 for i in range(args.prompt)]], dtype=mx.int32)
    prefill(model, ids, cache, rule)
    mx.eval([c.state for c in cache])

    def trim(n):
        for lc in cache:
            for c in lc.caches:
                c.trim(n)

    def singles(n):
        tic = time.perf_counter()
        y = ids[:, -1:]
        for _ in range(n):
            logits, _ = decode(model, y, cache, rule)
            y = mx.argmax(logits, axis=-1)[:, None]
            mx.eval(y)
        dt = time.perf_counter() - tic
        trim(n)
        return dt

    def block(n):
        tic = time.perf_counter()
        out = model.model(ids[:, :n], cache, T)
        mx.eval(model.lm_head(out.hidden[-1]))
        dt = time.perf_counter() - tic
        trim(n)
        return dt

    print(f"random hidden {H}, {args.layers} layers, {args.dtype}, {T} loop steps, "
          f"{args.prompt}-token context, {args.rounds} rounds")
    print("| n | one call of n tokens / n decode steps |\n|---|---|")
    for n in (2, 4, 8):
        singles(n), block(n)  # warm up
        r = [block(n) / singles(n) for _ in range(args.rounds)]
        print(f"| {n} | {med(r):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="2,23,14,31 -> =", help="prompt (bundled model)")
    p.add_argument("--tokens", type=int, default=48, help="decoded tokens per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ut-steps", type=int, default=4)
    p.add_argument("--compile-step", action="store_true",
                   help="also compiled rows: plain decoding and every setting through "
                        "compiled graphs (ouro_mlx.decoding.compiled)")
    p.add_argument("--verify-hidden", type=int, default=None,
                   help="measure the verify cost on a random model of this hidden size")
    p.add_argument("--layers", type=int, default=2, help="random model: layers")
    p.add_argument("--dtype", default="float32", help="random model: dtype")
    p.add_argument("--prompt", type=int, default=32, help="random model: context tokens")
    args = p.parse_args()
    if args.prompt > 1000 or args.prompt < 8:
        raise SystemExit("--prompt must be in [8, 1000]")
    verify_cost(args) if args.verify_hidden else speed_table(args)


if __name__ == "__main__":
    main()
