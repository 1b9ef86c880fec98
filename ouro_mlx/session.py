"""An embeddable chat session: one conversation with an Ouro model.

``ChatSession`` holds the model, the tokenizer, the history (``messages``) and a
prompt cache, so a new turn processes only its new tokens. ``send`` streams
``TokenEvent``s (text, token id, loop steps, thinking flag) through an iterator and,
optionally, a callback::

    from ouro_mlx import ChatSession

    session = ChatSession.load()          # the bundled demo model; or a path / HF repo id
    for event in session.send("2,23,14,31"):
        print(event.text, end="", flush=True)
    print(session.stats)

Threads: a session is driven by one thread at a time (e.g. a GUI's worker thread).
``cancel()`` may be called from any thread; it stops the running ``send`` at the next
token. A second ``send`` (or ``reset``/``set_loops``) while one is running raises
``RuntimeError`` instead of corrupting the cache. Use one session per conversation;
sessions may share a model, but run them from one thread at a time (MLX evaluates on
one device stream). A program that quits right after its worker thread ends is
covered: at exit the session waits (at most 2 s) for ended worker threads to finish
tearing down MLX's per-thread state, which MLX 0.32 otherwise turns into an abort.
A foreign worker (a QThread) should be stopped before the program quits, else the
exit waits the 2 s out.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

FINISH_REASONS = ("stop", "length", "stop_string", "cancelled")


@dataclass
class TokenEvent:
    """One generated token. ``text`` is what it adds to the answer ("" for the eos
    token and for the ``<think>``/``</think>`` markers); ``loops`` the loop steps it ran;
    ``thinking`` whether it belongs to the reasoning (markers included).
    ``finish_reason`` is None while streaming; the last event says why it ended:
    "stop" (eos), "length" (max_tokens or the model's positions), "stop_string" or
    "cancelled"."""

    text: str
    token: int
    loops: int
    thinking: bool
    finish_reason: str | None = None


def rate(tps: float) -> str:
    """A speed as a plain number: 2,880 tok/s, 12.5 tok/s."""
    return f"{tps:,.0f}" if tps >= 100 else f"{tps:.1f}"


@dataclass
class Stats:
    """Speed, loop depth and memory of the last answer."""

    prompt_tokens: int = 0  # tokens processed for this turn (the uncached part)
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    loops: Counter = field(default_factory=Counter)  # loop steps -> tokens
    kv_bytes: int = 0
    finish: str = ""  # why the answer ended, in words; "" while streaming
    finish_reason: str | None = None  # as in TokenEvent
    cut: bool = False  # ended by max_tokens or the model's positions, not by itself

    @property
    def avg_loops(self) -> float:
        total = sum(self.loops.values())
        return sum(k * v for k, v in self.loops.items()) / total if total else 0.0

    def __str__(self) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.loops.items()))
        return (f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tps)} tok/s | "
                f"generation: {self.generation_tokens} tokens, "
                f"{rate(self.generation_tps)} tok/s\n"
                f"avg loops: {self.avg_loops:.2f} ({hist}) | "
                f"KV cache: {self.kv_bytes / 2**20:.1f} MiB | "
                f"peak memory: {self.peak_memory:.3f} GB"
                + (f"\n{self.finish}" if self.finish else ""))


def finish_note(r, max_tokens: int) -> str:
    """Why generation ended, from the last response: eos, max_tokens or the model's
    positions (then fewer tokens than asked for came out)."""
    if r.finish_reason == "stop":
        return "finished: end of answer"
    if r.context_full:
        return (f"finished: context limit (the model's positions ran out after "
                f"{r.generation_tokens} of {max_tokens} tokens)")
    return f"finished: --max-tokens {max_tokens} reached"


class SessionBusy(RuntimeError):
    """A send() is already running on this session."""


class DecodingClash(ValueError):
    """The ``decoding`` options (draft_loops, pipeline, compile_step) cannot run with
    these loop or KV settings; raised when the session is built or a setting changes."""


class ChatSession:
    """History, prompt cache and settings of one conversation.

    ``loop``: ut_steps / exit_threshold / exit_at_step / min_loops / max_loops /
    hidden_eps (as ``stream_generate``); ``sampling``: sampler / logits_processors /
    max_tokens; ``decoding``: draft_loops / num_draft_tokens (self-speculative
    decoding) / pipeline (pipelined loop decoding, its draft from step draft_loops - 1,
    default 1) / compile_step (a compiled decode step), which need a fixed depth
    (exit_threshold 1.0 or exit_at_step) and kv_mode "full": the same greedy answer,
    faster. ``stop``: strings that end the answer. ``messages`` (a list of
    ``{"role", "content"}``) may be assigned to restore a conversation: the next
    ``send`` reuses whatever prefix of it the cache already holds. An answer that
    thought (``<think>…</think>``) is kept as ``{"role": "assistant", "content":
    answer, "reasoning": thinking text}``; later prompts show only its answer."""

    def __init__(self, model, tokenizer, *, system_prompt: str | None = None,
                 kv_mode: str = "full", kv_bits: int | None = None, kv_group_size: int = 64,
                 loop: dict | None = None, sampling: dict | None = None,
                 stop: str | list[str] | None = None, decoding: dict | None = None):
        from .generation import make_rule

        check_options(kv_group_size=kv_group_size, loop=loop, sampling=sampling,
                      decoding=decoding)
        if kv_mode not in ("full", "last"):
            raise ValueError(f"kv_mode must be 'full' or 'last', got {kv_mode!r}.")
        check_kv_quantization(model, kv_bits, kv_group_size)
        unknown = set(loop or {}) - set(LOOP_KEYS)
        if unknown:
            raise ValueError(f"loop: unknown option {sorted(unknown)[0]!r} (known: "
                             f"{', '.join(LOOP_KEYS)}).")
        unknown = set(sampling or {}) - set(SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"sampling: unknown option {sorted(unknown)[0]!r} (known: "
                             f"{', '.join(SAMPLING_KEYS)}).")
        unknown = set(decoding or {}) - set(DECODING_KEYS)
        if unknown:
            raise ValueError(f"decoding: unknown option {sorted(unknown)[0]!r} (known: "
                             f"{', '.join(DECODING_KEYS)}).")
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.kv = dict(kv_mode=kv_mode, kv_bits=kv_bits, kv_group_size=kv_group_size)
        self.loop = {k: v for k, v in (loop or {}).items() if v is not None}
        self.sampling = dict(sampling or {})
        if (n := self.sampling.get("max_tokens", 256)) < 1:
            raise ValueError(f"sampling: max_tokens must be >= 1, got {n}.")
        self.stop = [s for s in stop_strings(stop) if s]
        self.decoding = {k: v for k, v in (decoding or {}).items() if v is not None}
        for name in ("compile_step", "pipeline"):
            if self.decoding.get(name, False) not in (True, False):
                raise ValueError(f"decoding: {name} must be True or False, got "
                                 f"{self.decoding[name]!r}.")
        if self.decoding.get("pipeline") and "num_draft_tokens" in self.decoding:
            raise ValueError("decoding: num_draft_tokens does not apply to pipeline (the "
                             "pipeline holds one token per loop step).")
        if "num_draft_tokens" in self.decoding and "draft_loops" not in self.decoding:
            raise ValueError("decoding: num_draft_tokens needs draft_loops.")
        if "ut_steps" in self.loop:
            from .commands.options import check_loop_steps

            check_loop_steps(self.loop["ut_steps"], "ut_steps")
        make_rule(model, **self.loop)  # validate now, not at the first message
        vocab = tokenizer.get_vocab()
        self.think_ids = (vocab.get("<think>"), vocab.get("</think>"))
        self.stats = Stats()
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._reset()
        self._check_decoding(self.loop, self.cache)

    @classmethod
    def load(cls, path_or_repo: str | Path | None = None, *,
             adapter_path: str | Path | None = None, exit_gate: str | Path | None = None,
             dtype: str | None = None, **kwargs) -> ChatSession:
        """Load a model (a local directory or Hugging Face repo id; None: the bundled
        demo model) with optional adapters and a calibrated exit gate, and open a
        session on it. ``kwargs`` go to ``ChatSession``. The gate's threshold becomes
        the model's default unless ``loop`` sets ``exit_threshold``."""
        from .loading import load

        if path_or_repo is None:
            from .demo import model_path

            path_or_repo = model_path()
        model, tokenizer = load(path_or_repo, dtype=dtype, adapter_path=adapter_path,
                                fuse=True)
        if exit_gate is not None:
            from .calibrate import load_exit_gate

            threshold = load_exit_gate(model, exit_gate)
            if threshold is not None and (kwargs.get("loop") or {}).get(
                    "exit_threshold") is None:
                model.exit_threshold = threshold
        return cls(model, tokenizer, **kwargs)

    # -- settings -------------------------------------------------------------------

    @property
    def system_prompt(self) -> str | None:
        return self._system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"system_prompt must be a str or None, got {value!r}.")
        self._system_prompt = value

    @property
    def messages(self) -> list[dict]:
        """The conversation: ``{"role", "content"}`` dicts (an answer that thought also
        has ``"reasoning"``). Assign a list of them to restore one."""
        return self._messages

    @messages.setter
    def messages(self, value: list[dict]) -> None:
        self._messages = check_messages(value)

    def _reset(self) -> None:
        self.forget()
        self.cache = self.model.make_cache(self.loop.get("ut_steps"), **self.kv)
        self.cached: list[int] = []

    def reset(self) -> None:
        """Forget the conversation and the prompt cache."""
        with self._idle("reset"):
            self._reset()

    def forget(self) -> None:
        """Start a new conversation; the cache keeps what the next one shares with it
        (the system turn, the template's first tokens)."""
        system = self.system_prompt
        self.messages = [{"role": "system", "content": system}] if system else []

    def set_loops(self, n: int) -> None:
        """Loop steps per token from the next answer on (n >= 1); ``DecodingClash``
        if ``decoding`` cannot run at that depth."""
        from .commands.options import check_loop_steps
        from .generation import make_rule

        check_int(n, "set_loops: n", low=1)
        with self._idle("set_loops"):
            check_loop_steps(n, "/loops")
            make_rule(self.model, **{**self.loop, "ut_steps": n})
            self._check_decoding({**self.loop, "ut_steps": n})
            self.loop["ut_steps"] = n
            depth = len(self.cache[0].caches)
            if depth > 1 and depth < n:  # a per-step cache too shallow: rebuild it
                self.cache = self.model.make_cache(n, **self.kv)
                self.cached = []

    def set_threshold(self, q: float) -> None:
        """The Q-exit threshold in [0, 1] from the next answer on (1 = every step);
        ``DecodingClash`` if ``decoding`` cannot run with it (an adaptive exit)."""
        from .exit import check_threshold

        check_number(q, "set_threshold: q")
        q = check_threshold(q)
        self._check_decoding({**self.loop, "exit_threshold": q})
        self.loop["exit_threshold"] = q

    def _check_decoding(self, loop: dict, cache: list | None = None) -> None:
        """``decoding`` against the loop rule ``loop`` (and the KV layout), so that a
        clash is refused when it is set up, not at the next send."""
        d = self.decoding
        if not d:
            return
        from .generation import make_rule

        rule = make_rule(self.model, **loop)
        if cache is None:  # empty caches of that depth: nothing is allocated
            cache = self.model.make_cache(rule.ut_steps, **self.kv)
        from .decoding.compiled import check_compilable
        from .decoding.pipeline import check_pipeline
        from .decoding.speculative import check_speculative

        try:
            if d.get("pipeline"):
                check_pipeline(self.model, rule, cache, d.get("draft_loops", 1),
                               self.sampling.get("logits_processors"))
            elif "draft_loops" in d:
                check_speculative(self.model, rule, cache, d["draft_loops"],
                                  d.get("num_draft_tokens"),
                                  self.sampling.get("logits_processors"))
            if d.get("compile_step"):
                check_compilable(cache, rule.fixed_loops)
        except ValueError as e:
            raise DecodingClash(str(e)) from None

    def cancel(self) -> None:
        """Stop the running ``send`` at its next token (from any thread); its partial
        answer stays in the history. No effect when nothing runs."""
        if self._busy.locked():
            self._cancel.set()

    @property
    def busy(self) -> bool:
        """Whether a ``send`` is running."""
        return self._busy.locked()

    def _idle(self, what: str):
        session = self

        class Guard:
            def __enter__(self):
                if not session._busy.acquire(blocking=False):
                    raise SessionBusy(f"ChatSession.{what}: a send() is running on this "
                                      "session; cancel() it and let it finish first.")

            def __exit__(self, *exc):
                session._busy.release()

        return Guard()

    # -- generation -----------------------------------------------------------------

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
        """Bring every cache to the shortest one's length (an interrupt may stop a
        step between layers) and record which tokens it holds."""
        offsets = [c.offset for lc in self.cache for c in lc.caches]
        low = min(min(offsets), len(tokens))
        for lc in self.cache:
            for c in lc.caches:
                c.trim(c.offset - low)
        self.cached = tokens[:low]

    def send(self, text: str, on_token: Callable[[TokenEvent], None] | None = None
             ) -> Iterator[TokenEvent]:
        """Add a user turn and stream the answer, one ``TokenEvent`` per token (each
        also passed to ``on_token``). The answer joins ``messages`` when the stream
        ends, is cancelled, or is closed early. A generator: nothing runs until it is
        iterated."""
        if not isinstance(text, str):
            raise TypeError(f"send: text must be a str, got {type(text).__name__}.")
        from .encoding import check_unicode

        check_unicode(text, "send: text")
        if not self._busy.acquire(blocking=False):
            raise SessionBusy("ChatSession.send: another send() is running on this "
                              "session; use one thread per session, or cancel() first.")
        try:
            _note_worker_thread()
            yield from self._send(text, on_token)
        finally:
            self._cancel.clear()
            self._busy.release()

    def _send(self, user: str, on_token) -> Iterator[TokenEvent]:
        from .encoding import encode_chat, held_back
        from .generation import stream_generate

        self.messages.append({"role": "user", "content": user})
        try:
            ids = encode_chat(self.tokenizer, self.messages, add_generation_prompt=True)
            new = self._sync_cache(ids)
        except Exception:
            self.messages.pop()
            raise
        out_tokens: list[int] = []
        text, stopped, shown = "", False, 0  # shown: the part of text handed out
        thinking = self._thinking_at(ids)
        parts: dict[bool, list[str]] = {True: [], False: []}  # reasoning, answer
        s = self.stats = Stats()
        max_tokens = self.sampling.get("max_tokens", 256)
        stream = None
        try:
            stream = stream_generate(self.model, self.tokenizer, new, prompt_cache=self.cache,
                                     **self.loop, **self.sampling, **self.decoding)
            for r in stream:
                out_tokens.append(r.token)
                s.loops[r.loops] += 1
                s.prompt_tokens, s.prompt_tps = r.prompt_tokens, r.prompt_tps
                s.generation_tokens, s.generation_tps = r.generation_tokens, r.generation_tps
                s.peak_memory = r.peak_memory
                finish = r.finish_reason
                if finish:
                    s.finish = finish_note(r, max_tokens)
                    s.cut = finish == "length"
                piece, marker = r.text, r.token in self.think_ids
                if marker:
                    thinking, piece = True, ""
                text += piece
                hits = [text.find(x) for x in self.stop if x in text]
                if hits:  # a stop string: show what precedes it, then end the answer
                    text, stopped = text[: min(hits)], True
                    finish = "stop_string"
                    s.finish, s.cut = "finished: stop string", False
                elif not finish and self._cancel.is_set():
                    finish = "cancelled"
                    s.finish = "finished: cancelled"
                # text that may begin a stop string is held back until it is clear
                end = len(text) - (0 if finish or marker else held_back(text, self.stop))
                piece, shown = text[shown:end], max(shown, end)
                s.finish_reason = finish
                event = TokenEvent(piece, r.token, r.loops, thinking, finish)
                parts[thinking].append(piece)
                if marker and r.token == self.think_ids[1]:
                    thinking = False
                if on_token is not None:
                    on_token(event)
                yield event
                if finish:
                    break
        finally:
            if stream is not None:  # a compiled step hands its K/V back to the cache on close
                stream.close()
            if s.finish_reason is None and s.generation_tokens:
                s.finish_reason, s.finish = "cancelled", "finished: stopped"
            if self.messages[-1:] and self.messages[-1]["role"] == "user":
                if not out_tokens and s.finish_reason is None:
                    self.messages.pop()  # refused before any token (e.g. too long)
                elif parts[True] or thinking:
                    # a thinking answer: the history keeps the reasoning apart, and the
                    # next turn's prompt shows only the answer (as thinking templates
                    # and OpenAI clients do); the cache recomputes just this answer
                    self.messages.append({"role": "assistant",
                                          "content": "".join(parts[False]).lstrip(),
                                          "reasoning": "".join(parts[True]).strip()})
                else:
                    eos = self.tokenizer.eos_token_ids
                    reply = text if stopped else self.tokenizer.decode(
                        [t for t in out_tokens if t not in eos])
                    self.messages.append({"role": "assistant", "content": reply})
            # trims what the generator ran ahead: a queued token, or speculative
            # decoding's accepted drafts past the last token handed out
            self._repair_cache(ids + out_tokens)
            s.kv_bytes = sum(lc.nbytes for lc in self.cache)

    def _thinking_at(self, ids: list[int]) -> bool:
        """Whether the prompt leaves the model inside a <think> section (a template
        whose generation prompt opens one)."""
        start, end = self.think_ids
        if start is None:
            return False
        for t in reversed(ids):
            if t == start:
                return True
            if t == end:
                return False
        return False


