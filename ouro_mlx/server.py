"""An OpenAI-compatible HTTP server for Ouro models (``ouro-mlx serve``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as SSE
ending in ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health``, and the
tokenizer as served: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

- The model runs on one engine thread (MLX is not re-entrant across threads). HTTP
  handlers only queue a request and read its tokens back. The engine decodes every
  active answer in one continuously refilled batch (``ouro_mlx.decoding.batch``):
  a new request's prompt is prefilled a chunk per step and joins, a finished one
  leaves; each row keeps its own cache, sampler, stop strings and loop options, and
  gets the tokens and loop counts it would get alone.
- Completions take a prompt as text, token ids, or a list of either (one choice per
  prompt); ``echo`` returns the prompt, with ``logprobs`` its tokens' logprobs (the
  first is null) as OpenAI's legacy API does. Chat takes ``logprobs`` and
  ``top_logprobs``. ``n`` choices share one prefill. Tools are refused by name: the
  model has no tool-call training.
- Decoded tokens really stop looping when their exit rule says so. Ouro options
  are extra body fields (``ut_steps``, ``exit_threshold``, ``exit_at_step``, ``min_loops``, ``max_loops``,
  ``kv_mode``, and the faster fixed-depth decoding ``draft_loops``,
  ``num_draft_tokens``, ``pipeline``, ``compile_step``); every chunk and response carries
  ``"ouro": {"loops": [...], "avg_loops": ...}``.
- Decoding defaults (``ouro-mlx serve --draft-loops K --compile-step``, or
  ``--pipeline``, whose draft starts at step ``draft_loops`` - 1) apply to the
  requests they fit (a fixed depth: ``exit_threshold`` 1.0 or ``exit_at_step``;
  ``kv_mode`` "full"; no ``repetition_penalty``; one answer without logprobs) and
  run beside the batch, one token per step; others join the batch, which gives the
  same tokens. A request's own field always wins (``null`` turns a default off),
  and an own field that does not fit its loop options is a 400 naming it.
- A prompt-cache LRU (``ouro_mlx.prompt_cache``) lets a conversation's next request
  process only its new tokens; ``usage.prompt_tokens_details.cached_tokens`` says
  how many were reused.
- Message text is plain text: a user typing ``<|im_end|>`` gets those characters,
  not the special token. Requests name a served model by its id and never make the
  server load anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from .encoding import held_back, surrogate_at
from .prompt_cache import PromptCache

DEMO_ID = "ouro-demo"


@dataclass
class Limits:
    """What one request may ask for. ``max_prompt_tokens`` None: the model's
    positions less one."""

    max_body_bytes: int = 4 << 20
    max_tokens: int = 4096
    max_prompt_tokens: int | None = None
    max_queue: int = 64
    max_active: int = 16  # rows (choices) generated at once
    max_n: int = 8  # choices per request
    prefill_step_size: int = 512  # prompt tokens per engine step (others wait at most one)
    split_depths: bool = False  # one batch per fixed depth instead of one shared batch


class APIError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# -- request models (the OpenAI schema, plus Ouro's options) -----------------------


def unicode_text(value: Any) -> Any:
    """``value`` (a str, or a list of str / ``TextPart``) if it is Unicode text. JSON
    may carry a lone surrogate (``"\\ud800"``), which no tokenizer can encode: a 400
    naming the field, not a 500 from deep inside the tokenizer."""
    for text in value if isinstance(value, list) else [value]:
        text = text.text if isinstance(text, TextPart) else text
        if not isinstance(text, str):  # token ids
            continue
        if (at := surrogate_at(text)) is not None:
            raise PydanticCustomError(
                "invalid_text", "holds a lone surrogate ({char}) at character {pos}, "
                "which is not Unicode text", {"char": f"\\u{ord(text[at]):04x}", "pos": at})
    return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    tool_calls: Any = None
    function_call: Any = None

    _content = field_validator("content")(unicode_text)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


NO_TOOLS = "this model has no tool-call training, so this server does not take tools."


class GenerationRequest(BaseModel):
    """Fields shared by both completion routes. Unknown fields are ignored, as
    OpenAI clients send many; known ones are checked."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None  # accepted; sampling draws from the server's generator
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    # Ouro
    ut_steps: int | None = Field(None, ge=1)
    exit_threshold: float | None = Field(None, ge=0.0, le=1.0)
    exit_at_step: int | None = Field(None, ge=0)
    min_loops: int = Field(1, ge=1)
    max_loops: int | None = Field(None, ge=1)
    kv_mode: Literal["full", "last"] = "full"
    draft_loops: int | None = Field(None, ge=1, le=64)
    num_draft_tokens: int | None = Field(None, ge=1, le=64)
    pipeline: bool | None = None
    compile_step: bool | None = None
    adapter: str | None = None  # a name given to ouro-mlx serve --adapter, never a path

    _text = field_validator("model", "stop", "adapter")(unicode_text)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise APIError(400, "stop: at most 4 strings of at most 256 characters.",
                           param="stop")
        return [s for s in stops if s]

    def check_no_tools(self) -> None:
        """Tools are refused in words, never silently ignored."""
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name}: {NO_TOOLS}", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise APIError(400, f"{name}: {NO_TOOLS}", param=name)

    def logprobs_k(self) -> int | None:
        """How many alternatives to report per token (None: no logprobs)."""
        raise NotImplementedError


