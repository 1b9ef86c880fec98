"""ouro-mlx generate: stream a completion for one prompt."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MAX_TOKENS = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx generate", description=__doc__)
    p.add_argument("--model", required=True,
                   help="Local directory or Hugging Face repo id (HF or MLX format).")
    p.add_argument("--prompt", required=True, help="The prompt; '-' reads stdin.")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--ut-steps", type=int, default=None,
                   help="Loop steps per token (default: the config's total_ut_steps).")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="Q-exit threshold in [0, 1] (default: the config's, 1.0 = last step).")
    p.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0 = greedy).")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--no-chat-template", action="store_true",
                   help="Use the prompt as raw text instead of a ChatML user turn.")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    return p


def encode_prompt(tokenizer, prompt: str, system: str | None, chat: bool) -> list[int]:
    if not prompt:
        raise ValueError("The prompt is empty.")
    if chat and tokenizer.has_chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    if not 0.0 <= args.top_p <= 1.0 or args.temp < 0:
        raise ValueError("--temp must be >= 0 and --top-p in [0, 1].")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from ..loading import load

    model, tokenizer = load(args.model, dtype=args.dtype, ut_steps=args.ut_steps,
                            exit_threshold=args.exit_threshold)
    ids = encode_prompt(tokenizer, prompt, args.system_prompt, not args.no_chat_template)
    limit = model.args.max_position_embeddings
    if len(ids) + args.max_tokens > limit:
        raise ValueError(f"Prompt ({len(ids)} tokens) + --max-tokens exceeds the "
                         f"model's {limit} positions.")
    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p)
    response = None
    for response in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens,
                                    sampler=sampler):
        print(response.text, end="", flush=True)
    print(flush=True)
    r = response
    print(
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory:.3f} GB",
        file=sys.stderr,
    )
    return 0
