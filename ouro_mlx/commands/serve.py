"""ouro-mlx serve: an OpenAI-compatible HTTP server on localhost.

POST /v1/chat/completions and /v1/completions (streamed as SSE or whole), GET
/v1/models, GET /health, POST /tokenize and /detokenize, GET /tokenizer_info.
Concurrent requests are decoded together in one continuously refilled batch, each
at its own loop depth. Completions take text, token ids or lists of either, with
echo and logprobs; chat takes logprobs/top_logprobs and n.
Ouro options per request as extra body fields: ut_steps,
exit_threshold, exit_at_step, min_loops, max_loops, kv_mode, draft_loops,
num_draft_tokens, pipeline, compile_step; every chunk and response carries "ouro":
{"loops": [...], "avg_loops": ...}. --draft-loops / --pipeline / --compile-step set
defaults for the requests at a fixed depth (exit_threshold 1.0 or exit_at_step);
others decode plainly.
Needs FastAPI and uvicorn: pip install fastapi uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from .options import (
    HelpFormatter,
    add_compile_step_arg,
    add_depth_args,
    add_model_args,
    check_loop_args,
    flag_names,
    add_speculative_args,
    apply_compile_flag,
    apply_exit_gate,
    decoding_kwargs,
    flag_terms,
    model_or_demo,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx serve", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to bind; anything but loopback exposes the model to "
                        "your network.")
    p.add_argument("--port", type=int, default=8080, help="Port to listen on.")
    p.add_argument("--model-id", default=None,
                   help="The id /v1/models lists and requests name (default: --model, or "
                        "ouro-demo for the bundled model).")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="Also serve the model with the adapters in PATH, chosen per request "
                        "by the body field \"adapter\": \"NAME\" (repeatable; each is a "
                        "full copy of the model in memory).")
    add_depth_args(p.add_argument_group("loop depth (defaults for requests that do not "
                                        "set it)"))
    add_speculative_args(p)
    add_compile_step_arg(p)
    g = p.add_argument_group("limits")
    g.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="The most tokens one request may ask for.")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="The longest prompt in tokens (default: the model's positions).")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="The largest request body.")
    g.add_argument("--max-concurrency", type=int, default=16,
                   help="Answers generated at once, decoded together in one batch (a "
                        "request with n choices counts n); more wait.")
    g.add_argument("--max-n", type=int, default=8, help="The most choices (n) per request.")
    g.add_argument("--prefill-step-size", type=int, default=512,
                   help="Prompt tokens processed per step: a new long prompt delays the "
                        "answers already streaming by at most one such step.")
    g.add_argument("--split-depths", action="store_true",
                   help="Decode requests at different fixed loop depths in separate "
                        "batches, each running only its own loop steps (faster for large "
                        "models on a CPU; one shared batch is faster on a GPU).")
    g.add_argument("--max-queue", type=int, default=64,
                   help="Requests that may wait; beyond that the server answers 503.")
    g.add_argument("--prompt-cache-bytes", type=int, default=1 << 30,
                   help="Bytes of KV caches kept for reuse by later requests.")
    g.add_argument("--prompt-cache-size", type=int, default=16,
                   help="Caches kept for reuse (0 turns reuse off).")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level.")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}.")
    for name in ("max_tokens_limit", "max_body_bytes", "max_concurrency", "max_queue",
                 "max_n", "prefill_step_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    for name in ("prompt_cache_bytes", "prompt_cache_size"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0.")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError("--max-prompt-tokens must be >= 1.")


def apply_loop_defaults(model, args: argparse.Namespace) -> None:
    """--ut-steps / --exit-threshold / --exit-at-step as the model's runtime defaults,
    which every request without its own field uses."""
    from ..generation import make_rule

    for name in ("ut_steps", "exit_threshold", "exit_at_step"):
        if (value := getattr(args, name)) is not None:
            setattr(model, name, value)
    try:
        make_rule(model)
    except ValueError as e:
        raise ValueError(flag_names(str(e))) from None


def decoding_note(model, decoding: dict) -> str | None:
    """The server's decoding defaults against the model: an error if they can never
    apply, a note if the model's own exit rule leaves them to explicit requests."""
    from ..generation import make_rule

    k = decoding.get("draft_loops")
    if k is not None and k >= model.ut_steps:
        raise ValueError(f"--draft-loops must be below the model's {model.ut_steps} loop "
                         f"steps, got {k}.")
    if decoding and make_rule(model).fixed_loops is None:
        return ("note: --draft-loops/--pipeline/--compile-step apply to requests at a fixed "
                "depth (exit_threshold 1.0 or exit_at_step); this model's default exit rule "
                "is adaptive, so other requests decode plainly.")
    return None


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=PATH.")
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice.")
        adapters[name] = path
    return adapters


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    check_loop_args(args)
    decoding = decoding_kwargs(args)
    adapter_paths = parse_adapters(args.adapter)
    try:
        import uvicorn

        from ..server import DEMO_ID, Limits, create_app
    except ImportError as e:
        raise ImportError(f"ouro-mlx serve needs FastAPI and uvicorn ({e.name} is "
                          "missing): pip install fastapi uvicorn") from None
    from ..loading import load
    from ..prompt_cache import PromptCache

    apply_compile_flag(args)
    path = model_or_demo(args)
    model, tokenizer = load(path, dtype=args.dtype, adapter_path=args.adapter_path, fuse=True)
    apply_exit_gate(model, args)
    apply_loop_defaults(model, args)
    note = decoding_note(model, decoding)
    adapters = {}
    for name, adapter_path in adapter_paths.items():
        adapters[name], _ = load(path, dtype=args.dtype, adapter_path=adapter_path)
        apply_exit_gate(adapters[name], args)
        apply_loop_defaults(adapters[name], args)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                    max_active=args.max_concurrency, max_n=args.max_n,
                    prefill_step_size=args.prefill_step_size, split_depths=args.split_depths)
    with flag_terms():  # the server-wide defaults, named as the flags that set them
        app = create_app(model, tokenizer, model_id=args.model_id or args.model or DEMO_ID,
                         limits=limits, adapters=adapters, decoding=decoding,
                         prompt_cache=PromptCache(args.prompt_cache_bytes,
                                                  args.prompt_cache_size))
    if note:
        print(note, file=sys.stderr)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach it can use the "
              "model (no authentication).", file=sys.stderr)
    print(f"serving {args.model_id or args.model or DEMO_ID} on http://{args.host}:{args.port}"
          "/v1", file=sys.stderr, flush=True)
    # On Ctrl-C, open streams get a few seconds to finish, then the process ends.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
