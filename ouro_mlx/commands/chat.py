"""ouro-mlx chat: a multi-turn chat in the terminal.

Type a message and press Enter. Commands: /help, /reset, /loops N, /exit-threshold Q,
/stats, /exit. Ctrl-C stops the current answer; Ctrl-D (or /exit) quits.
--draft-loops, --pipeline and --compile-step decode faster at a fixed depth
(--exit-threshold 1.0 or --exit-at-step): the same greedy answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..session import ChatSession, DecodingClash, Stats, finish_note  # noqa: F401
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
    flag_names,
    flag_terms,
    loop_kwargs,
    model_or_demo,
    sampling_kwargs,
)

RESET, DIM = "\033[0m", "\033[2m"
DEPTH_COLOURS = {1: "\033[36m", 2: "\033[32m", 3: "\033[33m", 4: "\033[31m"}
DEEPER = "\033[35m"
HELP = """commands:
  /help               this text
  /reset              forget the conversation
  /loops N            loop steps per token from now on (N >= 1)
  /exit-threshold Q   Q-exit threshold in [0, 1] (1 = always the last step)
  /stats              speed, loop depth and memory of the last answer
  /exit               quit (also Ctrl-D); Ctrl-C stops an answer"""


def depth_colour(loops: int) -> str:
    return DEPTH_COLOURS.get(loops, DEEPER)


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def use_colour(stream=None) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("NO_COLOR"):
        return False
    return is_terminal(stream)


def depth_list(loops: list[int]) -> str:
    """--show-depth without colour: the loop steps of every token, in order."""
    return "loop steps per token: " + " ".join(map(str, loops))


def legend(max_loops: int) -> str:
    cells = [f"{depth_colour(n)}{n}{RESET}" for n in range(1, max_loops + 1)]
    return "colours by loop steps: " + " ".join(cells)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx chat", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--system-prompt", default=None, type=cli_text,
                   help="A system message that opens every conversation.")
    p.add_argument("--hide-thinking", action="store_true",
                   help="Hide <think>…</think> reasoning (default: shown dimmed).")
    p.add_argument("--show-depth", action="store_true",
                   help="Colour every token by the loop steps it ran (on a terminal; "
                        "piped or with NO_COLOR set, each answer is followed by the "
                        "list of its tokens' loop steps).")
    p.add_argument("--stop", action="append", default=[], type=cli_text,
                   help="End the answer where this text appears (repeatable).")
    p.add_argument("--single-turn", action="store_true",
                   help="Every message starts a new conversation (the default for the "
                        "bundled demo model and models made from it, e.g. by fuse or "
                        "quantize, which were trained on single questions).")
    add_loop_args(p)
    add_speculative_args(p)
    add_compile_step_arg(p)
    add_sampling_args(p)
    return p


def read_line(prompt: str) -> str | None:
    """One line from stdin as text; None at end of input."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    data = sys.stdin.buffer.readline()
    if not data:
        return None
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("That line is not valid UTF-8; please type it again.") from None


def whole_number(text: str) -> int | None:
    """``text`` as a whole number written in digits (no sign, no point), else None."""
    try:
        return int(text) if text.isascii() and text.isdigit() else None
    except ValueError:  # more digits than Python converts
        return None


def loops_command(session: ChatSession, arg: str) -> str:
    """/loops N, every refusal one line in the command's terms."""
    from ..limits import max_ut_steps

    try:
        cap = max_ut_steps()
    except ValueError as e:  # a bad OURO_MLX_MAX_UT_STEPS
        return f"/loops: {e}"
    if not arg:
        return f"/loops needs N, a whole number from 1 to {cap} (e.g. /loops 2)"
    n = whole_number(arg)
    if n is None or not 1 <= n <= cap:
        return (f"/loops {arg}: N must be a whole number from 1 to {cap}"
                + (" (set OURO_MLX_MAX_UT_STEPS to allow more)" if n and n > cap else ""))
    try:
        session.set_loops(n)
    except DecodingClash as e:
        return f"(loop steps unchanged: {flag_names(str(e))})"
    except ValueError as e:  # clashes with --min-loops, --max-loops, --exit-at-step
        return f"/loops {n}: {flag_names(str(e))}"
    return f"(loop steps per token: {n})"


