"""Cost of one training step (forward + backward, Stage-I loss) at a model shape:
tokens/s and peak memory, for planning a run.

    python examples/train_step_cost.py ouro-1.4b 32      # shape, tokens per step
"""

import sys
import time

import mlx.core as mx
import mlx.nn as nn

from ouro_mlx.losses import stage1
from ouro_mlx.model import Model, ModelArgs
from ouro_mlx.random_model import hf_config


def main() -> None:
    shape, n = sys.argv[1], int(sys.argv[2])
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