DECODING_FIELDS = ("draft_loops", "num_draft_tokens", "pipeline", "compile_step")
MAX_TOP_LOGPROBS = 20


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true.", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_no_tools(self) -> None:
        super().check_no_tools()
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                raise APIError(400, f"messages.{i}.role: {m.role!r} messages: {NO_TOOLS}",
                               param=f"messages.{i}.role")
            for name in ("tool_calls", "function_call"):
                if getattr(m, name):
                    raise APIError(400, f"messages.{i}.{name}: {NO_TOOLS}",
                                   param=f"messages.{i}.{name}")


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    _prompt = field_validator("prompt")(unicode_text)

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_list(self) -> list[str | list[int]]:
        """Each prompt: text or token ids (a flat id list is one prompt)."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


# -- the engine: one thread that owns the model -----------------------------------


@dataclass
class Event:
    """One generated token of one choice, as the engine hands it to a handler."""

    index: int  # the choice
    text: str
    token: int
    loops: int
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    logprob: float | None = None
    top: list | None = None  # [(token id, logprob)], best first


@dataclass
class Job:
    """One request: ``prompts`` (token ids), each answered ``n`` times (choice
    ``i * n + j``). ``logprobs`` k: each token's logprob and the k best (None: no
    logprobs); ``echo``: score the prompts too (``prompt_scores``, per prompt)."""

    prompts: list[list[int]]
    options: dict
    loop: asyncio.AbstractEventLoop
    model: Any = None  # the base model or an adapter's copy
    adapter: str | None = None
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopped: set = field(default_factory=set)  # choices the handler is done with
    cached_tokens: int = 0
    prompt_scores: dict = field(default_factory=dict)  # prompt index → scores
    first: Any = None  # the first item, read before a stream's headers go out

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    async def start(self, request: Request) -> None:
        """Wait for the first token, so that an error found at the start is the
        response's status rather than a chunk in a 200 stream. A client that leaves
        meanwhile cancels the job."""
        while self.first is None:
            try:
                self.first = await asyncio.wait_for(self.out.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancelled.set()
                    raise APIError(499, "The client left.") from None
            except BaseException:  # the handler is cancelled (shutdown)
                self.cancelled.set()
                raise
        if isinstance(self.first, Exception):
            self.cancelled.set()
            raise error_of(self.first)


class _Done:
    pass


def _hand_over(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        job.out.put_nowait(item)


DONE = _Done()


@dataclass(eq=False)
class _Row:
    """A choice being generated: its job, its index, its detokenizer."""

    job: Job
    index: int
    prompt: list[int]
    layout: tuple
    detokenizer: Any
    seq: Any = None  # its ``decoding.batch.Sequence`` (None: a single-sequence run)
    done: bool = False


class Engine:
    """Runs every request on one thread: rows that can share a batch go through the
    continuous batcher (``ouro_mlx.decoding.batch``), one token each per step;
    requests for a single-sequence strategy (draft_loops, pipeline, compile_step)
    advance one token each in turn beside it. ``max_active`` rows at once."""

    def __init__(self, model, tokenizer, *, prompt_cache: PromptCache | None = None,
                 max_active: int = 16, max_queue: int = 64, prefill_step_size: int = 512,
                 split_depths: bool = False):
        from .decoding.batch import Batcher

        self.model, self.tokenizer = model, tokenizer
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.max_active, self.max_queue = max_active, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batcher = Batcher(prefill_step_size=prefill_step_size,
                               share_depths=not split_depths)
        self.solo: list[tuple[_Row, Any, list]] = []
        self.live: list[_Row] = []
        self.eos = frozenset(tokenizer.eos_token_ids)
        self.active = 0
        self._outbox: list[tuple[Job, Any]] = []
        self._thread = threading.Thread(target=self._run, name="ouro-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(503, "The server is busy; try again later.", type="server_error",
                           code="busy")
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        held: Job | None = None  # a job waiting for rows to free up
        while True:
            try:
                while True:
                    job = held or self.jobs.get(block=not self.live)
                    held = None
                    if job is None:
                        return
                    if self.live and len(self.live) + job.rows > self.max_active:
                        held = job
                        break
                    try:
                        self._start(job)
                    except Exception as e:  # e.g. a cache that cannot be built
                        self._post(job, e)
                        self._post(job, DONE)
                    self._flush()
            except queue.Empty:
                pass
            self._cancel()
            self.active = len(self.live)
            if not self.batcher.idle:
                for t in self.batcher.step():
                    self._deliver(t)
            for run in list(self.solo):
                self._advance(run)
            self.active = len(self.live)
            self._flush()

    def _post(self, job: Job, item: Any) -> None:
        """Queue ``item`` for ``job``'s handler; ``_flush`` hands a step's items over
        with one wake-up of the event loop instead of one per token."""
        self._outbox.append((job, item))

    def _flush(self) -> None:
        by_loop: dict = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # the event loop is gone (shutdown): nobody listens
                for job, _ in items:
                    job.cancelled.set()

    def _start(self, job: Job) -> None:
        from .decoding.batch import Sequence
        from .decoding.steps import make_rule

        if job.cancelled.is_set():
            self._post(job, DONE)
            return
        opts = dict(job.options)
        steps = job.model._steps(opts.get("ut_steps"))
        layout = (job.adapter, steps, opts["kv_mode"])
        limit = job.model.args.max_position_embeddings
        if any(k in opts for k in ("draft_loops", "pipeline", "compile_step")):
            return self._start_solo(job, opts, layout)
        rule = make_rule(job.model, *(opts[k] for k in (
            "ut_steps", "exit_threshold", "exit_at_step", "min_loops", "max_loops")))
        for i, ids in enumerate(job.prompts):
            cache, cached = (None, 0) if job.echo else self.prompt_cache.fetch(layout, ids)
            job.cached_tokens += cached
            copies = []
            for j in range(job.n):
                row = _Row(job, i * job.n + j, ids, layout, self.tokenizer.detokenizer)
                row.seq = Sequence(
                    ids, job.model, rule, min(opts["max_tokens"], limit - len(ids)),
                    self.eos, opts["kv_mode"], opts["sampler"], opts["logits_processors"],
                    logprobs=job.logprobs, score_prompt=job.echo and job.logprobs is not None,
                    cache=cache, cached=cached, keep_cache=j == 0, tag=row)
                copies.append(row.seq)
                self.live.append(row)
            self.batcher.add(*copies)

    def _start_solo(self, job: Job, opts: dict, layout: tuple) -> None:
        from .generation import stream_generate

        ids = job.prompts[0]
        cache, cached = self.prompt_cache.fetch(layout, ids)
        if cache is None:
            cache = job.model.make_cache(layout[1], kv_mode=layout[2])
        job.cached_tokens = cached
        stream = stream_generate(job.model, self.tokenizer, ids[cached:],
                                 prompt_cache=cache, **opts)
        row = _Row(job, 0, ids, layout, None)
        self.live.append(row)
        self.solo.append((row, stream, cache))

    def _cancel(self) -> None:
        """Rows whose job or choice the handler gave up on stop at the next step."""
        for row in list(self.live):
            if row.job.cancelled.is_set() or row.index in row.job.stopped:
                if row.seq is not None:
                    row.seq.cancelled = True  # the batcher hands back its last token
                else:
                    self._end_solo(next(run for run in self.solo if run[0] is row))

    def _deliver(self, t) -> None:
        """Hand one token (a ``decoding.batch.Token``) to its job; a row that ends
        stores its cache."""
        s, row = t.seq, t.seq.tag
        if row.done:
            return
        job = row.job
        if t.finish in ("error", "cancelled"):
            if s.error is not None:
                self._post(job, s.error)
            self._end(row, s)
            return
        if s.prompt_scores is not None and row.index % job.n == 0:
            job.prompt_scores.setdefault(row.index // job.n, s.prompt_scores)
        detok = row.detokenizer
        if t.token not in self.eos:
            detok.add_token(t.token)
        if t.finish:
            detok.finalize()
        self._post(job, Event(row.index, detok.last_segment, t.token, t.loops, t.finish,
                      len(row.prompt), len(s.tokens), t.logprob, t.top))
        if t.finish:
            self._end(row, s)

    def _end(self, row: _Row, s) -> None:
        row.done = True
        self.live.remove(row)
        if s is not None and s.final_cache is not None:
            try:
                self.prompt_cache.store(row.layout, row.prompt + s.tokens, s.final_cache)
            except Exception:  # a cache not worth keeping; the answer is already out
                pass
            s.final_cache = None
        if all(r.job is not row.job for r in self.live):
            self._post(row.job, DONE)

    def _advance(self, run) -> None:
        """Hand out the next token of a single-sequence run."""
        row, stream, _ = run
        job = row.job
        try:
            r = next(stream)
        except StopIteration:
            return self._end_solo(run)
        except Exception as e:  # a bad request found late, or a failure: its own error
            self._post(job, e)
            return self._end_solo(run, store=False)
        self._post(job, Event(0, r.text, r.token, r.loops, r.finish_reason,
                              r.prompt_tokens + job.cached_tokens, r.generation_tokens))
        row.prompt = row.prompt + [r.token]
        if r.finish_reason is not None:
            self._end_solo(run)

    def _end_solo(self, run, store: bool = True) -> None:
        row, stream, cache = run
        self.solo.remove(run)
        row.done = True
        self.live.remove(row)
        try:
            stream.close()
            if store:
                self.prompt_cache.store(row.layout, row.prompt, cache)
        except Exception:
            pass
        self._post(row.job, DONE)


# -- text assembly: thinking, stop strings ----------------------------------------


class Assembler:
    """Turns tokens into content and reasoning deltas: text between ``<think>`` and
    ``</think>`` is reasoning; a stop string ends the content (text that may begin
    one is held back until it is clear)."""

    def __init__(self, tokenizer, stops: list[str], think: bool,
                 prompt: list[int] | None = None):
        vocab = tokenizer.get_vocab()
        self.think_ids = (vocab.get("<think>"), vocab.get("</think>")) if think else (None,)
        self.stops = stops
        # a template whose generation prompt opens <think>: the answer starts inside it
        last = next((t for t in reversed(prompt or []) if t in self.think_ids), None)
        self.thinking = last is not None and last == self.think_ids[0]
        self.content = self.reasoning = self.pending = ""
        self.stopped = False

    def add(self, token: int, text: str, last: bool) -> tuple[str, str]:
        """This token's (content, reasoning) deltas."""
        if token in self.think_ids:
            self.thinking = token == self.think_ids[0]
            return self._flush() if last else ("", "")
        if self.thinking:
            self.reasoning += text
            return ("", text)
        self.pending += text
        if self.stops:
            window = self.content[-255:] + self.pending
            hits = [window.find(s) for s in self.stops if s in window]
            if hits:
                cut = min(hits) - len(self.content[-255:])
                delta = self.pending[: max(cut, 0)]
                self.content += delta
                self.pending, self.stopped = "", True
                return (delta, "")
            if not last:
                delta = self.pending[: len(self.pending) - held_back(self.pending, self.stops)]
                self.pending = self.pending[len(delta):]
                self.content += delta
                return (delta, "")
        return self._flush()

    def _flush(self) -> tuple[str, str]:
        delta, self.pending = self.pending, ""
        self.content += delta
        return (delta, "")


