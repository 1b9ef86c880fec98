"""ouro-mlx bench: prompt and decode speed, peak memory, loop depth and KV memory.

Runs, in one process, Ouro at full depth, at every fixed depth, with adaptive exit and
as with --kv-mode last, next to a peer: mlx-lm's own llama with Ouro's layers unrolled to
L×T (sharing Ouro's weights). Prints a table per dtype/quantization; with --json-out it
also writes the results as JSON.

Without --model or --random it measures the bundled demo model.

  ouro-mlx bench --random ouro-1.4b --quant none,4 --gen-tokens 8
  ouro-mlx bench --model ouro-1.4b-4bit --exits q0.5,q0.9 --context 4096
  ouro-mlx bench --quality                  # 8-/4-bit error per loop step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from ..random_model import SHAPES
    from .options import HelpFormatter, add_adapter_args, seed

    p = argparse.ArgumentParser(prog="ouro-mlx bench", description=__doc__,
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="A checkpoint directory, repo id, or demo (the bundled "
                                     "demo model, the default without --random).")
    src.add_argument("--random", choices=[*SHAPES, "custom"],
                     help="A random-weight model of a named shape.")
    p.add_argument("--hidden", type=int, default=2048, help="custom shape: hidden size")
    p.add_argument("--layers", type=int, default=24, help="custom shape: physical layers")
    p.add_argument("--heads", type=int, default=16, help="custom shape: attention heads")
    p.add_argument("--kv-heads", type=int, default=16, help="custom shape: KV heads")
    p.add_argument("--intermediate", type=int, default=5632, help="custom shape: MLP width")
    p.add_argument("--vocab", type=int, default=49152, help="custom shape: vocabulary")
    p.add_argument("--dtype", default="bfloat16", help="Comma list: bfloat16,float16,float32.")
    p.add_argument("--quant", default="none", help="Comma list of none, 8, 4 (affine, group 64).")
    p.add_argument("--ut-steps", type=int, default=None,
                   help="Loop steps (default: the model's trained loop count).")
    p.add_argument("--exits", default="q0.5",
                   help="Comma list of adaptive exits to time: qQ, a Q-exit (generate's "
                        "--exit-threshold Q), or hE, a hidden-state change below E "
                        "(generate's --hidden-eps E); e.g. q0.5,q0.9,h0.05.")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="Quantize the KV cache (group 64; default: not quantized).")
    p.add_argument("--prompt-tokens", "-p", type=int, default=32, help="Prompt length.")
    p.add_argument("--gen-tokens", "--generation-tokens", "-g", type=int, default=16,
                   help="Tokens generated per run (the first one is timed as prefill).")
    p.add_argument("--context", type=int, default=0,
                   help="Pre-fill caches with this many tokens of random K/V.")
    p.add_argument("--repeats", type=int, default=3,
                   help="Alternating runs for the medians: peer / full depth / 1 loop, "
                        "and adaptive / same-depth fixed decoding per exit rule.")
    p.add_argument("--no-peer", action="store_true", help="Skip the unrolled mlx-lm peer.")
    p.add_argument("--no-fuse", action="store_true",
                   help="Run q/k/v and gate/up as separate matrix products, as they are "
                        "stored (by default they are fused for decoding, as generate, chat "
                        "and serve do).")
    p.add_argument("--no-fixed", action="store_true", help="Skip the fixed depths 1..T-1.")
    p.add_argument("--no-compile", action="store_true",
                   help="Run without MLX's graph compilation.")
    p.add_argument("--compile-step", action="store_true",
                   help="Also time full depth through the compiled loop step against plain "
                        "decoding and the peer.")
    p.add_argument("--draft-loops", default="",
                   help="Comma list of K: also rows of self-speculative decoding drafting "
                        "with the first K loop steps (greedy, full depth; single runs).")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="Most drafts per verify call, adaptive (default: 4).")
    p.add_argument("--pipeline", action="store_true",
                   help="Also rows of pipelined loop decoding, its draft "
                        "from step K-1 for each K of --draft-loops (default 1), compiled too "
                        "with --compile-step (greedy, full depth; single runs), with their "
                        "decode speed-up over full depth.")
    p.add_argument("--quality", action="store_true",
                   help="Only the quantization error: the KL divergence of the 8-bit and "
                        "4-bit model's next-token distribution from the bfloat16 one, "
                        "after each loop step, how often the exit step agrees, and the "
                        "average loops.")
    p.add_argument("--quantized", action="append", default=[], metavar="DIR",
                   help="With --quality: also a quantized copy of --model (e.g. from "
                        "ouro-mlx quantize), next to round-to-nearest at its bits and "
                        "group size; repeat for several.")
    p.add_argument("--exit-q", type=float, default=0.5,
                   help="With --quality: the exit threshold at which exit steps are "
                        "compared (default: 0.5).")
    p.add_argument("--json-out", default=None, help="Write the results here.")
    add_adapter_args(p)
    p.add_argument("--seed", type=seed, default=0, help="Seed of the random weights.")
    return p


def is_bench_result(path: Path) -> bool:
    """A file ``--json-out`` wrote before (a JSON object with bench's keys): the only
    kind of existing file it replaces."""
    try:
        if path.stat().st_size > 1 << 26:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "runs"} <= set(data)


def shape_config(args) -> dict:
    from ..random_model import hf_config

    if args.random == "custom":
        dims = dict(hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
                    vocab_size=args.vocab, max_position_embeddings=65536,
                    rope_theta=1000000.0)
        return hf_config(dims)
    return hf_config(args.random)


def check_sizes(args, config: dict, dtypes: list[str], quants: list[str]) -> None:
    """Refuse absurd sizes with the flag's name, and models that cannot fit in memory,
    before anything is allocated."""
    from ..limits import check_fits
    from ..model import ModelArgs, num_parameters
    from .options import check_loop_steps

    if args.random == "custom":
        for flag in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(args, flag)}.")
        if args.hidden % args.heads or args.heads % args.kv_heads:
            raise ValueError("--hidden must be a multiple of --heads, and --heads of "
                             f"--kv-heads; got {args.hidden}, {args.heads}, {args.kv_heads}.")
    for flag in ("context", "repeats"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}.")
    if args.ut_steps is not None:
        check_loop_steps(args.ut_steps, "--ut-steps")
    a = ModelArgs.from_dict(config)  # a --model's config was checked when read
    L, hd, kv = a.num_hidden_layers, a.head_dim, a.num_key_value_heads * a.head_dim
    if args.kv_bits and hd % 64:
        raise ValueError(f"--kv-bits is unavailable for this model: its head_dim ({hd}) is "
                         "not a multiple of 64, the KV quantization group used here.")
    params = num_parameters(a)
    T = args.ut_steps or a.total_ut_steps
    tokens = args.prompt_tokens + args.gen_tokens + args.context
    for dtype in dtypes:
        size = 4 if dtype == "float32" else 2
        copies = 2 if quants != ["none"] else 1  # a quantized copy next to the original
        weights = params * size * copies + (0 if args.model else params * 4)  # + float32 init
        cache = 2 * (L * T + L * T) * kv * tokens * size  # Ouro's and the peer's KV
        check_fits(weights + cache, f"the {dtype} model ({params:,} parameters) with "
                                    f"{tokens:,} tokens of KV cache")


def parse_exit(spec: str, T: int):
    from ..exit import ExitRule

    try:
        if spec.startswith("q"):
            return ExitRule(T, threshold=float(spec[1:]))
        if spec.startswith("h"):
            return ExitRule(T, hidden_eps=float(spec[1:]))
    except ValueError as e:
        raise ValueError(f"Bad exit spec {spec!r}: {e}") from e
    raise ValueError(f"Bad exit spec {spec!r}: use qQ (Q-exit) or hE (hidden change).")


def table(rows: list[dict], peer: dict | None) -> str:
    from .options import rate

    w = max([28, *(len(r["name"]) for r in rows)])
    head = f"{'run':<{w}} {'prompt tok/s':>12} {'decode tok/s':>12} {'vs peer':>8} " \
           f"{'bw%':>5} {'avg loops':>9} {'peak GB':>8} {'KV MiB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['decode_tps'] / peer['decode_tps']:.2f}x" if peer else "-"
        loops = f"{r['avg_loops']:.2f}" if r["avg_loops"] is not None else "-"
        kv = f"{r['kv_bytes'] / 2**20:.1f}" if r["kv_bytes"] is not None else "-"
        bw = f"{100 * r['bw_share']:.1f}" if r.get("bw_share") is not None else "-"
        lines.append(f"{r['name']:<{w}} {rate(r['prompt_tps']):>12} "
                     f"{rate(r['decode_tps']):>12} {ratio:>8} {bw:>5} {loops:>9} "
                     f"{r['peak_gb']:>8.3f} {kv:>8}")
    return "\n".join(lines)


def legend(rows: list[dict], peer: dict | None, random_weights: bool) -> str:
    """What the table's columns and row suffixes mean (only those it shows)."""
    names = " ".join(r["name"] for r in rows)
    lines = ["decode tok/s: tokens after the first; avg loops: loop steps per decoded "
             "token; peak GB: peak memory; KV MiB: the KV cache after the run"]
    if peer:
        lines.append("vs peer: decode speed over the peer (mlx-lm's llama with the "
                     "loop unrolled into a plain stack, sharing these weights)")
    if any(r.get("bw_share") is not None for r in rows):
        lines.append("bw%: share of the memory-bandwidth bound: bytes read per decoded "
                     "token (per loop step the shared layers, final norm, exit gate and "
                     "K/V; once lm_head) x decode tok/s, over the GEMV bandwidth above "
                     "(draft and pipeline rows: -)")
    if "draft" in names:
        lines.append("draft K loops: self-speculative decoding, drafting with the first "
                     "K loop steps; 'N% kept': drafts accepted; 'no drafts': drafting "
                     "would not pay, so every token was decoded plainly")
    if "pipeline" in names:
        lines.append("pipeline k=K: pipelined loop decoding; 'passes/tok': passes of "
                     "the shared layers per token (plain decoding: avg loops); 'N plain': "
                     "tokens decoded plainly where it measured itself slower; 'all "
                     "plain': the run ended before its first measurement")
    if random_weights and ("draft" in names or "pipeline" in names):
        lines.append("random weights: early loop steps rarely agree with the last, so "
                     "drafts are rarely kept; a trained checkpoint's figures differ")
    return "\n".join(textwrap.fill(line, 88, initial_indent="  ", subsequent_indent="    ")
                     for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None and args.random is None:
        from ..demo import NOTE

        print(NOTE, file=sys.stderr)
        args.model = "demo"
    import copy

    import mlx.core as mx
    import mlx.nn as nn

    from .. import bench as B
    from ..exit import ExitRule
    from .options import flag_terms

    if args.compile_step and (args.no_compile or args.kv_bits or args.no_peer
                              or args.repeats < 1 or args.quality):
        raise ValueError("--compile-step cannot be combined with --no-compile, --kv-bits, "
                         "--no-peer, --repeats 0 or --quality.")
    if args.quantized and not (args.quality and args.model):
        raise ValueError("--quantized needs --quality and --model (the float model it "
                         "was quantized from).")
    if not 0 <= args.exit_q <= 1:
        raise ValueError(f"--exit-q must be in [0, 1], got {args.exit_q}.")
    if args.json_out:  # before any work: never over a source, only over a bench result
        from ..outputs import output_file

        output_file(args.json_out, "--json-out", force=None, ours=is_bench_result,
                    kind="bench result", sources=[
                        ("--model", args.model), ("--adapter-path", args.adapter_path),
                        ("--exit-gate", args.exit_gate)])
    if args.no_compile:
        mx.disable_compile()
    try:
        draft_ks = [int(k) for k in args.draft_loops.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--draft-loops takes a comma list of integers, got "
                         f"{args.draft_loops!r}.") from None
    if args.num_draft_tokens is not None and not draft_ks:
        raise ValueError("--num-draft-tokens needs --draft-loops.")
    if args.pipeline and args.kv_bits:
        raise ValueError("--pipeline cannot be combined with --kv-bits (it needs a plain "
                         "KV cache).")
    pipeline_ks = (draft_ks or [1]) if args.pipeline else []
    dtypes = [d.strip() for d in args.dtype.split(",")]
    quants = [q.strip() for q in args.quant.split(",")]
    if bad := [q for q in quants if q not in ("none", "4", "8")]:
        raise ValueError(f"--quant takes none, 4, 8; got {', '.join(bad)}.")
    if args.prompt_tokens < 1 or args.gen_tokens < 2:
        raise ValueError("--prompt-tokens must be >= 1 and --gen-tokens >= 2.")
    if args.gen_tokens < 8 and not args.quality:
        print(f"note: decode tok/s here times {args.gen_tokens - 1} token(s) after the first; "
              "use --gen-tokens 8 or more for decode figures", file=sys.stderr)

    if (args.adapter_path or args.exit_gate) and args.random:
        raise ValueError("--adapter-path and --exit-gate need --model, not --random.")
    if args.model:
        from ..loading import model_args, read_config, resolve

        path = resolve(args.model)
        config = read_config(path)
        model_args(path, config)  # a config from a stranger: one line naming the field
    else:
        config = shape_config(args)
    results = {"config": {k: config[k] for k in ("hidden_size", "num_hidden_layers",
                                                  "intermediate_size", "vocab_size")},
               "runs": {}}
    check_sizes(args, config, dtypes, quants)
    ids = mx.array([(7919 * i + 13) % config["vocab_size"] for i in range(args.prompt_tokens)])
    bandwidth, bw = None, None
    if not args.quality:  # the bound each decode row is a share of
        bw, matrix = B.gemv_bandwidth(trials=3)
        bandwidth = {"gb_per_s": bw / 1e9, "matrix_mb": round(matrix / 1e6, 1),
                     "trials": 3}
        results["gemv_bandwidth"] = bandwidth

    for dtype in dtypes:
        if args.model:
            from ..loading import load_model
            from ..adapters import has_per_loop_adapters
            from .options import apply_exit_gate

            base = load_model(args.model, dtype=dtype, adapter_path=args.adapter_path)
            apply_exit_gate(base, args)
            if has_per_loop_adapters(base) and args.pipeline:
                raise ValueError("--pipeline does not support per-loop adapters: its rows run "
                                 "different loop steps in one pass.")
            if has_per_loop_adapters(base) and not args.no_peer:
                print("note: no unrolled peer with per-loop adapters (it has one adapter "
                      "per layer)", file=sys.stderr)
                args.no_peer = True
        else:
            print(f"building a random {args.random} model in {dtype} ...", file=sys.stderr)
            base = B.random_model(config, dtype, args.seed)
        with flag_terms():
            T = base._steps(args.ut_steps)
        quantized = {}
        for path in args.quantized if args.quality else []:
            from ..loading import load_model

            other = load_model(path, dtype=dtype)
            from ..model import SIZES

            if any(getattr(other.args, k) != getattr(base.args, k) for k in SIZES):
                raise ValueError(f"--quantized {path}: not the shape of --model "
                                 f"{args.model}.")
            if not any(isinstance(m, nn.QuantizedLinear) for m in other.modules()):
                raise ValueError(f"--quantized {path}: not a quantized model.")
            quantized[Path(path).name] = other
        if args.quality:
            kls = B.quality_table(base, config, ids[None], quantized=quantized,
                                    q=args.exit_q)
            results["runs"][dtype] = {"kl_per_step": {k: v["kl_by_step"]
                                                      for k, v in kls.items()},
                                      "quality": kls}
            for name, row in kls.items():
                print(f"{name:>6} KL per loop step vs bfloat16: "
                      + "  ".join(f"t{t + 1}: {v:.3g}" for t, v in enumerate(row["kl_by_step"]))
                      + f"; exit step agrees {100 * row['exit_agreement']:.1f}%, avg loops "
                        f"{row['avg_loops']:.2f} (bfloat16 {row['float_avg_loops']:.2f})")
            print(textwrap.fill("(KL divergence of the quantized model's next-token "
                                "distribution from the bfloat16 one after loop step t, in "
                                "nats: 0 = the same; weights in groups of 64 unless named, "
                                "exit gate and norms unquantized; exit steps compared at "
                                f"q = {args.exit_q})", 88, initial_indent="  ",
                                subsequent_indent="   "))
            continue
        for quant in quants:
            model = base if quant == "none" else B.quantize(copy.deepcopy(base), config, int(quant))
            label = f"{dtype}" + ("" if quant == "none" else f", {quant}-bit")
            rows, peer = [], None
            kw = dict(kv_bits=args.kv_bits, context=args.context)
            # the peer is stock mlx-lm: its own, separate projections (built before fusing)
            peer_model = None if args.no_peer else B.unrolled_peer(model, T)
            fused = not args.no_fuse and model.fuse_projections()
            # warm-up at the prompt's length: mx.compile traces, and CUDA compiles its
            # kernels on first use (the prompt's matrix products included)
            B.run_ouro(model, ExitRule(T, threshold=0.5), ids, 3)
            if args.compile_step:
                B.run_ouro(model, ExitRule(T), ids, 3, compile_step=True)
            medians, first = None, {}  # first: the medians' first runs, reused as rows
            if peer_model is not None:
                B.run_peer(peer_model, ids, 3)
                if args.repeats > 0:
                    medians, first = B.target_ratios(model, peer_model, ids, args.gen_tokens,
                                                     repeats=args.repeats, context=args.context,
                                                     kv_bits=args.kv_bits,
                                                     compile_step=args.compile_step)
                peer = B.as_dict(first.get("peer") or B.run_peer(
                    peer_model, ids, args.gen_tokens, context=args.context,
                    dtype=model.model.norm.weight.dtype))
                del peer_model
            full = first.get("full") or B.run_ouro(model, ExitRule(T), ids, args.gen_tokens,
                                                   name=f"ouro T={T}", **kw)
            rows.append(B.as_dict(full))
            if "compiled" in first:
                rows.append(B.as_dict(first["compiled"]))
            depths = [] if args.no_fixed else list(range(1, T))
            for k in depths:
                r = (first.get("exit1") if k == 1 else None) or B.run_ouro(
                    model, ExitRule(T, at_step=k - 1), ids, args.gen_tokens,
                    name=f"ouro {depth_name(k)}", **kw)
                rows.append(B.as_dict(r))
            for k in draft_ks:
                for compiled in (False, True) if args.compile_step else (False,):
                    r = B.run_ouro(model, ExitRule(T), ids, args.gen_tokens,
                                   name=f"ouro draft {depth_name(k)}"
                                        f"{' compiled' if compiled else ''}",
                                   draft_loops=k, num_draft_tokens=args.num_draft_tokens,
                                   compile_step=compiled, **kw)
                    rows.append(B.as_dict(r))
            pipelined = {}  # row name -> decode speed-up over the full-depth row
            for k in pipeline_ks:
                for compiled in (False, True) if args.compile_step else (False,):
                    name = f"ouro T={T} pipeline k={k}{' compiled' if compiled else ''}"
                    r = B.run_ouro(model, ExitRule(T), ids, args.gen_tokens, name=name,
                                   draft_loops=k, pipeline=True, compile_step=compiled, **kw)
                    rows.append(B.as_dict(r))
                    pipelined[name] = round(r.decode_tps / full.decode_tps, 3)
            overheads = {}
            for spec in [s.strip() for s in args.exits.split(",") if s.strip()]:
                r = B.run_ouro(model, parse_exit(spec, T), ids, args.gen_tokens,
                               name=f"ouro adaptive {spec}", **kw)
                rows.append(B.as_dict(r))
                if args.repeats > 0:
                    overheads[spec] = B.adaptive_overhead(
                        model, parse_exit(spec, T), ids, args.gen_tokens,
                        repeats=args.repeats, **kw)
            r = B.run_ouro(model, ExitRule(T), ids, args.gen_tokens, kv_mode="last",
                           name=f"ouro T={T} kv last", **kw)
            rows.append(B.as_dict(r))
            for r in ([peer] if peer else []) + rows:
                r["bw_share"] = (None if r["bytes_per_token"] is None else round(
                    r["bytes_per_token"] * r["decode_tps"] / bw, 4))
            summary = summarize(rows, peer, T)
            full_tps = full.decode_tps
            if medians:  # the median run's, like the ratios below
                full_tps = statistics.median_high(d for _, d in
                                                  medians["runs_tok_per_s"]["full"])
            summary["full-depth decode, share of the memory-bandwidth bound"] = round(
                full.bytes_per_token * full_tps / bw, 4)
            if medians:  # the targets' ratios from alternating runs, not the rows above
                for k in ("prefill vs unrolled peer", "decode vs unrolled peer",
                          "1 loop speed-up over full depth",
                          "compiled decode speed-up over full depth",
                          "compiled decode vs unrolled peer"):
                    if k in medians:
                        summary[k] = medians[k]
            for name, ratio in pipelined.items():
                summary[f"{name}: decode speed-up over full depth"] = ratio
            for spec, o in overheads.items():
                summary[f"ouro adaptive {spec}: decode time vs same depths fixed "
                        f"(avg {o['avg_loops']:.2f} loops, median of {o['repeats']})"] = o["ratio"]
            print(f"\n== {label}, prompt {args.prompt_tokens} + context {args.context} tokens, "
                  f"{args.gen_tokens} generated")
            print(f"GEMV bandwidth: {bandwidth['gb_per_s']:,.1f} GB/s (a bfloat16 matrix of "
                  f"{bandwidth['matrix_mb']:,.0f} MB times a vector, best of "
                  f"{bandwidth['trials']})")
            print(table(([peer] if peer else []) + rows, peer))
            print(legend(rows, peer, bool(args.random)))
            if medians:
                print(textwrap.fill(f"(ratios to the peer and of 1 loop to full depth: "
                                    f"medians of {args.repeats} alternating runs each; the "
                                    "rows above are single runs)", 88, initial_indent="  ",
                                    subsequent_indent="   "))
            for k, v in summary.items():
                print(f"  {k}: {v}")
            for spec, o in overheads.items():
                if o["note"]:
                    print(textwrap.fill(f"ouro adaptive {spec}: {o['note']}", 88,
                                        initial_indent="  ", subsequent_indent="    "))
            results["runs"][label] = {"peer": peer, "ouro": rows, "summary": summary,
                                      "target_ratio_runs": medians,
                                      "adaptive_overhead": overheads, "fused": fused}
            if fused:  # the next quantization starts from the stored layout
                model.unfuse_projections()
    if args.json_out:
        from ..outputs import replace_file

        # a run stopped here leaves the old file whole
        replace_file(Path(os.path.abspath(args.json_out)), lambda tmp: tmp.write_text(
            json.dumps(results, indent=2), encoding="utf-8"))
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def depth_name(k: int) -> str:
    """A row's depth: "1 loop", "2 loops"."""
    return f"{k} loop{'s' * (k != 1)}"


def summarize(rows: list[dict], peer: dict | None, T: int) -> dict:
    """Ratios the targets are stated in (all from runs in this process)."""
    by = {r["name"]: r for r in rows}
    full = by[f"ouro T={T}"]
    out = {}
    if peer:
        out["decode vs unrolled peer"] = round(full["decode_tps"] / peer["decode_tps"], 3)
        out["prefill vs unrolled peer"] = round(full["prompt_tps"] / peer["prompt_tps"], 3)
    if (one := by.get("ouro 1 loop")) is not None:
        speed_up = one["decode_tps"] / full["decode_tps"]
        out["1 loop speed-up over full depth"] = round(speed_up, 3)
    last = by.get(f"ouro T={T} kv last")
    if last and full["kv_bytes"]:
        out["kv last / full bytes"] = round(last["kv_bytes"] / full["kv_bytes"], 4)
    return out