_workers: dict[int, threading.Thread] = {}  # native id -> a thread that ran send()
_workers_lock = threading.Lock()


def _note_worker_thread() -> None:
    """Remember a non-main thread that runs MLX work, and once, at exit, let the
    ended ones finish tearing down: MLX (0.32) aborts the process ("terminate called
    without an active exception", mlx issue 3126) when it exits while such a thread
    is still running its thread-local destructors, i.e. right after joining it."""
    thread = threading.current_thread()
    if thread is threading.main_thread():
        return
    with _workers_lock:
        if not _workers:
            import atexit

            atexit.register(_wait_for_ended_workers)
        _workers[threading.get_native_id()] = thread


def _wait_for_ended_workers(timeout: float = 2.0) -> None:
    import os
    import time

    with _workers_lock:
        # a foreign thread (a QThread) always looks alive to Python: wait for it too
        # (a GUI stops its worker before it quits), within the timeout
        ended = [tid for tid, t in _workers.items()
                 if isinstance(t, threading._DummyThread) or not t.is_alive()]
    if not ended:
        return
    deadline = time.monotonic() + timeout
    if not os.path.isdir("/proc/self/task"):  # not Linux: a short grace period
        time.sleep(0.2)
        return
    for tid in ended:
        while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
            time.sleep(0.005)


