"""Host syncs per emitted token on each decoding path (32 greedy tokens).

    python examples/host_syncs.py            # the bundled model and a random 4-layer model

Every way a Python program waits for the device is counted: ``item``, ``tolist``,
truth tests and conversions of arrays, ``mx.eval``, ``mx.synchronize``. On an
accelerator each one stalls the device until the host catches up.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mlx.core as mx

import ouro_mlx
from ouro_mlx import batch_generate, demo, stream_generate
try:
    from ouro_mlx.decoding.pipeline import pipelined_step
    from ouro_mlx.decoding.speculative import speculative_step
    from ouro_mlx.decoding.steps import make_rule
except ImportError:  # before ouro_mlx.decoding (to measure the old layout)
    from ouro_mlx.generation import make_rule
    from ouro_mlx.pipeline import pipelined_step
    from ouro_mlx.speculative import speculative_step
from ouro_mlx.random_model import make_random_checkpoint

COUNT = [0]
for _name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
    _orig = getattr(mx.array, _name)
    setattr(mx.array, _name, lambda self, *a, _o=_orig, **k: (COUNT.__setitem__(0, COUNT[0] + 1),
                                                            _o(self, *a, **k))[1])
for _name in ("eval", "synchronize"):
    _orig = getattr(mx, _name)
    setattr(mx, _name, lambda *a, _o=_orig, **k: (COUNT.__setitem__(0, COUNT[0] + 1),
                                                 _o(*a, **k))[1])


class Ids:
    eos_token_ids: set = set()
    detokenizer = type("D", (), {"reset": lambda s: None, "add_token": lambda s, t: None,
                                 "finalize": lambda s: None, "last_segment": ""})()

    def decode(self, ids):
        return ""


def per_token(fn, n: int) -> float:
    COUNT[0] = 0
    fn()
    return COUNT[0] / n


def paths(model, prompt: list[int], n: int, q: float) -> dict[str, float]:
    ids = mx.array(prompt, dtype=mx.int32)
    rule = make_rule(model, exit_threshold=1.0)

    def stream(**kw):
        return lambda: list(stream_generate(model, Ids(), prompt, max_tokens=n, **kw))

    out = {"fixed depth": per_token(stream(exit_threshold=1.0), n)}
    loops = [r.loops for r in stream(exit_threshold=q)()]
    for la in ("0", "1"):
        os.environ["OURO_MLX_LOOKAHEAD"] = la
        name = f"adaptive q={q} ({sum(loops) / n:.2f} loops){' lookahead' if la == '1' else ''}"
        out[name] = per_token(stream(exit_threshold=q), n)
    os.environ.pop("OURO_MLX_LOOKAHEAD")
    out["compiled step"] = per_token(stream(exit_threshold=1.0, compile_step=True), n)
    out["speculative, forced rounds of 2"] = per_token(lambda: list(speculative_step(
        ids, model, rule, model.make_cache(), draft_loops=1, num_draft_tokens=2,
        adaptive=False, max_tokens=n)), n)
    out["pipeline, forced"] = per_token(lambda: list(pipelined_step(
        ids, model, rule, model.make_cache(), max_tokens=n, adaptive=False)), n)
    out["batch_generate (2 rows)"] = per_token(lambda: batch_generate(
        model, Ids(), [prompt, prompt[:3]], max_tokens=n, exit_threshold=1.0), n)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--q", type=float, default=None,
                    help="exit threshold of the adaptive rows (default 0.9 bundled, 0.5 random)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = make_random_checkpoint(os.path.join(tmp, "small"), "small", seed=2)
        models = {"bundled": (ouro_mlx.load(demo.model_path())[0], 0.9),
                  "random 4-layer hidden-256": (ouro_mlx.load(small)[0], 0.5)}
        rows = {name: paths(m, [4, 34, 12, 23], args.tokens, args.q or q)
                for name, (m, q) in models.items()}
    print(f"host syncs per emitted token ({args.tokens} greedy tokens)")
    for name, row in rows.items():
        print(f"\n{name}")
        for path, v in row.items():
            print(f"  {path:<45} {v:.2f}")


if __name__ == "__main__":
    main()
