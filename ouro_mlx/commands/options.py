"""Options shared by the verbs that generate (generate, chat, bench)."""

from __future__ import annotations

import argparse
import math
import re
from contextlib import contextmanager


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and adds each flag's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # 0 and 0.0 are defaults to show; None, False (a switch), [] and SUPPRESS are not
        if (default is None or default is False or default is argparse.SUPPRESS
                or default == [] or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def number(text: str) -> float:
    """A finite float: nan or inf would pass every range check and sample garbage."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text}")
    return value


def cli_text(value: str) -> str:
    """Text from the command line; invalid UTF-8 arrives as surrogate escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 (byte {e.start})") from None
    return value


# The library names its options as Python keywords (max_tokens); on the command line
# they are flags (--max-tokens). Only names with an underscore: never English words.
_KEYWORDS = ("ut_steps", "exit_threshold", "exit_at_step", "min_loops", "max_loops",
             "hidden_eps", "kv_mode", "kv_bits", "kv_group_size", "draft_loops",
             "num_draft_tokens", "compile_step", "max_tokens", "repetition_penalty",
             "top_p", "top_k", "min_p", "system_prompt")
_KEYWORD = re.compile(r"(?<![\w.\-'\"])(" + "|".join(_KEYWORDS) + r")\b")


def flag_names(message: str) -> str:
    """A library message in the command line's terms: ``max_tokens`` -> ``--max-tokens``."""
    text = message.replace("compile_step (--compile-step)", "--compile-step")
    text = text.replace("no hidden_eps (--exit-threshold 1.0)", "no hidden_eps")
    text = re.sub(r"kv_mode '(full|last)'", r"kv_mode \1", text)
    text = re.sub(r"^pipeline\b", "--pipeline", text)
    text = _KEYWORD.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)
    return re.sub(r"(--[a-z-]+)=", r"\1 ", text)  # [--min-loops 3, 4], not min_loops=3


@contextmanager
def flag_terms():
    """Re-raise a ValueError from the library with its option names as flags."""
    try:
        yield
    except ValueError as e:
        raise ValueError(flag_names(str(e))) from None


def check_loop_steps(n: int, name: str) -> int:
    """Refuse a loop depth above the cap before anything is allocated for it."""
    from ..limits import max_ut_steps

    cap = max_ut_steps()
    if n > cap:
        raise ValueError(f"{name}: {n} loop steps per token are above the limit of {cap} "
                         "(set OURO_MLX_MAX_UT_STEPS to allow more).")
    return n


def check_kv_args(args: argparse.Namespace, model) -> None:
    """--kv-bits against the model's head size, in words a user can act on."""
    if args.kv_bits is None:
        return
    hd = model.args.head_dim
    groups = [g for g in (32, 64, 128) if hd % g == 0]
    if not groups:
        raise ValueError(f"--kv-bits is unavailable for this model: its head_dim ({hd}) is "
                         "not a multiple of 32, the smallest KV quantization group.")
    if args.kv_group_size not in groups:
        raise ValueError(f"--kv-group-size {args.kv_group_size} does not fit this model's "
                         f"head_dim ({hd}); use {' or '.join(map(str, groups))}.")


def rate(tps: float) -> str:
    """A speed as a plain number: 2,880 tok/s, 12.5 tok/s."""
    return f"{tps:,.0f}" if tps >= 100 else f"{tps:.1f}"


def check_loop_args(args: argparse.Namespace) -> None:
    """The loop flags against their bounds and the cap, before the model is loaded
    (the model's own depth is checked once it is)."""
    for name, low in (("ut_steps", 1), ("min_loops", 1), ("max_loops", 1), ("exit_at_step", 0)):
        if (n := getattr(args, name, None)) is None:
            continue
        flag = "--" + name.replace("_", "-")
        if n < low:
            raise ValueError(f"{flag} must be >= {low}, got {n}.")
        check_loop_steps(n + 1 - low, flag)  # --exit-at-step k runs k + 1 steps


def add_model_args(p: argparse.ArgumentParser, required: bool = True,
                   demo: bool = False) -> None:
    p.add_argument("--model", required=required and not demo,
                   help="Local directory or Hugging Face repo id (HF or MLX format), or "
                        "demo: the bundled demo model (a local directory named demo "
                        "wins)" + ("; default: demo." if demo else "."))
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="Compute in this dtype (default: the checkpoint's).")
    p.add_argument("--no-compile", action="store_true",
                   help="Run without MLX's graph compilation (slower; for "
                        "troubleshooting).")
    add_adapter_args(p)


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter-path", default=None,
                   help="A directory of adapters to apply unfused (adapter_config.json + "
                        "adapters.safetensors from ouro-mlx lora or mlx_lm.lora; shared "
                        "or per-loop).")
    p.add_argument("--exit-gate", default=None, metavar="PATH",
                   help="An exit gate from ouro-mlx calibrate-exit to use instead of the "
                        "model's own.")


