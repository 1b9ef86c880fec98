"""Cost of one training step (forward + backward, Stage-I loss) at a model shape:
tokens/s and peak memory, for planning a run.

    python examples/train_step_cost.py [SHAPE] [TOKENS]
    python examples/train_step_cost.py ouro-1.4b 32      # shape, tokens per step
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from ouro_mlx.losses import stage1
from ouro_mlx.model import Model, ModelArgs
from ouro_mlx.random_model import SHAPES, hf_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", nargs="?", default="tiny", choices=list(SHAPES),
                   help="Model shape (default: tiny).")
    p.add_argument("tokens", nargs="?", type=int, default=32,
                   help="Tokens per step (default: 32).")
    args = p.parse_args()
    if args.tokens < 1:
        p.error(f"TOKENS must be >= 1, got {args.tokens}")
    shape, n = args.shape, args.tokens
    model = Model(ModelArgs.from_dict(hf_config(shape)))
    mx.eval(model.parameters())
    batch = mx.random.randint(0, model.args.vocab_size, (1, n + 1))
    mask = mx.ones((1, n), dtype=mx.bool_)
    step = nn.value_and_grad(model, lambda m: stage1(m, batch, mask, beta=0.1)[0])
    for _ in range(2):  # the first includes one-off costs
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, grads = step(model)
        mx.eval(loss, grads)
        seconds = time.perf_counter() - tic
    print(f"{shape}: {n} tokens, forward+backward {seconds:.1f} s = {n / seconds:.2f} tokens/s, "
          f"peak {mx.get_peak_memory() / 1e9:.2f} GB (float32, T={model.ut_steps})")


if __name__ == "__main__":
    main()
