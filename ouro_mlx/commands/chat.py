"""ouro-mlx chat: a multi-turn chat in the terminal.

Type a message and press Enter. Commands: /help, /reset, /loops N, /exit-threshold Q,
/stats, /exit. Ctrl-C stops the current answer; Ctrl-D (or /exit) quits.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

from .options import (
    HelpFormatter,
    add_loop_args,
    add_model_args,
    add_sampling_args,
    apply_compile_flag,
    apply_exit_gate,
    check_kv_args,
    check_loop_args,
    check_loop_steps,
    cli_text,
    loop_kwargs,
    model_or_demo,
    rate,
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


def legend(max_loops: int) -> str:
    cells = [f"{depth_colour(n)}{n}{RESET}" for n in range(1, max_loops + 1)]
    return "colours by loop steps: " + " ".join(cells)


def finish_note(r, max_tokens: int) -> str:
    """Why generation ended, from the last response: eos, --max-tokens or the
    model's positions (then fewer tokens than asked for came out)."""
    if r.finish_reason == "stop":
        return "finished: end of answer"
    if r.context_full:
        return (f"finished: context limit (the model's positions ran out after "
                f"{r.generation_tokens} of {max_tokens} tokens)")
    return f"finished: --max-tokens {max_tokens} reached"


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    loops: Counter = field(default_factory=Counter)
    kv_bytes: int = 0
    finish: str = ""  # why the answer ended (finish_note), "" while streaming
    cut: bool = False  # ended by --max-tokens or the model's positions, not by itself

    def __str__(self) -> str:
        total = sum(self.loops.values())
        avg = sum(k * v for k, v in self.loops.items()) / total if total else 0.0
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.loops.items()))
        return (f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tps)} tok/s | "
                f"generation: {self.generation_tokens} tokens, "
                f"{rate(self.generation_tps)} tok/s\n"
                f"avg loops: {avg:.2f} ({hist}) | KV cache: {self.kv_bytes / 2**20:.1f} MiB | "
                f"peak memory: {self.peak_memory:.3f} GB"
                + (f"\n{self.finish}" if self.finish else ""))


class ChatSession:
    """History, prompt cache and settings of one conversation. ``reply`` streams
    (text, loops, thinking) pieces; only the tokens after the cached prefix of the
    conversation are processed, so earlier turns are never recomputed."""

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 kv_mode: str = "full", kv_bits: int | None = None, kv_group_size: int = 64,
                 loop: dict | None = None, sampling: dict | None = None,
                 stop: list[str] | None = None):
        from ..generation import make_rule

        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.kv = dict(kv_mode=kv_mode, kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.loop = dict(loop or {})
        self.sampling = dict(sampling or {})
        self.stop = [s for s in (stop or []) if s]
        make_rule(model, **self.loop)  # validate now, not at the first message
        vocab = tokenizer.get_vocab()
        self.think_ids = (vocab.get("<think>"), vocab.get("</think>"))
        self.stats = Stats()
        self.reset()

    def reset(self) -> None:
        self.forget()
        self.cache = self.model.make_cache(self.loop.get("ut_steps"), **self.kv)
        self.cached: list[int] = []

    def forget(self) -> None:
        """Start a new conversation; the cache keeps what the next one shares with it
        (the system turn, the template's first tokens)."""
        system = self.system_prompt
        self.messages = [{"role": "system", "content": system}] if system else []

    def set_loops(self, n: int) -> None:
        from ..generation import make_rule

        check_loop_steps(n, "/loops")
        make_rule(self.model, **{**self.loop, "ut_steps": n})
        self.loop["ut_steps"] = n
        depth = len(self.cache[0].caches)
        if depth > 1 and depth < n:  # a per-step cache too shallow: rebuild it lazily
            self.cache = self.model.make_cache(n, **self.kv)
            self.cached = []

    def set_threshold(self, q: float) -> None:
        from ..exit import check_threshold

        self.loop["exit_threshold"] = check_threshold(q)

    def _sync_cache(self, ids: list[int]) -> list[int]:
        """Trim the cache to its common prefix with ``ids``; return the rest."""
        from mlx_lm.models.cache import trim_prompt_cache
        from mlx_lm.utils import common_prefix_len

        n = min(common_prefix_len(self.cached, ids), len(ids) - 1)  # feed >= 1 token
        if len(self.cached) > n:
            trim_prompt_cache(self.cache, len(self.cached) - n)
            self.cached = self.cached[:n]
        return ids[n:]

    def _repair_cache(self, tokens: list[int]) -> None:
        """After an interrupt: bring every cache to the shortest one's length."""
        offsets = [c.offset for lc in self.cache for c in lc.caches]
        low = min(offsets)
        for lc in self.cache:
            for c in lc.caches:
                c.trim(c.offset - low)
        self.cached = tokens[:low]

    def reply(self, user: str):
        from ..encoding import encode_chat
        from ..generation import stream_generate

        self.messages.append({"role": "user", "content": user})
        ids = encode_chat(self.tokenizer, self.messages, add_generation_prompt=True)
        new = self._sync_cache(ids)
        out_tokens: list[int] = []
        text, stopped, thinking = "", False, False
        self.stats = Stats()
        try:
            stream = stream_generate(self.model, self.tokenizer, new, prompt_cache=self.cache,
                                     **self.loop, **self.sampling)
            for r in stream:
                out_tokens.append(r.token)
                s = self.stats
                s.loops[r.loops] += 1
                s.prompt_tokens, s.prompt_tps = r.prompt_tokens, r.prompt_tps
                s.generation_tokens, s.generation_tps = r.generation_tokens, r.generation_tps
                s.peak_memory = r.peak_memory
                if r.finish_reason:
                    s.finish = finish_note(r, self.sampling.get("max_tokens", 256))
                    s.cut = r.finish_reason == "length"
                if r.token in self.think_ids:
                    thinking = r.token == self.think_ids[0]
                    continue
                start = len(text)
                text += r.text
                hits = [text.find(x) for x in self.stop if x in text]
                if hits:  # a stop string: show what precedes it, then end the answer
                    text, stopped = text[: min(hits)], True
                    s.finish = "finished: stop string"
                    yield text[start:], r.loops, thinking
                    break
                yield r.text, r.loops, thinking
        except ValueError:
            self.messages.pop()
            raise
        finally:
            if self.messages[-1:] and self.messages[-1]["role"] == "user":
                eos = self.tokenizer.eos_token_ids
                reply = text if stopped else self.tokenizer.decode(
                    [t for t in out_tokens if t not in eos])
                self.messages.append({"role": "assistant", "content": reply})
            self._repair_cache(ids + out_tokens)
            self.stats.kv_bytes = sum(lc.nbytes for lc in self.cache)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx chat", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--system-prompt", default=None, type=cli_text,
                   help="A system message that opens every conversation.")
    p.add_argument("--hide-thinking", action="store_true",
                   help="Hide <think>…</think> reasoning (default: shown dimmed).")
    p.add_argument("--show-depth", action="store_true",
                   help="Colour every token by the loop steps it ran.")
    p.add_argument("--stop", action="append", default=[], type=cli_text,
                   help="End the answer where this text appears (repeatable).")
    p.add_argument("--single-turn", action="store_true",
                   help="Every message starts a new conversation (the default for the "
                        "bundled demo model, which was trained on single questions).")
    add_loop_args(p)
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