def apply_exit_gate(model, args: argparse.Namespace) -> None:
    """--exit-gate: replace the model's exit gate with the calibrated one in PATH; the
    threshold chosen with it becomes the default unless --exit-threshold is given."""
    if getattr(args, "exit_gate", None) is None:
        return
    try:
        from ..calibrate import load_exit_gate
    except ImportError:
        raise ImportError("--exit-gate needs ouro_mlx.calibrate, which this install "
                          "lacks.") from None
    threshold = load_exit_gate(model, args.exit_gate)
    if threshold is not None and getattr(args, "exit_threshold", None) is None:
        model.exit_threshold = threshold


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


def add_depth_args(g) -> None:
    """--ut-steps, --exit-threshold, --exit-at-step on the argument group ``g``."""
    g.add_argument("--ut-steps", type=int, default=None,
                   help="Loop steps per token (default: the model's trained loop count, "
                        "4 for Ouro).")
    g.add_argument("--exit-threshold", type=number, default=None,
                   help="Q-exit threshold in [0, 1]: a token stops at the first step whose "
                        "exit cdf reaches it (1.0 = always the last step; default: the "
                        "model's own threshold).")
    g.add_argument("--exit-at-step", type=int, default=None, metavar="K",
                   help="Stop every token after loop step K (0 = one loop, 1 = two loops, "
                        "...; default: off).")


def add_loop_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loop depth and exit")
    add_depth_args(g)
    g.add_argument("--min-loops", type=int, default=1,
                   help="Never stop a token before this many loop steps.")
    g.add_argument("--max-loops", type=int, default=None,
                   help="Always stop a token after this many loop steps (default: all).")
    g.add_argument("--hidden-eps", type=number, default=None,
                   help="Also stop when ‖h_t − h_t−1‖/‖h_t−1‖ falls below this "
                        "(default: off).")
    g.add_argument("--kv-mode", choices=["full", "last"], default="full",
                   help="full: a KV cache per loop step; last: one shared cache (1/T memory).")
    g.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="Quantize the KV cache to this many bits (default: not quantized).")
    g.add_argument("--kv-group-size", type=int, default=64,
                   help="Group size of the KV cache quantization (must divide the model's "
                        "attention head size).")


FAST_DECODING = "faster fixed-depth decoding (experimental)"


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(FAST_DECODING)
    g.add_argument("--draft-loops", type=int, default=None, metavar="K",
                   help="Self-speculative decoding: draft tokens with the first K loop "
                        "steps and verify them at the full depth in one call; the same "
                        "greedy output, faster when drafts are accepted (default: off).")
    g.add_argument("--num-draft-tokens", type=int, default=None, metavar="N",
                   help="At most N drafts per verify call, adapted to the acceptance "
                        "(default: 4).")
    g.add_argument("--pipeline", action="store_true",
                   help="Pipelined loop decoding: one pass of the shared layers runs every "
                        "loop step on a different token, the next token entering on a draft "
                        "from loop step K-1 on (--draft-loops K, default 1); the same greedy "
                        "output; faster where a few rows cost as much as one (small models, "
                        "Metal), slower on a large model on the CPU.")


def speculative_kwargs(args: argparse.Namespace) -> dict:
    """draft_loops/num_draft_tokens (or pipeline) from the flags, checked against the
    others."""
    k, n = args.draft_loops, args.num_draft_tokens
    if getattr(args, "pipeline", False):
        return pipeline_kwargs(args)
    if k is None:
        if n is not None:
            raise ValueError("--num-draft-tokens needs --draft-loops.")
        return {}
    if k < 1:
        raise ValueError(f"--draft-loops must be >= 1, got {k}.")
    if n is not None and not 1 <= n <= 64:
        raise ValueError(f"--num-draft-tokens must be in [1, 64], got {n}.")
    if getattr(args, "repetition_penalty", None) is not None:
        raise ValueError("--draft-loops cannot be combined with --repetition-penalty yet.")
    if getattr(args, "kv_mode", "full") != "full":
        raise ValueError("--draft-loops needs --kv-mode full (kv-mode last keeps one K/V "
                         "per token, so drafted loop steps cannot be reused).")
    return dict(draft_loops=k, num_draft_tokens=n)


def pipeline_kwargs(args: argparse.Namespace) -> dict:
    """pipeline/draft_loops from --pipeline (and --draft-loops, default 1), checked."""
    k = 1 if args.draft_loops is None else args.draft_loops
    if args.num_draft_tokens is not None:
        raise ValueError("--num-draft-tokens cannot be combined with --pipeline (the pipeline "
                         "holds one token per loop step).")
    if k < 1:
        raise ValueError(f"--draft-loops must be >= 1, got {k}.")
    if getattr(args, "repetition_penalty", None) is not None:
        raise ValueError("--pipeline cannot be combined with --repetition-penalty yet.")
    if getattr(args, "kv_mode", "full") != "full":
        raise ValueError("--pipeline needs --kv-mode full (its rows keep a K/V per loop step).")
    if getattr(args, "kv_bits", None) is not None:
        raise ValueError("--pipeline cannot be combined with --kv-bits (it needs a plain "
                         "KV cache).")
    return dict(pipeline=True, draft_loops=k)