# -- the app -----------------------------------------------------------------------


class Server:
    """State behind the routes: the model, its id, the engine and the limits."""

    def __init__(self, model, tokenizer, model_id: str, limits: Limits | None = None,
                 prompt_cache: PromptCache | None = None, adapters: dict | None = None,
                 decoding: dict | None = None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.adapters = dict(adapters or {})
        unknown = set(decoding or {}) - set(DECODING_FIELDS)
        if unknown:
            raise ValueError(f"decoding: unknown option {sorted(unknown)[0]!r} (known: "
                             f"{', '.join(DECODING_FIELDS)}).")
        self.decoding = {k: v for k, v in (decoding or {}).items()
                         if v is not None and v is not False}
        for name in ("draft_loops", "num_draft_tokens"):
            v = self.decoding.get(name)
            if v is not None and (type(v) is not int or not 1 <= v <= 64):
                raise ValueError(f"decoding: {name} must be an integer in [1, 64], got {v!r}.")
        for name in ("compile_step", "pipeline"):
            if self.decoding.get(name, True) is not True:
                raise ValueError(f"decoding: {name} must be True or False, got "
                                 f"{self.decoding[name]!r}.")
        if "pipeline" in self.decoding and "num_draft_tokens" in self.decoding:
            raise ValueError("decoding: num_draft_tokens does not apply to pipeline (the "
                             "pipeline holds one token per loop step).")
        self.limits = limits or Limits()
        positions = model.args.max_position_embeddings
        self.max_prompt = min(self.limits.max_prompt_tokens or positions - 1, positions - 1)
        self.engine = Engine(model, tokenizer, prompt_cache=prompt_cache,
                             max_active=self.limits.max_active,
                             max_queue=self.limits.max_queue,
                             prefill_step_size=self.limits.prefill_step_size,
                             split_depths=self.limits.split_depths)
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise APIError(404, f"model: {name!r} is not served here; GET /v1/models lists "
                           f"{self.model_id!r}.", param="model", code="model_not_found")

    def variant(self, adapter: str | None):
        """The model a request's ``adapter`` names (None: the base model)."""
        if adapter is None:
            return self.model
        if adapter not in self.adapters:
            names = ", ".join(map(repr, self.adapters)) or "none"
            raise APIError(404, f"adapter: {adapter!r} is not served here (served: {names}).",
                           param="adapter", code="adapter_not_found")
        return self.adapters[adapter]

    def options(self, req: GenerationRequest) -> dict:
        """stream_generate's keyword arguments for ``req``, checked."""
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        from .generation import make_rule

        req.check_no_tools()
        if req.n > self.limits.max_n:
            raise APIError(400, f"n: {req.n} is above this server's limit of "
                           f"{self.limits.max_n}.", param="n")
        requested = req.max_completion_tokens or req.max_tokens
        if requested == 0 and not getattr(req, "echo", False):
            raise APIError(400, "max_tokens: must be >= 1 (0 only with echo).",
                           param="max_tokens")
        limit = self.limits.max_tokens
        if requested is not None and requested > limit:
            raise APIError(400, f"max_tokens: {requested} is above this server's limit "
                           f"of {limit}.", param="max_tokens")
        loop = dict(ut_steps=req.ut_steps, exit_threshold=req.exit_threshold,
                    exit_at_step=req.exit_at_step, min_loops=req.min_loops,
                    max_loops=req.max_loops)
        from .limits import max_ut_steps

        for name in ("ut_steps", "exit_at_step", "min_loops", "max_loops"):
            if (v := loop[name]) is not None and v > max_ut_steps():
                raise APIError(400, f"{name}: {v} is above the limit of {max_ut_steps()} "
                               "loop steps.", param=name)
        model = self.variant(req.adapter)
        try:
            rule = make_rule(model, **loop)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        processors = make_logits_processors(repetition_penalty=req.repetition_penalty) or None
        greedy = req.temperature == 0  # (any sampler at temperature 0 is argmax)
        return dict(
            **loop,
            kv_mode=req.kv_mode,
            max_tokens=max(requested, 1) if requested is not None else min(limit, 512),
            sampler=None if greedy else make_sampler(
                temp=req.temperature, top_p=req.top_p, min_p=req.min_p, top_k=req.top_k),
            logits_processors=processors,
            **self.decoding_options(req, model, rule, processors),
        )

    def decoding_options(self, req: GenerationRequest, model, rule, processors) -> dict:
        """draft_loops / num_draft_tokens / pipeline / compile_step for ``req``: its own
        fields, else the server's defaults. An own field that cannot run with the
        request's loop options is a 400 naming it; a default that cannot is left out.
        With pipeline, draft_loops is where its draft starts (default 1); a default
        pipeline that is dropped (it cannot run, the request turns it off, or asks for
        num_draft_tokens) takes the default draft_loops with it."""
        from .decoding.compiled import check_compilable
        from .decoding.pipeline import check_pipeline
        from .decoding.speculative import check_speculative

        given = req.model_fields_set & set(DECODING_FIELDS)
        # one sequence per request, no prompt scores: what these strategies decode
        batch_only = [(name, why) for name, why in (
            ("n", req.n > 1), ("echo", getattr(req, "echo", False)),
            ("logprobs", req.logprobs_k() is not None),
            ("prompt", isinstance(req, CompletionRequest) and len(req.prompt_list()) > 1))
            if why]
        own = [f for f in DECODING_FIELDS
               if f in given and getattr(req, f) not in (None, False)]
        if batch_only:
            if own:
                raise APIError(400, f"{own[0]}: decodes one sequence without logprobs; "
                               f"this request asks for {batch_only[0][0]}.", param=own[0])
            return {}
        chosen = {name: getattr(req, name) if name in given else self.decoding.get(name)
                  for name in DECODING_FIELDS}
        out = {k: v for k, v in chosen.items() if v is not None and v is not False}

        def drop_default_pipeline():  # with the draft_loops default that went with it
            out.pop("pipeline", None)
            if "draft_loops" not in given:
                out.pop("draft_loops", None)

        if self.decoding.get("pipeline") and "pipeline" in given and "pipeline" not in out:
            drop_default_pipeline()  # the request turned it off
        if "pipeline" in out and "num_draft_tokens" in out:
            if {"pipeline", "num_draft_tokens"} <= given:
                raise APIError(400, "num_draft_tokens: does not apply to pipeline (the "
                               "pipeline holds one token per loop step).",
                               param="num_draft_tokens")
            if "num_draft_tokens" in given:  # the request asks for speculation
                drop_default_pipeline()
            else:
                del out["num_draft_tokens"]
        if "num_draft_tokens" in out and "draft_loops" not in out:
            if "num_draft_tokens" in given:
                raise APIError(400, "num_draft_tokens: needs draft_loops.",
                               param="num_draft_tokens")
            del out["num_draft_tokens"]
        cache = model.make_cache(rule.ut_steps, kv_mode=req.kv_mode)  # empty: no memory
        if "pipeline" in out:
            try:
                check_pipeline(model, rule, cache, out.get("draft_loops", 1), processors)
            except ValueError as e:
                if "pipeline" in given:  # asked for by the request itself
                    own_k = "draft_loops" in given and str(e).startswith("draft_loops must")
                    raise APIError(400, str(e), param="draft_loops" if own_k else "pipeline") \
                        from None
                drop_default_pipeline()  # a server default this request cannot use
        groups = {"draft_loops": ("draft_loops", "num_draft_tokens"),
                  "compile_step": ("compile_step",)}
        for name, fields in groups.items():
            if name not in out or name == "draft_loops" and "pipeline" in out:
                continue  # (pipeline's draft_loops was checked with it)
            try:
                if name == "draft_loops":
                    check_speculative(model, rule, cache, out["draft_loops"],
                                      out.get("num_draft_tokens"), processors)
                else:
                    check_compilable(cache, rule.fixed_loops)
            except ValueError as e:
                if given & set(fields):  # asked for by the request itself
                    param = "num_draft_tokens" if str(e).startswith("num_draft") else name
                    raise APIError(400, str(e), param=param) from None
                for f in fields:  # a server default this request cannot use
                    out.pop(f, None)
        return out

    @property
    def positions(self) -> int:
        return self.model.args.max_position_embeddings

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.model.args.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is not in [0, {vocab}).",
                           param=param)
        return list(ids)

    def tokenizer_info(self) -> dict:
        """What a client needs to tokenize as the server does (lm-eval's remote
        tokenizer reads it): the special tokens and the chat template."""
        tok = self.tokenizer
        eos = sorted(tok.eos_token_ids)
        inner = getattr(tok, "_tokenizer", tok)
        return {"tokenizer_class": type(inner).__name__, "model": self.model_id,
                "max_model_len": self.positions, "vocab_size": self.model.args.vocab_size,
                "eos_token": tok.decode(eos[:1]) if eos else None, "eos_token_ids": eos,
                "eos_token_id": eos[0] if eos else None,
                "bos_token": getattr(inner, "bos_token", None),
                "pad_token": getattr(inner, "pad_token", None),
                "chat_template": getattr(inner, "chat_template", None)}

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param)
        if len(ids) > self.max_prompt:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this server "
                           f"takes at most {self.max_prompt}.", param=param,
                           code="context_length_exceeded")
        return ids

    def submit(self, prompts: list[list[int]], options: dict, adapter: str | None, *,
               n: int = 1, logprobs: int | None = None, echo: bool = False) -> Job:
        rows = len(prompts) * n
        if rows > self.limits.max_active:
            param = "n" if n > 1 else "prompt"
            raise APIError(400, f"{param}: {len(prompts)} prompt(s) × n={n} are {rows} "
                           f"choices; this server generates at most {self.limits.max_active} "
                           "at once.", param=param)
        job = Job([list(p) for p in prompts], options, asyncio.get_running_loop(),
                  self.variant(adapter), adapter, n=n, logprobs=logprobs, echo=echo)
        self.engine.submit(job)
        return job