def command(session: ChatSession, line: str) -> str | None:
    """Run a /command; returns text to show, or None to quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return None
    if name == "/help":
        return HELP
    if name == "/reset":
        session.reset()
        return "(conversation cleared)"
    if name == "/stats":
        return str(session.stats)
    if name == "/loops":
        try:
            session.set_loops(int(arg))
        except ValueError as e:
            return f"usage: /loops N with N >= 1 ({e})"
        return f"(loop steps per token: {arg})"
    if name == "/exit-threshold":
        try:
            session.set_threshold(float(arg))
        except ValueError as e:
            return f"usage: /exit-threshold Q with Q in [0, 1] ({e})"
        return f"(exit threshold: {arg})"
    return f"unknown command {name}; /help lists them"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C stops an answer even when started from a shell that ignores SIGINT
    # (a background job of a non-interactive shell inherits SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sampling = sampling_kwargs(args)
    check_loop_args(args)
    apply_compile_flag(args)

    from ..loading import load

    single_turn = args.single_turn or args.model is None
    args.model = model_or_demo(args)
    model, tokenizer = load(args.model, dtype=args.dtype, adapter_path=args.adapter_path)
    apply_exit_gate(model, args)
    check_kv_args(args, model)
    session = ChatSession(model, tokenizer, system_prompt=args.system_prompt,
                          kv_mode=args.kv_mode, kv_bits=args.kv_bits,
                          kv_group_size=args.kv_group_size, loop=loop_kwargs(args),
                          sampling=sampling, stop=args.stop)
    colour = sys.stdout.isatty()
    print(f"ouro-mlx chat with {args.model}. /help lists commands, Ctrl-D quits."
          + (" Every message is a new conversation." if single_turn else ""))
    if args.show_depth:
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
                return 0
            print(out)
            continue
        if single_turn:
            session.forget()
        answer = session.reply(line)
        try:
            for piece, loops, thinking in answer:
                if thinking and args.hide_thinking:
                    continue
                if args.show_depth:
                    piece = f"{depth_colour(loops)}{piece}{RESET}"
                elif thinking and colour:
                    piece = f"{DIM}{piece}{RESET}"
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            if session.stats.cut:
                print(f"({session.stats.finish})")
        except KeyboardInterrupt:
            answer.close()  # keeps the partial answer and repairs the cache
            print(f"{RESET}\n(stopped)")
        except ValueError as e:
            print(f"error: {e}")