def add_compile_step_arg(p: argparse.ArgumentParser) -> None:
    """--compile-step, next to the drafting and pipeline flags where the parser has them."""
    g = next((g for g in p._action_groups if g.title == FAST_DECODING), p)
    g.add_argument("--compile-step", action="store_true",
                   help="Decode each token through one compiled graph: "
                        "the same tokens, faster on small models; needs a fixed depth "
                        "(--exit-threshold 1.0 or --exit-at-step), --kv-mode full, no "
                        "--kv-bits.")


def compile_step_kwargs(args: argparse.Namespace) -> dict:
    """compile_step from --compile-step, checked against the flags it cannot join."""
    if not getattr(args, "compile_step", False):
        return {}
    for flag, clash in (("--no-compile", getattr(args, "no_compile", False)),
                        ("--kv-mode last", getattr(args, "kv_mode", "full") != "full"),
                        ("--kv-bits", getattr(args, "kv_bits", None) is not None)):
        if clash:
            raise ValueError(f"--compile-step cannot be combined with {flag}.")
    return dict(compile_step=True)


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """draft_loops / num_draft_tokens / pipeline / compile_step from the flags,
    checked: for ``stream_generate``, ChatSession's ``decoding`` and the server's
    defaults."""
    return {**speculative_kwargs(args), **compile_step_kwargs(args)}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=number, default=0.0, help="Temperature (0 = greedy).")
    g.add_argument("--top-p", type=number, default=1.0,
                   help="Sample from the smallest set of tokens whose probability reaches "
                        "this (1 = off).")
    g.add_argument("--top-k", type=int, default=0,
                   help="Sample from the k most likely tokens (0 = off).")
    g.add_argument("--min-p", type=number, default=0.0,
                   help="Drop tokens less likely than this times the top one (0 = off).")
    g.add_argument("--repetition-penalty", type=number, default=None,
                   help="Divide the logits of tokens already seen by this (> 1 discourages "
                        "repeats; default: off).")
    g.add_argument("--seed", type=seed, default=None,
                   help="Random seed, for reproducible sampling (default: random).")
    g.add_argument("--max-tokens", "-m", type=int, default=512,
                   help="Generate at most this many tokens.")


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

    for name, value, ok, rule in [("--temp", args.temp, args.temp >= 0, ">= 0"),
                                  ("--top-p", args.top_p, 0 <= args.top_p <= 1, "in [0, 1]"),
                                  ("--min-p", args.min_p, 0 <= args.min_p <= 1, "in [0, 1]"),
                                  ("--top-k", args.top_k, args.top_k >= 0, ">= 0")]:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value}.")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}.")
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


def depth_list(text: str) -> tuple[int, ...]:
    """``1,2,3,4`` or ``1-8`` (or both, ``1-4,8``): loop depths, ascending, each once."""
    depths: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected depths such as 1,2,3,4 or 1-8, got {text!r}") from None
        if not 1 <= a <= b:
            raise argparse.ArgumentTypeError(f"depths are >= 1 and ranges ascend: {text!r}")
        depths.update(range(a, b + 1))
    return tuple(sorted(depths))


def threshold(text: str) -> float:
    """An exit threshold in [0, 1]."""
    q = number(text)
    if not 0 <= q <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return q


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The depths ``eval`` and ``perplexity`` score: --ut-steps and --exit-threshold."""
    p.add_argument("--ut-steps", type=depth_list, default=None, metavar="DEPTHS",
                   help="Loop depths to score, e.g. 1,2,3,4 or 1-8 (beyond the trained "
                        "depth too); all come from one pass at the deepest (default: 1 "
                        "to the model's trained loop count).")
    p.add_argument("--exit-threshold", type=threshold, nargs="*", default=None,
                   metavar="Q", help="Adaptive exits to score too: each token stops at "
                   "the first step whose exit cdf reaches Q, within the model's "
                   "trained loop count (default: the model's own threshold, when it has one; "
                   "the flag alone: none).")


def scoring_depths(args: argparse.Namespace, model, mixture: bool = False):
    """The ``Depths`` that --ut-steps and --exit-threshold name, for ``model``."""
    from ..scoring import Depths

    steps = args.ut_steps or tuple(range(1, model.ut_steps + 1))
    if args.exit_threshold is None:
        q = model.exit_threshold
        thresholds = (q,) if q is not None and q < 1 else ()
    else:
        thresholds = tuple(dict.fromkeys(args.exit_threshold))
    try:
        return Depths(steps, thresholds, mixture)
    except ValueError as e:
        raise ValueError(f"--ut-steps: {e}") from None
