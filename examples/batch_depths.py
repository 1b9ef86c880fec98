"""How rows at different loop depths should share the continuous batch: measured.

    python examples/batch_depths.py [--rows 16] [--tokens 32] [--repeats 3] [--hidden 256]

Decodes ``--rows`` prompts in-process with ``ouro_mlx.decoding.batch.Batcher``, the
rows' loop options mixed (ut_steps 1-4, Q-exit at 0.5 and 0.9, exit_at_step 1, the
model's default), two ways, alternating:

- shared: one batch; each token runs loop step t for every row while any row still
  loops at t, exited rows wait (the server's way);
- split: one batch per fixed depth and one for the adaptive rows, each running only
  its own steps.

and, for scale, the same rows all at full depth in one batch, and one row alone.
Prints decode tokens/s (medians) on the bundled model and on a random model of
hidden size ``--hidden`` (4 layers), where rows cost compute, not just kernel launches.
Then the engine against mlx-lm's own ``BatchGenerator`` (what ``mlx_lm.server``
batches with) on the bundled model's shell games, prompts and 48 tokens each, no
HTTP: tokens/s including prefill, alternating, at full depth and the model's exit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

MIXED = [dict(ut_steps=1), dict(ut_steps=2), dict(ut_steps=3), dict(ut_steps=4),
         dict(exit_threshold=0.5), dict(exit_threshold=0.9), dict(exit_at_step=1), {}]


def tokens_per_second(model, prompts, opts, tokens, share=True) -> float:
    from ouro_mlx.decoding.batch import Batcher, Sequence
    from ouro_mlx.generation import make_rule

    b = Batcher(share_depths=share)
    seqs = [Sequence(p, model, make_rule(model, **o), tokens) for p, o in zip(prompts, opts)]
    for s in seqs:
        b.add(s)
    while b.waiting or b.prefilling:  # every prompt in: time decoding only
        b.step()
    done = sum(len(s.tokens) for s in seqs)
    start = time.perf_counter()
    while not b.idle:
        b.step()
    return (sum(len(s.tokens) for s in seqs) - done) / (time.perf_counter() - start)


def measure(name, model, rows, tokens, repeats) -> None:
    import random

    rng = random.Random(0)
    vocab = model.args.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(6 + i % 5)] for i in range(rows)]
    mixed = [MIXED[i % len(MIXED)] for i in range(rows)]
    ways = {"shared (mixed depths)": (mixed, True), "split by depth (mixed)": (mixed, False),
            "all at full depth": ([dict(exit_threshold=1.0)] * rows, True)}
    got = {k: [] for k in ways}
    alone = []
    for _ in range(repeats):
        for k, (opts, share) in ways.items():
            got[k].append(tokens_per_second(model, prompts, opts, tokens, share))
        alone.append(tokens_per_second(model, prompts[:1], [{}], tokens))
    print(f"\n{name}, {rows} rows, {tokens} tokens each (decode tok/s, median of {repeats})")
    print("| batch | tok/s | vs shared |\n|---|---:|---:|")
    base = statistics.median(got["shared (mixed depths)"])
    for k, v in got.items():
        print(f"| {k} | {statistics.median(v):.0f} | {statistics.median(v) / base:.2f}x |")
    print(f"| one row alone (model default) | {statistics.median(alone):.0f} | "
          f"{statistics.median(alone) / base:.2f}x |")


def against_mlx_lm(model, tokenizer, rows: int, repeats: int) -> None:
    from mlx_lm.generate import BatchGenerator

    from ouro_mlx.decoding.batch import Batcher, Sequence
    from ouro_mlx.demo.task import eval_problems
    from ouro_mlx.encoding import encode_text
    from ouro_mlx.generation import make_rule

    prompts = [encode_text(tokenizer, p.question) for p in eval_problems(rows, 10_000, 3, 3)]

    def peer(n):
        gen = BatchGenerator(model, max_tokens=48, completion_batch_size=32)
        gen.insert(prompts[:n])
        done = tokens = 0
        start = time.perf_counter()
        while done < n:
            for r in gen.next_generated():
                tokens += 1
                done += r.finish_reason is not None
        return tokens / (time.perf_counter() - start)

    def ours(n, q):
        b = Batcher()
        seqs = [Sequence(p, model, make_rule(model, exit_threshold=q), 48) for p in prompts[:n]]
        for s in seqs:
            b.add(s)
        start = time.perf_counter()
        while not b.idle:
            b.step()
        return sum(len(s.tokens) for s in seqs) / (time.perf_counter() - start)

    print(f"\nbundled model against mlx-lm's BatchGenerator (tok/s incl. prefill, median "
          f"of {repeats})")
    print("| rows | BatchGenerator (full depth) | ouro-mlx full depth | ouro-mlx model's exit |"
          " full / peer | exit / peer |\n|---:|---:|---:|---:|---:|---:|")
    for n in sorted({1, rows}):
        got = {"peer": [], "full": [], "exit": []}
        for _ in range(repeats):
            got["peer"].append(peer(n))
            got["full"].append(ours(n, 1.0))
            got["exit"].append(ours(n, None))
        m = {k: statistics.median(v) for k, v in got.items()}
        print(f"| {n} | {m['peer']:.0f} | {m['full']:.0f} | {m['exit']:.0f} | "
              f"{m['full'] / m['peer']:.2f}x | {m['exit'] / m['peer']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()

    import ouro_mlx
    from ouro_mlx import demo
    from ouro_mlx.random_model import make_random_checkpoint

    model, tokenizer = ouro_mlx.load(demo.model_path(), fuse=True)
    measure("bundled model", model, args.rows, args.tokens, args.repeats)
    plain, _ = ouro_mlx.load(demo.model_path())  # as mlx-lm loads it: unfused
    against_mlx_lm(plain, tokenizer, args.rows, args.repeats)
    h = args.hidden
    dims = dict(hidden_size=h, num_hidden_layers=4, num_attention_heads=h // 64,
                num_key_value_heads=h // 64, head_dim=64, intermediate_size=h * 3,
                vocab_size=2048, max_position_embeddings=4096)
    path = make_random_checkpoint(tempfile.mkdtemp() + "/m", dims, seed=0)
    model, _ = ouro_mlx.load(path, fuse=True)
    measure(f"random 4-layer h{h}", model, args.rows, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
