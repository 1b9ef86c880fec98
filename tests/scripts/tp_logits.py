"""Run by tests under mlx.launch: tensor-parallel logits of a checkpoint."""

import sys

import mlx.core as mx
import numpy as np

import ouro_mlx

model_dir, out = sys.argv[1], sys.argv[2]
group = mx.distributed.init()
model = ouro_mlx.load_model(model_dir)
model.shard(group)
ids = mx.array([[5, 17, 300, 42, 7, 99, 128, 3]])
logits = model(ids, exit_threshold=0.5)
cache = model.make_cache()
model(ids[:, :-1], cache=cache)
step = model(ids[:, -1:], cache=cache)
mx.eval(logits, step)  # every rank takes part in the all-reduces
if group.rank() == 0:
    np.savez(out, logits=np.array(logits), step=np.array(step))
print("rank", group.rank(), "of", group.size(), "done", flush=True)
