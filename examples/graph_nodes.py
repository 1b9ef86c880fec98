"""Graph nodes (primitive ops) in one decode token's graph, per layer application.

    python examples/graph_nodes.py                 # kernel view: fast ops count as one
    python examples/graph_nodes.py --cpu-graph     # the CPU backend's own graph
    python examples/graph_nodes.py --by-op         # which ops a layer application runs

A decoded token of a looped model applies every layer at every loop step: 24 layers
x 4 steps = 96 layer applications for Ouro-1.4B, so what one application launches is
what a token costs where kernels are small (decode on a GPU). This builds one
token's graph (random weights of the ``small`` shape; the count does not depend on
the widths), writes it with ``mx.export_to_dot`` and counts its nodes, for the plain
decode path at a fixed depth (``generation.decode``) and the compiled one
(``compiled.CompiledDecoder``: the graph ``mx.compile`` replays, elementwise ops
already fused), bfloat16 and 4-bit, with separate and fused projections
(``Model.fuse_projections``: q/k/v and gate/up as one matmul each).

- **Kernel view** (the default): on Metal/CUDA ``mx.fast.rms_norm``, ``rope`` and
  ``scaled_dot_product_attention`` are one kernel each, but the CPU backend builds
  them from a dozen ops; here they are replaced by a one-node stand-in before any
  graph is traced. "kernels" then counts the nodes that launch work: all but views
  (reshape, transpose, slice, split, broadcast, ...), which a GPU backend resolves
  without a kernel (it copies where a kernel needs a contiguous input it lacks: not
  counted here).
- ``--cpu-graph``: the graph as this machine's backend builds it.

Per layer application = (nodes at ``--layers`` - nodes at 1 layer) / ((layers - 1)
x loop steps); "outside" = what a token costs besides its layer applications (embed,
the final norm of every step, lm_head, the compiled path's mask).
"""

import argparse
import collections
import contextlib
import io
import re
import sys
import tempfile

import mlx.core as mx

VIEWS = {"Broadcast", "Reshape", "Transpose", "Slice", "Split", "ExpandDims", "Squeeze",
         "Flatten", "Unflatten", "Depends", "StopGradient", "AsStrided"}


def use_kernel_view() -> None:
    """One node per fast op, as a GPU backend launches it (the stand-ins' values are
    meaningless: nothing here is evaluated)."""
    def sdpa(q, k, v, scale, mask=None, **kw):
        deps = [k, v] + ([mask] if isinstance(mask, mx.array) else [])
        return mx.depends([mx.cumprod(q, axis=-1)], deps)[0]

    mx.fast.rms_norm = lambda x, w, eps: mx.cumsum(x, axis=-1)
    mx.fast.rope = lambda x, dims, **kw: mx.cummax(x, axis=-1)
    mx.fast.scaled_dot_product_attention = sdpa


STAND_INS = {"CumSum": "rms_norm", "CumMax": "rope", "CumProd": "sdpa"}


def count(outputs: list) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = re.findall(r'label ="([^"]+)"', open(f.name).read())
    return collections.Counter(STAND_INS.get(n, n) for n in labels)


def token_graph(layers: int, ut_steps: int, quant: str, path: str,
                fused: bool) -> collections.Counter:
    """The nodes of one decoded token's graph (after a 3-token prompt)."""
    from ouro_mlx.bench import quantize, random_model
    from ouro_mlx.decoding.compiled import CompiledDecoder
    from ouro_mlx.decoding.steps import decode, make_rule, prefill
    from ouro_mlx.random_model import SHAPES, hf_config

    config = hf_config(dict(SHAPES["small"], num_hidden_layers=layers),
                       total_ut_steps=ut_steps)
    model = random_model(config, "bfloat16")
    if quant != "bf16":
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's "[INFO] Quantized"
            model = quantize(model, config, int(quant.removeprefix("q")))
    if fused:
        model.fuse_projections()
    rule = make_rule(model, exit_threshold=1.0)
    cache = model.make_cache()
    logits, _ = prefill(model, mx.array([[1, 2, 3]]), cache, rule)
    mx.eval(logits, [c.state for c in cache])
    y = mx.array([[5]])
    if path == "compiled":
        decoder = CompiledDecoder(model, cache, ut_steps)
        logits = decoder(y)
        kv = [a for row in decoder.buffers for pair in row for a in pair]
    else:
        logits, _ = decode(model, y, cache, rule)
        kv = [a for lc in cache for c in lc.caches for a in (c.keys, c.values)]
    return count([logits, *kv])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24, help="layers of the per-token count")
    p.add_argument("--ut-steps", type=int, default=4)
    p.add_argument("--quant", default="bf16,q4", help="comma list of bf16, q4, q8")
    p.add_argument("--paths", default="plain,compiled", help="comma list: plain, compiled")
    p.add_argument("--projections", default="separate,fused", help="comma list: separate, fused")
    p.add_argument("--cpu-graph", action="store_true", help="count the CPU backend's graph")
    p.add_argument("--by-op", action="store_true", help="ops per layer application")
    args = p.parse_args()
    if args.layers < 2:
        sys.exit("--layers must be at least 2.")
    if not args.cpu_graph:
        use_kernel_view()
    T, L = args.ut_steps, args.layers
    view = "CPU backend graph" if args.cpu_graph else "kernel view (fast ops = 1 node)"
    print(f"{view}; per token at {L} layers x {T} loop steps = {L * T} layer applications")
    print("| path | weights | projections | nodes / layer app. | kernels / layer app. | "
          "nodes / token | kernels / token | kernels outside the layers |")
    print("|---|---|---|---|---|---|---|---|")
    ops = {}
    for path in args.paths.split(","):
        for quant in args.quant.split(","):
            for proj in args.projections.split(","):
                fused = proj == "fused"
                one = token_graph(1, T, quant, path, fused)
                full = token_graph(L, T, quant, path, fused)
                per = {k: (full[k] - one[k]) / ((L - 1) * T) for k in full | one}
                kernels = sum(v for k, v in per.items() if k not in VIEWS)
                total_k = sum(v for k, v in full.items() if k not in VIEWS)
                print(f"| {path} | {quant} | {proj} | {sum(per.values()):g} | {kernels:g} | "
                      f"{sum(full.values())} | {total_k} | {total_k - L * T * kernels:g} |")
                ops[path, quant, proj] = per
    if args.by_op:
        for key, per in ops.items():
            listed = ", ".join(f"{k} {v:g}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])
                               if v)
            print(f"\n{', '.join(key)}, per layer application: {listed}")


if __name__ == "__main__":
    main()
