"""How rows at different loop depths should share the continuous batch: measured.

    python examples/batch_depths.py [--rows 16] [--tokens 32] [--repeats 3] [--hidden 512]

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()

    import ouro_mlx
    from ouro_mlx import demo
    from ouro_mlx.random_model import make_random_checkpoint

    model, _ = ouro_mlx.load(demo.model_path(), fuse=True)
    measure("bundled model", model, args.rows, args.tokens, args.repeats)
    h = args.hidden
    dims = dict(hidden_size=h, num_hidden_layers=4, num_attention_heads=h // 64,
                num_key_value_heads=h // 64, head_dim=64, intermediate_size=h * 3,
                vocab_size=2048, max_position_embeddings=4096)
    path = make_random_checkpoint(tempfile.mkdtemp() + "/m", dims, seed=0)
    model, _ = ouro_mlx.load(path, fuse=True)
    measure(f"random 4-layer h{h}", model, args.rows, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