async def events(job: Job, request: Request | None = None) -> AsyncIterator[Event]:
    """The job's events; cancels it when the consumer leaves (or the client does)."""
    watch = None
    if request is not None:
        watch = asyncio.create_task(cancel_on_disconnect(job, request))
    try:
        if job.first is not None:
            item, job.first = job.first, None
            if item is DONE:
                return
            yield item
        while True:
            item = await job.out.get()
            if item is DONE or job.cancelled.is_set():
                return
            if isinstance(item, Exception):
                raise error_of(item)
            yield item
    finally:
        job.cancelled.set()
        if watch is not None:
            watch.cancel()


async def cancel_on_disconnect(job: Job, request: Request) -> None:
    """Cancel ``job`` the moment its client disconnects. A streamed response notices
    at its next write, a whole one would not until the end: waiting on the ASGI
    receive channel (the body is already read) returns as soon as the client goes,
    and the engine checks the flag before every token."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            job.cancelled.set()
            job.out.put_nowait(DONE)  # wakes the reader now
            return


def error_of(e: Exception) -> APIError:
    from .sampling import NonFiniteLogits

    if isinstance(e, APIError):
        return e
    if isinstance(e, NonFiniteLogits):  # the served model is broken, not the request
        return APIError(500, str(e), type="server_error", code="non_finite_logits")
    if isinstance(e, ValueError):  # the request asks what the model cannot do
        return APIError(400, str(e))
    return APIError(500, "Generation failed.", type="server_error")


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def ouro_field(loops: list[int], all_loops: list[int]) -> dict:
    avg = sum(all_loops) / len(all_loops) if all_loops else 0.0
    return {"loops": loops, "avg_loops": round(avg, 4)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(model, tokenizer, *, model_id: str = DEMO_ID, limits: Limits | None = None,
               prompt_cache: PromptCache | None = None,
               adapters: dict | None = None, decoding: dict | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` under ``model_id``. ``adapters``: name → the
    model with those adapters applied (same tokenizer), chosen per request by the
    ``adapter`` field. ``decoding``: default draft_loops / num_draft_tokens /
    pipeline / compile_step for the requests they fit (see the module's docstring)."""
    from .encoding import TemplateFailure, encode_chat, encode_text

    server = Server(model, tokenizer, model_id, limits, prompt_cache, adapters, decoding)
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(server.engine.close)

    app = FastAPI(title="ouro-mlx", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=server.limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, "The body is not valid JSON.").response()
        if not loc:  # not an object, or a body without Content-Type: application/json
            return APIError(400, "The body must be a JSON object (sent with Content-Type: "
                            "application/json).").response()
        param = ".".join(loc) or None
        msg = f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid")
        return APIError(400, msg, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def failure(_: Request, e: Exception):
        return APIError(500, "Internal server error.", type="server_error").response()

    @app.get("/health")
    async def health():
        eng = server.engine
        return {"status": "ok", "model": server.model_id, "adapters": list(server.adapters),
                "active": eng.active,
                "queued": eng.jobs.qsize(), "prompt_cache": {
                    "entries": len(eng.prompt_cache), "bytes": eng.prompt_cache.nbytes}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model",
                                            "created": server.created,
                                            "owned_by": "ouro-mlx",
                                            "adapters": list(server.adapters)}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return server.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if req.messages is not None:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in req.messages]
            ids = encode_chat(tokenizer, messages,
                              add_generation_prompt=req.add_generation_prompt)
        elif req.prompt is not None:  # the client's own text, tokenized as HF does
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "prompt: give prompt (text) or messages.", param="prompt")
        out = {"count": len(ids), "max_model_len": server.positions, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [tokenizer.decode([t]) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        server.check_ids(req.tokens, "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        server.check_model(req.model)
        options = server.options(req)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]
        try:
            ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
        except TemplateFailure as e:  # the served model's fault, said in words
            raise APIError(500, str(e), type="server_error", code="chat_template") from None
        ids = server.check_prompt(ids, "messages")
        k = req.logprobs_k()
        job = server.submit([ids], options, req.adapter, n=req.n, logprobs=k)
        choices = [Choice(i, Assembler(tokenizer, req.stops(), think=True, prompt=ids))
                   for i in range(req.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": server.model_id}
        render = ChatRender(server, job, head, k)
        if req.stream:
            await job.start(request)
            return StreamingResponse(
                with_errors(stream_choices(job, choices, render, request, req)),
                media_type="text/event-stream")
        await collect(job, choices, request)
        return {**head, "object": "chat.completion",
                "choices": [render.whole(c) for c in choices],
                **render.totals(job, choices)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        options = server.options(req)
        prompts = []
        for p in req.prompt_list():
            if isinstance(p, str):
                ids = encode_text(tokenizer, p)
            else:
                ids = server.check_ids(p, "prompt")
            prompts.append(server.check_prompt(ids, "prompt"))
        k = req.logprobs_k()
        score_only = req.echo and (req.max_completion_tokens or req.max_tokens) == 0
        job = server.submit(prompts, options, req.adapter, n=req.n, logprobs=k,
                            echo=req.echo)
        choices = [Choice(i, Assembler(tokenizer, req.stops(), think=False),
                          prompt=prompts[i // req.n] if req.echo else None,
                          score_only=score_only)
                   for i in range(len(prompts) * req.n)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": server.model_id}
        render = CompletionRender(server, job, head, k)
        if req.stream:
            await job.start(request)
            return StreamingResponse(
                with_errors(stream_choices(job, choices, render, request, req)),
                media_type="text/event-stream")
        await collect(job, choices, request)
        return {**head, "object": "text_completion",
                "choices": [render.whole(c) for c in choices],
                **render.totals(job, choices)}

    return app


# -- responses: choices, logprobs, streaming --------------------------------------


class TokenizeRequest(BaseModel):
    """``/tokenize``: ``prompt`` is tokenized as the Hugging Face tokenizer does
    (special-token strings become special tokens: what lm-eval's remote tokenizer
    and vLLM clients expect; the ids are theirs to send), ``messages`` through the
    chat template with plain-text content. Generation requests never do the former:
    their text is always plain."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False

    _text = field_validator("prompt", "model")(unicode_text)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


@dataclass(eq=False)
class Choice:
    """One choice's progress: its text assembler, tokens, loops and finish."""

    index: int
    text: Assembler
    prompt: list[int] | None = None  # echoed
    score_only: bool = False  # echo with max_tokens 0: the prompt only
    events: list = field(default_factory=list)
    finish: str | None = None
    offset: int = 0  # characters of this choice's text streamed (completions' text_offset)

    @property
    def loops(self) -> list[int]:
        return [e.loops for e in self.events]


async def collect(job: Job, choices: list[Choice], request: Request) -> None:
    """Every choice's tokens (a whole response)."""
    agen = choice_events(job, choices, request)
    try:
        async for _ in agen:
            pass
    finally:
        await agen.aclose()
    if any(not c.events for c in choices):
        raise APIError(500, "Generation produced nothing.", type="server_error")


async def choice_events(job: Job, choices: list[Choice], request: Request):
    """(choice, event, content delta, reasoning delta) per token, until every choice
    is finished; a choice that meets a stop string is finished (and its row freed)."""
    agen = events(job, request)
    try:
        async for e in agen:
            c = choices[e.index]
            if c.finish:
                continue
            c.events.append(e)
            content, reasoning = c.text.add(e.token, e.text, e.finish_reason is not None)
            if c.text.stopped:
                c.finish = "stop"
                job.stopped.add(c.index)
            elif e.finish_reason:
                c.finish = e.finish_reason
            if c.score_only:
                content, reasoning = "", ""
                c.finish = c.finish or "length"
                job.stopped.add(c.index)
            yield c, e, content, reasoning
            if all(x.finish for x in choices):
                break
    finally:
        await agen.aclose()


class Render:
    """How one route writes choices, whole and streamed."""

    def __init__(self, server: Server, job: Job, head: dict, k: int | None):
        self.server, self.job, self.head, self.k = server, job, head, k
        self.tokenizer = server.tokenizer

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def totals(self, job: Job, choices: list[Choice]) -> dict:
        loops = [x for c in choices for x in c.loops if not c.score_only]
        return {"usage": self.usage(job, choices), "ouro": ouro_field(loops, loops)}

    def usage(self, job: Job, choices: list[Choice]) -> dict:
        made = sum(0 if c.score_only else len(c.events) for c in choices)
        return usage(sum(map(len, job.prompts)), made, job.cached_tokens)


class ChatRender(Render):
    def entry(self, token: int, logprob: float) -> dict:
        text = self.piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprobs(self, events: list[Event]) -> dict | None:
        if self.k is None:
            return None
        eos = self.server.engine.eos
        return {"content": [{**self.entry(e.token, e.logprob),
                             "top_logprobs": [self.entry(t, v) for t, v in e.top or []]}
                            for e in events if e.token not in eos], "refusal": None}

    def whole(self, c: Choice) -> dict:
        message = {"role": "assistant", "content": c.text.content}
        if c.text.reasoning:
            message["reasoning"] = c.text.reasoning
        return {"index": c.index, "finish_reason": c.finish, "message": message,
                "logprobs": self.logprobs(c.events)}

    def opening(self, c: Choice) -> list[dict]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]

    def chunk(self, c: Choice, e: Event, content: str, reasoning: str) -> dict:
        delta = {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning"] = reasoning
        return {"index": c.index, "delta": delta, "logprobs": self.logprobs([e]),
                "finish_reason": c.finish}

    object = "chat.completion.chunk"


class CompletionRender(Render):
    object = "text_completion"

    def prompt_part(self, c: Choice, job: Job) -> tuple[str, list]:
        """The echoed prompt's text and its logprob entries."""
        if c.prompt is None:
            return "", []
        text = self.tokenizer.decode(c.prompt)
        if self.k is None:
            return text, []
        scores = job.prompt_scores.get(c.index // job.n) or [None] * len(c.prompt)
        return text, [(t, None if s is None else s[0], None if s is None else s[1])
                      for t, s in zip(c.prompt, scores)]

    def logprobs(self, entries: list[tuple], offset: int = 0) -> dict | None:
        """OpenAI's legacy shape from (token, logprob, top) entries."""
        if self.k is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            text = self.piece(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else
                                       {self.piece(t): v for t, v in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def generated(self, c: Choice, events: list[Event]) -> list[tuple]:
        return [] if c.score_only else [(e.token, e.logprob, e.top) for e in events]

    def whole(self, c: Choice) -> dict:
        text, scored = self.prompt_part(c, self.job)
        return {"index": c.index, "text": text + ("" if c.score_only else c.text.content),
                "logprobs": self.logprobs(scored + self.generated(c, c.events)),
                "finish_reason": c.finish}

    def opening(self, c: Choice) -> list[dict]:
        text, scored = self.prompt_part(c, self.job)
        if not text:
            return []
        c.offset = len(text)
        return [{"index": c.index, "text": text, "logprobs": self.logprobs(scored),
                 "finish_reason": None}]

    def chunk(self, c: Choice, e: Event, content: str, reasoning: str) -> dict:
        return {"index": c.index, "text": content,
                "logprobs": self.logprobs(self.generated(c, [e]), c.offset),
                "finish_reason": c.finish}


async def stream_choices(job: Job, choices: list[Choice], render: Render, request: Request,
                         req: GenerationRequest) -> AsyncIterator[str]:
    """SSE chunks: each choice's opening (chat: the role; completions: an echoed
    prompt) before its first token, a chunk per token carrying its loops, and with
    ``stream_options.include_usage`` a final chunk of no choices and the usage (the
    only one that carries it, as OpenAI's and mlx-lm's servers stream: a client that
    adds up the usage it sees counts it once)."""
    base = {**render.head, "object": render.object}
    seen: list[int] = []
    ready: list[str] = []  # chunks written together while more tokens wait
    opened: set[int] = set()
    async for c, e, content, reasoning in choice_events(job, choices, request):
        if c.index not in opened:  # (after its prompt is scored: its first token is in)
            opened.add(c.index)
            ready += [sse({**base, "choices": [choice], "ouro": ouro_field([], [])})
                      for choice in render.opening(c)]
        if not c.score_only:
            seen.append(e.loops)
        body = {**base, "choices": [render.chunk(c, e, content, reasoning)],
                "ouro": ouro_field([] if c.score_only else [e.loops], seen)}
        ready.append(sse(body))
        if isinstance(render, CompletionRender) and not c.score_only:
            c.offset += len(content)
        if job.out.empty():
            yield "".join(ready)
            ready = []
    if req.stream_options and req.stream_options.include_usage:
        ready.append(sse({**base, "choices": [], "usage": render.usage(job, choices)}))
    if ready:
        yield "".join(ready)


async def with_errors(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE chunks, then ``[DONE]``; an error after the headers went out (status 200)
    becomes an OpenAI-style error chunk."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param,
                             "code": e.code}})
    yield sse("[DONE]")


class BodyLimit:
    """Refuses bodies above ``max_bytes`` with a 413, by Content-Length or as they
    arrive (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        too_big = APIError(413, f"The body is larger than this server's limit of "
                           f"{self.max_bytes} bytes.", code="body_too_large")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big
            return message

        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except APIError as e:
            if not started:
                await e.response()(scope, receive, send)
