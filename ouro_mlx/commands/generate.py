"""ouro-mlx generate: stream a completion for one prompt."""

from __future__ import annotations

import argparse
import sys

from .options import (
    HelpFormatter,
    add_compile_step_arg,
    add_loop_args,
    add_model_args,
    add_sampling_args,
    add_speculative_args,
    apply_compile_flag,
    apply_exit_gate,
    check_kv_args,
    check_loop_args,
    cli_text,
    decoding_kwargs,
    flag_terms,
    loop_kwargs,
    model_or_demo,
    rate,
    sampling_kwargs,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx generate", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--prompt", "-p", required=True, type=cli_text,
                   help="The prompt; '-' reads stdin (one trailing newline dropped).")
    p.add_argument("--system-prompt", default=None, type=cli_text,
                   help="A system message before the prompt (chat template only).")
    p.add_argument("--no-chat-template", "--ignore-chat-template", action="store_true",
                   help="Use the prompt as raw text instead of a ChatML user turn.")
    p.add_argument("--raw-special-tokens", action="store_true",
                   help="Read special-token strings in the prompt (e.g. <|im_start|>) as "
                        "special tokens; by default they are plain text. Unsafe with "
                        "untrusted text.")
    p.add_argument("--show-depth", action="store_true",
                   help="Colour every token by the loop steps it ran (on a terminal; "
                        "piped or with NO_COLOR set, the list of every token's loop "
                        "steps follows on stderr).")
    add_loop_args(p)
    add_sampling_args(p)
    add_speculative_args(p)
    add_compile_step_arg(p)
    return p


def encode_prompt(tokenizer, prompt: str, system: str | None, chat: bool,
                  raw: bool = False) -> list[int]:
    """The prompt's ids; special-token strings in it are plain text unless ``raw``."""
    from ..encoding import apply_template, encode_chat, encode_text

    if not prompt:
        raise ValueError("The prompt is empty.")
    if chat and tokenizer.has_chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        if raw:
            return apply_template(tokenizer, messages, add_generation_prompt=True)
        return encode_chat(tokenizer, messages, add_generation_prompt=True)
    if raw:
        return tokenizer.encode(prompt, add_special_tokens=False)
    return encode_text(tokenizer, prompt)


def read_stdin() -> str:
    """stdin as text, less one trailing newline (as the shell's $(...) drops it)."""
    data = sys.stdin.buffer.read()
    try:
        data = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin is not valid UTF-8 (byte {e.start}).") from e
    return data[:-2] if data.endswith("\r\n") else data.removesuffix("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_kwargs(args)
    speculative = decoding_kwargs(args)
    check_loop_args(args)
    apply_compile_flag(args)
    prompt = read_stdin() if args.prompt == "-" else args.prompt

    from ..generation import make_rule, stream_generate
    from ..loading import load

    model, tokenizer = load(model_or_demo(args), dtype=args.dtype,
                            adapter_path=args.adapter_path, fuse=True)
    apply_exit_gate(model, args)
    with flag_terms():
        make_rule(model, **loop_kwargs(args))  # validate before encoding the prompt
    check_kv_args(args, model)
    ids = encode_prompt(tokenizer, prompt, args.system_prompt, not args.no_chat_template,
                        args.raw_special_tokens)
    from .chat import RESET, depth_colour, depth_list, finish_note, legend, use_colour

    # colour on a terminal without NO_COLOR; otherwise the per-token list on stderr
    colour = args.show_depth and use_colour(sys.stdout)
    r, loops = None, []
    with flag_terms():
        for r in stream_generate(model, tokenizer, ids, kv_mode=args.kv_mode,
                                 kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                                 **loop_kwargs(args), **sampling, **speculative):
            if colour:
                print(f"{depth_colour(r.loops)}{r.text}{RESET}", end="", flush=True)
            else:
                print(r.text, end="", flush=True)
            loops.append(r.loops)
    print(flush=True)
    if args.show_depth:
        T = args.ut_steps or model.ut_steps
        print(legend(T) if colour and use_colour(sys.stderr) else depth_list(loops),
              file=sys.stderr)
    print(
        f"prompt: {r.prompt_tokens} tokens, {rate(r.prompt_tps)} tok/s | "
        f"generation: {r.generation_tokens} tokens, {rate(r.generation_tps)} tok/s | "
        f"avg loops: {r.avg_loops:.2f} | peak memory: {r.peak_memory:.3f} GB | "
        f"{finish_note(r, args.max_tokens)}",
        file=sys.stderr,
    )
    return 0