THRESHOLD_RANGE = "a number from 0 to 1 (1 = always the last step)"


def threshold_command(session: ChatSession, arg: str) -> str:
    """/exit-threshold Q, every refusal one line in the command's terms."""
    if not arg:
        return f"/exit-threshold needs Q, {THRESHOLD_RANGE}"
    try:
        q = float(arg)
    except ValueError:
        q = None
    if q is None or not 0.0 <= q <= 1.0:  # also nan
        return f"/exit-threshold {arg}: Q must be {THRESHOLD_RANGE}"
    try:
        session.set_threshold(q)
    except DecodingClash as e:
        return f"(exit threshold unchanged: {flag_names(str(e))})"
    except ValueError as e:
        return f"/exit-threshold {arg}: {flag_names(str(e))}"
    return f"(exit threshold: {q:g})"


def command(session: ChatSession, line: str) -> str | None:
    """Run a /command; returns text to show, or None to quit."""
    name, arg = (line.split(maxsplit=1) + [""])[:2]
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return None
    if name == "/help":
        return HELP
    if name == "/reset":
        session.reset()
        return "(conversation cleared)"
    if name == "/stats":
        stats = session.stats
        if not (stats.prompt_tokens or stats.generation_tokens or stats.finish):
            return "(/stats: no answer yet; it describes the last answer)"
        return str(stats)
    if name == "/loops":
        return loops_command(session, arg)
    if name == "/exit-threshold":
        return threshold_command(session, arg)
    return f"unknown command {name}; /help lists them"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C stops an answer even when started from a shell that ignores SIGINT
    # (a background job of a non-interactive shell inherits SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sampling = sampling_kwargs(args)
    check_loop_args(args)
    decoding = decoding_kwargs(args)
    apply_compile_flag(args)

    from ..demo import plays_the_shell_game
    from ..loading import load, names_demo

    bundled = args.model is None or names_demo(args.model)
    shown = "the bundled demo model" if bundled else args.model
    args.model = model_or_demo(args)
    model, tokenizer = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path,
                            fuse=True)
    game = plays_the_shell_game(tokenizer)  # the bundled model or one made from it
    single_turn = args.single_turn or game
    apply_exit_gate(model, args)
    check_kv_args(args, model)
    with flag_terms():
        session = ChatSession(model, tokenizer, system_prompt=args.system_prompt,
                              kv_mode=args.kv_mode, kv_bits=args.kv_bits,
                              kv_group_size=args.kv_group_size, loop=loop_kwargs(args),
                              sampling=sampling, stop=args.stop, decoding=decoding)
    colour = use_colour()
    turns = ""
    if single_turn:
        why = (" (a shell-game model like the bundled demo, trained on single games)"
               if game and not bundled and not args.single_turn else "")
        turns = f" Every message is a new conversation{why}."
    print(f"ouro-mlx chat with {shown}. /help lists commands, Ctrl-D quits.{turns}")
    if args.show_depth and colour:
        print(legend(session.loop.get("ut_steps") or model.ut_steps))
    while True:
        try:
            line = read_line(">> ")
        except ValueError as e:
            print(e)
            continue
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)")
            continue
        if line is None:
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            out = command(session, line.strip())
            if out is None:
                if not is_terminal(sys.stdin):
                    print()  # no echoed Enter ended the prompt's line
                return 0
            print(out)
            continue
        if single_turn:
            session.forget()
        answer = session.send(line)
        depths: list[int] = []  # shown after the answer where there is no colour
        try:
            for event in answer:
                piece, loops, thinking = event.text, event.loops, event.thinking
                if not piece or (thinking and args.hide_thinking):
                    continue
                if args.show_depth and colour:
                    piece = f"{depth_colour(loops)}{piece}{RESET}"
                elif thinking and colour:
                    piece = f"{DIM}{piece}{RESET}"
                depths.append(loops)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            if args.show_depth and not colour:
                print(depth_list(depths))
            if session.stats.cut:
                print(f"({session.stats.finish})")
        except KeyboardInterrupt:
            answer.close()  # keeps the partial answer and repairs the cache
            print(f"{RESET if colour else ''}\n(stopped)")
        except ValueError as e:
            print(f"error: {flag_names(str(e))}")