LOOP_KEYS = ("ut_steps", "exit_threshold", "exit_at_step", "min_loops", "max_loops",
             "hidden_eps")
SAMPLING_KEYS = ("sampler", "logits_processors", "max_tokens")
DECODING_KEYS = ("draft_loops", "num_draft_tokens", "pipeline", "compile_step")


def check_int(value, name: str, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")


def check_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")


INT_OPTIONS = {"ut_steps": 1, "exit_at_step": 0, "min_loops": 1, "max_loops": 1,
               "max_tokens": 1, "draft_loops": 1, "num_draft_tokens": 1}


def check_options(kv_group_size, loop: dict | None, sampling: dict | None,
                  decoding: dict | None) -> None:
    """The types of ``ChatSession``'s options, so that a wrong one is refused when
    the session is built, naming it, not deep inside the first ``send``."""
    check_int(kv_group_size, "kv_group_size")
    for group, options in (("loop", loop), ("sampling", sampling), ("decoding", decoding)):
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"{group} must be a dict or None, got {options!r}.")
        for key, value in (options or {}).items():
            name = f"{group}: {key}"
            if value is None and key != "max_tokens":
                continue  # the default
            if key in INT_OPTIONS:
                check_int(value, name, low=INT_OPTIONS[key])
            elif key in ("exit_threshold", "hidden_eps"):
                check_number(value, name)
            elif key == "sampler" and not callable(value):
                raise TypeError(f"{name} must be callable (logprobs -> token), got "
                                f"{value!r}.")
            elif key == "logits_processors" and (
                    not isinstance(value, (list, tuple)) or not all(map(callable, value))):
                raise TypeError(f"{name} must be a list of callables, got {value!r}.")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list: a str is one stop string (not its characters)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}.")
    return list(stop)


def check_messages(messages) -> list[dict]:
    """A copy of ``messages`` if it is a conversation: a list of dicts, each with a str
    ``role`` and ``content`` (and other values str or None)."""
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                        f"{type(messages).__name__}.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content', "
                            f"got {m!r:.80}.")
        if bad := [k for k, v in m.items() if not isinstance(k, str)
                   or not (v is None or isinstance(v, str))]:
            raise TypeError(f"messages[{i}][{bad[0]!r}] must be a str, got {m[bad[0]]!r:.80}.")
    return list(messages)


def check_kv_quantization(model, kv_bits: int | None, kv_group_size: int) -> None:
    """kv_bits / kv_group_size against the model's head size, in words a user can act on."""
    if kv_bits is None:
        return
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8 (or None), got {kv_bits!r}.")
    hd = model.args.head_dim
    groups = [g for g in (32, 64, 128) if hd % g == 0]
    if not groups:
        raise ValueError(f"kv_bits is unavailable for this model: its head_dim ({hd}) is "
                         "not a multiple of 32, the smallest KV quantization group.")
    if kv_group_size not in groups:
        raise ValueError(f"kv_group_size {kv_group_size} does not fit this model's "
                         f"head_dim ({hd}); use {' or '.join(map(str, groups))}.")
