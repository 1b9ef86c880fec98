"""An OpenAI-compatible HTTP server for Ouro models (``ouro-mlx serve``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as SSE
ending in ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health``.

- The model runs on one engine thread (MLX is not re-entrant across threads). HTTP
  handlers only queue a request and read its tokens back. The engine advances the
  active requests one token each in turn, so concurrent streams all progress and
  none waits for another to finish; each has its own cache, so nothing mixes.
- Generation is ``ouro_mlx.generation.stream_generate``: decoded tokens really stop
  looping when their exit rule says so. Ouro options are extra body fields
  (``ut_steps``, ``exit_threshold``, ``exit_at_step``, ``min_loops``, ``max_loops``,
  ``kv_mode``, and the faster fixed-depth decoding ``draft_loops``,
  ``num_draft_tokens``, ``pipeline``, ``compile_step``); every chunk and response carries
  ``"ouro": {"loops": [...], "avg_loops": ...}``.
- Decoding defaults (``ouro-mlx serve --draft-loops K --compile-step``, or
  ``--pipeline``, whose draft starts at step ``draft_loops`` - 1) apply to the
  requests they fit (a fixed depth: ``exit_threshold`` 1.0 or ``exit_at_step``;
  ``kv_mode`` "full"; no ``repetition_penalty``); others decode plainly, which gives
  the same tokens. A request's own field always wins (``null`` turns a default off),
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
    max_active: int = 16


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
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    _content = field_validator("content")(unicode_text)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by both completion routes. Unknown fields are ignored, as
    OpenAI clients send many; known ones are checked."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
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


DECODING_FIELDS = ("draft_loops", "num_draft_tokens", "pipeline", "compile_step")


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] = Field(min_length=1)

    _prompt = field_validator("prompt")(unicode_text)


# -- the engine: one thread that owns the model -----------------------------------


@dataclass
class Event:
    """One generated token as the engine hands it to a handler."""

    text: str
    token: int
    loops: int
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int


@dataclass
class Job:
    ids: list[int]
    options: dict
    loop: asyncio.AbstractEventLoop
    model: Any = None  # the base model or an adapter's copy
    adapter: str | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0
    first: Any = None  # the first item, read before a stream's headers go out

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

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody listens
            self.cancelled.set()


class _Done:
    pass


DONE = _Done()


class Engine:
    """Runs queued jobs on one thread, one token per active job in turn."""

    def __init__(self, model, tokenizer, *, prompt_cache: PromptCache | None = None,
                 max_active: int = 16, max_queue: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.max_active, self.max_queue = max_active, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active = 0
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
        runs: list[tuple[Job, Any, list]] = []
        while True:
            try:
                while len(runs) < self.max_active:
                    job = self.jobs.get(block=not runs)
                    if job is None:
                        return
                    try:
                        run = self._start(job)
                    except Exception as e:  # e.g. a cache that cannot be built
                        job.put(e)
                        job.put(DONE)
                        continue
                    if run is not None:
                        runs.append(run)
            except queue.Empty:
                pass
            self.active = len(runs)
            for run in list(runs):
                if not self._advance(run):
                    runs.remove(run)
                    self._finish(run)
            self.active = len(runs)

    def _layout(self, job: Job) -> tuple:
        return (job.adapter, job.model._steps(job.options.get("ut_steps")),
                job.options["kv_mode"])

    def _start(self, job: Job):
        from .generation import stream_generate

        if job.cancelled.is_set():
            job.put(DONE)
            return None
        opts = dict(job.options)
        layout = self._layout(job)
        cache, cached = self.prompt_cache.fetch(layout, job.ids)
        if cache is None:
            cache = job.model.make_cache(layout[1], kv_mode=layout[2])
        job.cached_tokens = cached
        stream = stream_generate(job.model, self.tokenizer, job.ids[cached:],
                                 prompt_cache=cache, **opts)
        return job, stream, cache

    def _advance(self, run) -> bool:
        """Hand out the next token of ``run``; False when it is over."""
        job, stream, _ = run
        if job.cancelled.is_set():
            return False
        try:
            r = next(stream)
        except StopIteration:
            return False
        except Exception as e:  # a bad request found late, or a failure: its own error
            job.put(e)
            return False
        job.put(Event(r.text, r.token, r.loops, r.finish_reason,
                      r.prompt_tokens + job.cached_tokens, r.generation_tokens))
        job.ids.append(r.token)
        return r.finish_reason is None

    def _finish(self, run) -> None:
        job, stream, cache = run
        try:
            stream.close()
            self.prompt_cache.store(self._layout(job), job.ids, cache)
        except Exception:  # a cache not worth keeping; the answer is already out
            pass
        finally:
            job.put(DONE)


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
                             max_queue=self.limits.max_queue)
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

        if req.logprobs:
            raise APIError(400, "logprobs: not supported by this server.", param="logprobs")
        requested = req.max_completion_tokens or req.max_tokens
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
        return dict(
            **loop,
            kv_mode=req.kv_mode,
            max_tokens=requested or min(limit, 512),
            sampler=make_sampler(temp=req.temperature, top_p=req.top_p, min_p=req.min_p,
                                 top_k=req.top_k),
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

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param)
        if len(ids) > self.max_prompt:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this server "
                           f"takes at most {self.max_prompt}.", param=param,
                           code="context_length_exceeded")
        return ids

    def submit(self, ids: list[int], options: dict, adapter: str | None) -> Job:
        job = Job(list(ids), options, asyncio.get_running_loop(), self.variant(adapter),
                  adapter)
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
        text = Assembler(tokenizer, req.stops(), think=True, prompt=ids)
        job = server.submit(ids, options, req.adapter)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.model_id}
        if req.stream:
            await job.start(request)
            return StreamingResponse(
                with_errors(stream_chat(job, text, head, req, request)),
                media_type="text/event-stream")
        return await collect(job, text, request, lambda e, loops, finish: {
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": text.content,
                                     **({"reasoning": text.reasoning}
                                        if text.reasoning else {})}}],
            "usage": usage(e.prompt_tokens, e.generation_tokens, job.cached_tokens),
            "ouro": ouro_field(loops, loops)})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        options = server.options(req)
        prompt = req.prompt
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_text(tokenizer, prompt)
        else:
            vocab = model.args.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab}).",
                               param="prompt")
            ids = list(prompt)
        ids = server.check_prompt(ids, "prompt")
        text = Assembler(tokenizer, req.stops(), think=False)
        job = server.submit(ids, options, req.adapter)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.model_id}
        if req.stream:
            await job.start(request)
            return StreamingResponse(
                with_errors(stream_completion(job, text, head, request)),
                media_type="text/event-stream")
        return await collect(job, text, request, lambda e, loops, finish: {
            **head, "object": "text_completion",
            "choices": [{"index": 0, "text": text.content, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(e.prompt_tokens, e.generation_tokens, job.cached_tokens),
            "ouro": ouro_field(loops, loops)})

    return app


async def collect(job: Job, text: Assembler, request: Request, build) -> dict:
    """A whole (non-streamed) response: every token, then ``build(last, loops, finish)``."""
    loops, last, finish = [], None, "length"
    agen = events(job, request)
    try:
        async for e in agen:
            last = e
            loops.append(e.loops)
            text.add(e.token, e.text, e.finish_reason is not None)
            if text.stopped:
                finish = "stop"
                break
            if e.finish_reason:
                finish = e.finish_reason
    finally:
        await agen.aclose()
    if last is None:
        raise APIError(500, "Generation produced nothing.", type="server_error")
    return build(last, loops, finish)


async def stream_chat(job: Job, text: Assembler, head: dict, req: ChatRequest,
                      request: Request) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk"}
    loops: list[int] = []
    yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]})
    async for chunk in stream_tokens(job, text, request, loops):
        e, content, reasoning, finish = chunk
        delta = {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning"] = reasoning
        body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "ouro": ouro_field([e.loops], loops)}
        if finish:
            body["usage"] = usage(e.prompt_tokens, e.generation_tokens, job.cached_tokens)
        yield sse(body)


async def stream_completion(job: Job, text: Assembler, head: dict,
                            request: Request) -> AsyncIterator[str]:
    base = {**head, "object": "text_completion"}
    loops: list[int] = []
    async for e, content, _, finish in stream_tokens(job, text, request, loops):
        body = {**base, "choices": [{"index": 0, "text": content, "logprobs": None,
                                     "finish_reason": finish}],
                "ouro": ouro_field([e.loops], loops)}
        if finish:
            body["usage"] = usage(e.prompt_tokens, e.generation_tokens, job.cached_tokens)
        yield sse(body)


async def stream_tokens(job: Job, text: Assembler, request: Request, loops: list[int]):
    """(event, content delta, reasoning delta, finish_reason) per token; an error
    after the stream began becomes an error chunk (the status is already sent)."""
    agen = events(job, request)
    try:
        async for e in agen:
            loops.append(e.loops)
            content, reasoning = text.add(e.token, e.text, e.finish_reason is not None)
            finish = "stop" if text.stopped else e.finish_reason
            yield e, content, reasoning, finish
            if finish:
                break
    finally:
        await agen.aclose()


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
