"""Options shared by the verbs that generate (generate, chat, bench)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, required: bool = True,
                   demo: bool = False) -> None:
    p.add_argument("--model", required=required and not demo,
                   help="Local directory or Hugging Face repo id (HF or MLX format)"
                        + ("; default: the bundled demo model." if demo else "."))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--no-compile", action="store_true",
                   help="Disable mx.compile (for debugging).")


def model_or_demo(args: argparse.Namespace) -> str:
    """``--model``, or the bundled demo model with a one-line note on stderr."""
    if args.model:
        return args.model
    import sys

    from ..demo import NOTE, model_path

    print(NOTE, file=sys.stderr)
    return str(model_path())


def apply_compile_flag(args: argparse.Namespace) -> None:
    if getattr(args, "no_compile", False):
        import mlx.core as mx

        mx.disable_compile()


def add_loop_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loop depth and exit")
    g.add_argument("--ut-steps", type=int, default=None,
                   help="Loop steps per token (default: the config's total_ut_steps).")
    g.add_argument("--exit-threshold", type=float, default=None,
                   help="Q-exit threshold in [0, 1]: a token stops at the first step whose "
                        "exit cdf reaches it (1.0 = always the last step).")
    g.add_argument("--exit-at-step", type=int, default=None,
                   help="Run exactly this many + 1 loops per token (0-based step).")
    g.add_argument("--min-loops", type=int, default=1)
    g.add_argument("--max-loops", type=int, default=None)
    g.add_argument("--hidden-eps", type=float, default=None,
                   help="Also stop when ‖h_t − h_t−1‖/‖h_t−1‖ falls below this.")
    g.add_argument("--kv-mode", choices=["full", "last"], default="full",
                   help="full: a KV cache per loop step; last: one shared cache (1/T memory).")
    g.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="Quantize the KV cache.")
    g.add_argument("--kv-group-size", type=int, default=64)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=float, default=0.0, help="Temperature (0 = greedy).")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-tokens", type=int, default=512)


def loop_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        ut_steps=args.ut_steps,
        exit_threshold=args.exit_threshold,
        exit_at_step=args.exit_at_step,
        min_loops=args.min_loops,
        max_loops=args.max_loops,
        hidden_eps=args.hidden_eps,
    )


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """sampler and logits_processors built with mlx-lm's own helpers."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if args.temp < 0 or not 0 <= args.top_p <= 1 or not 0 <= args.min_p <= 1 or args.top_k < 0:
        raise ValueError("--temp must be >= 0, --top-p and --min-p in [0, 1], --top-k >= 0.")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ValueError("--repetition-penalty must be > 0.")
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)
    return dict(
        sampler=make_sampler(temp=args.temp, top_p=args.top_p, min_p=args.min_p,
                             top_k=args.top_k),
        logits_processors=make_logits_processors(
            repetition_penalty=args.repetition_penalty) or None,
        max_tokens=args.max_tokens,
    )
