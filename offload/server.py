"""`offload serve`: the OpenAI API over one engine, for the clients people already use.

One model; as many requests at once as the engine has slots (`--parallel`), the rest waiting in
arrival order in a bounded queue (more than `max_queue` waiting: 429). One worker
(`Service.work`; the main thread under `offload serve`, uvicorn's event loop on another) runs
the requests on the slots together (`offload.scheduler`: one forward pass a step for all of
them, a new prompt read in chunks between the answers' tokens), handing text back to each
request's event loop as it is generated (a streamed chunk per token, empty while a character or
a possible stop string is incomplete). A client that goes away frees its slot before the next
step; a waiting request takes it then.

Prefix reuse is each slot's `Session` (`offload.session`): the live sequence when a prompt
continues it, else a snapshot, taken at each prompt's last message boundary and at its end (an
edited last message or a regenerated answer resumes there); `--snapshots` of them are kept per
slot, and a prompt goes to the free slot that holds the most of it.
`usage.prompt_tokens_details.cached_tokens` counts the prompt tokens that were not prefilled.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /slots, POST /tokenize, POST /detokenize. Errors have OpenAI's JSON shape and status codes.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from offload.engine import Engine
from offload.errors import OffloadError
from offload.sampling import Sampler, SamplingParams, TokenLogprobs
from offload.scheduler import Request as EngineRequest, Scheduler
from offload.tokenizer import RENDER_VARIABLES, ThinkingFilter, Tokenizer, partial_suffix
from offload.structured import Constraint, GrammarError, Grammars
from offload.tools import FORMATS, ToolCall, ToolCallReader, history_arguments, template_format

DEFAULT_MAX_QUEUE = 16
DEFAULT_SNAPSHOTS = 4
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
# what the server itself gives a chat template: not for a request's chat_template_kwargs to set
TEMPLATE_VARIABLES = RENDER_VARIABLES | {"tools"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                                       "param": self.param, "code": self.code}}, status_code=self.status)


# --- requests -------------------------------------------------------------------------------------

class _Strict(BaseModel):
    """Known fields must have the right type (strict: no "0.7" for a number); unknown ones are
    ignored, as clients send fields a server may not use."""
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class Message(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, name, tool_call_id reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class Generation(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch's generator takes
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}


class ChatRequest(Generation):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: str | dict[str, Any] | None = None  # "auto", "none", "required" or {"function": {"name"}}
    parallel_tool_calls: bool | None = None  # accepted: the model may write several calls either way
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}


class CompletionRequest(Generation):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(_Strict):
    content: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(_Strict):
    tokens: list[int]


# --- what the worker hands a request's loop ---------------------------------------------------------

@dataclass(frozen=True)
class Text:
    """Answer text (one event per token: empty while a character or a stop string is incomplete)."""
    text: str
    thinking: bool = False  # inside a <think> block: reasoning_content


@dataclass(frozen=True)
class CallStart:
    """A tool call the model wrote: its id and name (its arguments follow)."""
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str  # a fragment of the call's arguments, JSON text


@dataclass(frozen=True)
class Done:
    finish: str  # "stop", "length", "tool_calls" or "cancelled"


@dataclass(frozen=True)
class Failed:
    message: str


Event = Text | CallStart | CallArguments | TokenLogprobs | Done | Failed  # TokenLogprobs: a token's, before its text


# --- the worker ------------------------------------------------------------------------------------

@dataclass(eq=False)  # each job is itself (kept in a set while it runs)
class Job:
    """One request on its way through the worker; events go back to the request's loop."""
    prompt: list[int]
    boundary: int  # the last message boundary in `prompt` (a snapshot point), or 0
    sampling: SamplingParams
    max_tokens: int
    stops: list[str]
    chat: bool  # split <think> ... </think> into reasoning_content
    thinking: bool  # the prompt opens a <think> block
    loop: asyncio.AbstractEventLoop
    tool_calls: ToolCallReader | None = None  # reads calls out of the answer (a chat request with tools)
    logprobs: int | None = None  # each token's log-probability and this many alternatives (None: none)
    constraint: Constraint | None = None  # the grammar each draw keeps to (structured output)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached: int = 0
    completion_tokens: int = 0

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class StopStrings:
    """Generated text with `stop` strings cut out: text is held back while it may be the start of
    one; the text before the first one found is the end."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def __call__(self, text: str) -> tuple[str, bool]:
        """-> (text ready to send, whether a stop string ended it)."""
        self.pending += text
        found = [at for at in (self.pending.find(s) for s in self.stops) if at >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        keep = max((partial_suffix(self.pending, s) for s in self.stops), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Service:
    """The engine behind the API: a bounded queue, one engine thread running the requests on the
    engine's slots together (`offload.scheduler`), prefix reuse per slot."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, defaults: SamplingParams,
                 max_queue: int = DEFAULT_MAX_QUEUE, snapshots: int = DEFAULT_SNAPSHOTS, api_key: str | None = None,
                 tool_format: str | None = None):
        if tool_format is not None and tool_format not in FORMATS:
            raise OffloadError(f"tool call format {tool_format!r}: use one of {', '.join(FORMATS)}")
        self.engine = engine
        # how the model writes a tool call: as its chat template renders one, unless told
        self.tool_format = tool_format or template_format(tokenizer.chat_template)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.defaults = defaults
        self.max_queue = max_queue
        self.scheduler = Scheduler(engine, snapshots)
        self.api_key = api_key
        self.created = int(time.time())
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # submitted, not yet on a slot
        self.lock = threading.Lock()
        self.active: set[Job] = set()  # on a slot
        self.slot_status = self.scheduler.status()  # what /slots says: the engine thread's copy, after each step
        self.worker: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        """Requests answered at once: the engine's slots."""
        return self.scheduler.capacity

    def start(self) -> None:
        """Run the jobs on a thread of their own (`work` runs them on the calling thread)."""
        self.worker = threading.Thread(target=self.work, name="offload-engine", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        """Cancel what runs; `work` returns when it is done."""
        with self.lock:
            active = list(self.active)
        for job in active:
            job.cancel()
        self.jobs.put(None)
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker.join(timeout=30)

    @property
    def grammars(self) -> Grammars:
        """Grammars over the model's tokens, built on the first request that needs one (about a
        second for a 150k vocabulary: routes call it off the event loop)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = self._build_grammars()
        return self._grammars

    def _build_grammars(self) -> Grammars:
        stops = self.engine.stop_ids
        if not stops:
            raise ApiError(400, "structured output needs an end-of-answer token, and this model has none "
                                "(no eos_token_id in generation_config.json)", param="response_format")
        eos = self.tokenizer.special_token("eos_token")
        end = self.tokenizer.backend.token_to_id(eos) if eos else None
        return Grammars(self.tokenizer, self.engine.args.vocab_size, end if end in stops else min(stops))

    def submit(self, job: Job) -> None:
        with self.lock:
            # requests submitted or running beyond the slots: those that would wait, this one included
            waiting = max(0, self.waiting + len(self.active) + 1 - self.capacity)
            if waiting > self.max_queue:
                raise ApiError(429, f"the server is busy: every slot is taken and {waiting - 1} requests are "
                                    f"waiting (--max-queue {self.max_queue}); retry later", code="queue_full")
            self.waiting += 1
        self.jobs.put(job)

    def work(self) -> None:
        """Run jobs as they come until `stop`: a new job takes a free slot at the next step.
        `offload serve` runs this on the main thread: the kernels' OpenMP threads spin-wait between
        parallel regions only for the first thread's team when the cores are all in use, and decode
        on another thread is ~30% slower on 2 cores."""
        scheduler = self.scheduler
        stopping = False
        while not (stopping and scheduler.idle):
            while not stopping and scheduler.free:
                try:
                    job = self.jobs.get(block=scheduler.idle)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    self._start(job)
            try:
                scheduler.tick()
            except Exception as error:  # a fault outside any one request's: end them all, keep serving
                scheduler.fail_all(error)
            status = scheduler.status()
            with self.lock:
                self.slot_status = status

    def _start(self, job: Job) -> None:
        with self.lock:
            self.waiting -= 1
            if job.cancelled.is_set():  # its client left while it waited
                return
            self.active.add(job)
        request = _Reply(self, job).request
        try:
            self.scheduler.submit(request)
        except Exception as error:
            request.error = str(error) if isinstance(error, OffloadError) else f"{type(error).__name__}: {error}"
            request.on_end("error")

    def _done(self, job: Job) -> None:
        with self.lock:
            self.active.discard(job)


class _Reply:
    """A job's answer as its tokens come: text (stop strings cut, reasoning split off, tool calls
    read out), logprobs, and the end; sent to the job's events."""

    def __init__(self, service: Service, job: Job):
        self.service, self.job = service, job
        self.detokenize = service.tokenizer.detokenizer()
        self.stops = StopStrings(job.stops)
        self.thinking = ThinkingFilter(job.thinking) if job.chat else None
        self.sampler = Sampler(job.sampling, job.logprobs, job.constraint)
        self.request = EngineRequest(job.prompt, self.sampler, job.max_tokens, self.token, self.end,
                                     job.cancelled.is_set, job.boundary)

    def token(self, token: int) -> str | None:
        job = self.job
        job.completion_tokens += 1
        if token in self.service.engine.stop_ids:
            return None
        if self.sampler.last is not None:  # before the token's text: its text may be held back, never its logprob
            job.emit(self.sampler.last)
        text, stopped = self.stops(self.detokenize(token))
        self.send(text)  # one event per token, empty while a character or a stop string is incomplete
        return "stop" if stopped else None

    def end(self, reason: str) -> None:
        job = self.job
        try:
            if reason == "error":
                job.emit(Failed(self.request.error or "the request failed"))
                return
            job.cached = self.request.cached
            tail = self.stops.flush()  # text held back as the start of a stop string that never came
            if tail:
                self.send(tail)
            if self.thinking is not None:
                for is_thinking, piece in self.thinking.flush():
                    self.emit(is_thinking, piece)
            if job.tool_calls is not None:
                for part in job.tool_calls.flush():
                    self.emit_part(part)
                if job.tool_calls.calls and reason == "stop":
                    reason = "tool_calls"
            job.emit(Done(reason))
        finally:
            self.service._done(job)

    def send(self, text: str) -> None:
        pieces = [(False, text)] if self.thinking is None else self.thinking(text) or [(self.thinking.thinking, "")]
        for is_thinking, piece in pieces:
            self.emit(is_thinking, piece)

    def emit(self, is_thinking: bool, text: str) -> None:
        job = self.job
        if is_thinking or job.tool_calls is None:
            job.emit(Text(text, is_thinking))
            return
        for part in job.tool_calls(text) or [""]:  # an event per token, as for plain text
            self.emit_part(part)

    def emit_part(self, part: str | ToolCall) -> None:
        if isinstance(part, ToolCall):  # the name first, then the arguments
            self.job.emit(CallStart(part.index, part.id, part.name))
            self.job.emit(CallArguments(part.index, part.arguments))
        else:
            self.job.emit(Text(part))


# --- the app -------------------------------------------------------------------------------------

def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="offload", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  on_shutdown=[service.stop])
    for kind, handler in ((ApiError, _api_error), (RequestValidationError, _invalid), (HTTPException, _http_error),
                          (Exception, _unexpected)):
        app.add_exception_handler(kind, handler)
    engine, tokenizer = service.engine, service.tokenizer

    def authorized(request: Request) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {service.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's "
                                "--api-key", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": service.waiting, "slots": service.capacity,
                "busy": len(service.active)}

    @app.get("/slots", dependencies=[Depends(authorized)])
    async def slots():
        with service.lock:
            return {"slots": service.slot_status}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "offload"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest):
        tools = _tools(body)
        prompt, boundary = _rendered(service, body.messages, tools, body.chat_template_kwargs)
        job = _job(service, body, prompt, boundary, True, body.max_completion_tokens or body.max_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        job.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job.constraint = await asyncio.to_thread(_constraint, service, body, tools, job.thinking)  # compiles a grammar
        if tools and service.tool_format is not None:
            job.tool_calls = ToolCallReader(service.tool_format, tools)
        service.submit(job)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "created": created, "model": service.model_name}
        if body.stream:
            def chunk(event, finish, entries=()):
                logprobs = _chat_logprobs(tokenizer, entries) if entries else None
                match event:
                    case None:
                        delta = {} if finish else {"role": "assistant", "content": ""}
                    case CallStart(index, ident, name):
                        delta = {"tool_calls": [{"index": index, "id": ident, "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}
                    case CallArguments(index, text):
                        delta = {"tool_calls": [{"index": index, "function": {"arguments": text}}]}
                    case Text(text, thinking):
                        delta = {"reasoning_content" if thinking else "content": text}
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": _finish(finish)}]}

            return _streamed(job, chunk, bool(body.stream_options and body.stream_options.include_usage), True)
        whole = await _answer(job)
        content = "".join(whole.content)
        message = {"role": "assistant", "content": content}
        if whole.calls:  # text beside calls is rare and mostly the model's spacing
            message.update(content=content.strip() or None, tool_calls=whole.calls)
        if whole.reasoning:
            message["reasoning_content"] = "".join(whole.reasoning)
        logprobs = _chat_logprobs(tokenizer, whole.logprobs) if job.logprobs is not None else None
        return {**base, "object": "chat.completion", "usage": _usage(job),
                "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                             "finish_reason": _finish(whole.finish)}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if ids and (min(ids) < 0 or max(ids) >= engine.args.vocab_size):
            raise ApiError(400, f"prompt: token ids must be in [0, {engine.args.vocab_size})", param="prompt")
        job = _job(service, body, ids, 0, False, body.max_tokens or 16)
        job.logprobs = body.logprobs
        job.constraint = await asyncio.to_thread(_constraint, service, body, None, False)
        service.submit(job)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}
        if body.stream:
            offset = 0

            def chunk(event, finish, entries=()):
                nonlocal offset
                logprobs = _completion_logprobs(tokenizer, entries, offset) if entries else None
                offset += sum(len(token) for token in logprobs["tokens"]) if logprobs else 0
                text = event.text if isinstance(event, Text) else ""
                return {**base, "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _finish(finish)}]}

            return _streamed(job, chunk, bool(body.stream_options and body.stream_options.include_usage), False)
        whole = await _answer(job)
        logprobs = _completion_logprobs(tokenizer, whole.logprobs, 0) if job.logprobs is not None else None
        return {**base, "object": "text_completion", "usage": _usage(job),
                "choices": [{"index": 0, "text": "".join(whole.content), "logprobs": logprobs,
                             "finish_reason": _finish(whole.finish)}]}

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest):
        if (body.content is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of content (text) or messages (rendered with the chat template)")
        if body.content is not None:
            return {"tokens": tokenizer.encode(body.content)}
        return {"tokens": _rendered(service, body.messages, None, None)[0]}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest):
        if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= tokenizer.vocab_size):
            raise ApiError(400, f"tokens must be in [0, {tokenizer.vocab_size})", param="tokens")
        return {"content": tokenizer.decode(body.tokens)}

    return app


# --- requests to jobs, events to responses: the routes' parts ---------------------------------------

async def _api_error(_request: Request, error: ApiError):
    return error.response()


async def _invalid(_request: Request, error: RequestValidationError):
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                        .rstrip(": "), code="invalid_json").response()
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return ApiError(400, f"{where}: {first.get('msg', 'invalid')}", param=where).response()


async def _http_error(request: Request, error: HTTPException):
    if error.status_code == 404:
        return ApiError(404, f"no route {request.method} {request.url.path}; see /v1/models, "
                             "/v1/chat/completions, /v1/completions", code="not_found").response()
    return ApiError(error.status_code, str(error.detail)).response()


async def _unexpected(_request: Request, error: Exception):  # a bug: still OpenAI's shape, never a bare 500
    return ApiError(500, f"internal error: {type(error).__name__}: {error}").response()


def _sampling(service: Service, body: Generation) -> SamplingParams:
    """The request's sampling fields over the server's defaults (generation_config.json)."""
    given = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                   "presence_penalty", "frequency_penalty", "seed")
             if getattr(body, name) is not None}
    try:
        return service.defaults.with_(**given)
    except OffloadError as error:
        raise ApiError(400, str(error).split(";")[0]) from None


def _job(service: Service, body: Generation, prompt: list[int], boundary: int, chat: bool,
         max_tokens: int | None) -> Job:
    """A request's job, its limits checked: one choice, the stop strings, a prompt that fits."""
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: this server generates one choice per request (n=1)", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    engine, tokenizer = service.engine, service.tokenizer
    room = engine.ctx - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens and the context holds {engine.ctx}: shorten it, "
                            "or restart the server with a larger --ctx", code="context_length_exceeded")
    return Job(prompt, boundary, _sampling(service, body), min(max_tokens or room, room), stops, chat,
               chat and tokenizer.opens_thinking(prompt), asyncio.get_running_loop())


def _tools(body: ChatRequest) -> list[dict[str, Any]] | None:
    """The tools the template renders: none for tool_choice "none"; each must be a function with a name."""
    choice = body.tool_choice
    if not (choice in (None, "auto", "none", "required") or isinstance(choice, dict)):
        raise ApiError(400, f"tool_choice: {choice!r} is not one of \"auto\", \"none\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if choice == "none" or not body.tools:
        if choice == "required" or isinstance(choice, dict):
            raise ApiError(400, "tool_choice asks for a call, and the request has no tools", param="tool_choice")
        return None
    for i, tool in enumerate(body.tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"] \
                or not isinstance(function.get("parameters", {}), dict) \
                or not isinstance(function.get("parameters", {}).get("properties", {}), dict):
            raise ApiError(400, f"tools[{i}]: each tool is {{\"type\": \"function\", \"function\": "
                                "{\"name\": ..., \"parameters\": {...}}}", param=f"tools.{i}")
    return body.tools


def _constraint(service: Service, body: Generation, tools: list[dict[str, Any]] | None,
                thinking: bool) -> Constraint | None:
    """The grammar a request's answer keeps to: a required or named tool call, or its
    response_format's JSON; None for free text."""
    choice, shape = getattr(body, "tool_choice", None), body.response_format
    kind = "text" if shape is None else shape.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format: type {kind!r} is not one of text, json_object, json_schema",
                       param="response_format")
    forced = tools if choice == "required" else None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        forced = [tool for tool in tools or [] if tool["function"]["name"] == name]
        if not forced:
            raise ApiError(400, "tool_choice: {\"type\": \"function\", \"function\": {\"name\": ...}} with the "
                                f"name of one of the request's tools (got {name!r})", param="tool_choice")
    if forced is None and kind == "text":
        return None
    if forced is not None and kind != "text":
        raise ApiError(400, "a required tool call and a JSON response_format cannot both shape one answer",
                       param="response_format")
    if thinking:
        raise ApiError(400, "structured output from a thinking model: its answer opens with free reasoning; "
                            "send chat_template_kwargs {\"enable_thinking\": false}", param="response_format")
    try:
        if forced is not None:
            if service.tool_format is None:
                raise ApiError(400, "tool_choice asks for a call, and this model's chat template renders none; "
                                    "give --tool-call-format", param="tool_choice")
            return service.grammars.tool_call(forced, service.tool_format)
        if kind == "json_object":
            return service.grammars.json_schema({"type": "object"})
        spec = shape.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format: json_schema needs {\"json_schema\": {\"name\": ..., "
                                "\"schema\": {...}}}", param="response_format")
        return service.grammars.json_schema(schema)
    except GrammarError as error:
        where = "tools" if forced is not None else "response_format"
        raise ApiError(400, f"{where}: the schema is not supported: {error}", param=where) from None


def _rendered(service: Service, messages: list[Message], tools,
              variables: dict | None) -> tuple[list[int], int]:
    """(prompt ids, the last message boundary in them: 0 if not a prefix)."""
    if not messages:
        raise ApiError(400, "messages is empty: give at least one message", param="messages")
    tokenizer = service.tokenizer
    plain = [_plain(m) for m in messages]
    extra = dict(variables or {})
    if reserved := sorted(TEMPLATE_VARIABLES & set(extra)):
        raise ApiError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: the server passes "
                            f"{'it' if len(reserved) == 1 else 'them'} from the request", param="chat_template_kwargs")
    if tools is not None:
        if "tools" not in (tokenizer.chat_template or ""):
            raise ApiError(400, "this model's chat template does not take tools", param="tools")
        extra["tools"] = tools
    try:
        ids = tokenizer.chat_ids(plain, **extra)
    except OffloadError as error:
        raise ApiError(400, str(error)) from None
    before = []
    if service.scheduler.snapshots and len(plain) > 1:
        try:  # only a snapshot point: a template that refuses the shorter list just gives none
            before = tokenizer.chat_ids(plain[:-1], add_generation_prompt=False, **extra)
        except OffloadError:
            pass
    return ids, len(before) if ids[:len(before)] == before else 0


def _usage(job: Job) -> dict:
    """OpenAI's usage, with the prompt tokens reused rather than prefilled as cached_tokens."""
    return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt) + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached}}


async def _events(job: Job) -> AsyncIterator[Event]:
    """The job's events until it is done; the job is cancelled if the caller stops listening."""
    try:
        while True:
            event = await job.events.get()
            yield event
            if isinstance(event, (Done, Failed)):
                return
    finally:
        job.cancel()


async def _answer(job: Job) -> Answer:
    """A whole job's answer."""
    whole = Answer()
    async for event in _events(job):
        match event:
            case Text(text, thinking):
                (whole.reasoning if thinking else whole.content).append(text)
            case CallStart(_, ident, name):
                whole.calls.append({"id": ident, "type": "function", "function": {"name": name, "arguments": ""}})
            case CallArguments(index, text):
                whole.calls[index]["function"]["arguments"] += text
            case TokenLogprobs():
                whole.logprobs.append(event)
            case Done(finish):
                whole.finish = finish
            case Failed(message):
                raise ApiError(500, f"generation failed: {message}")
    return whole


def _token_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token)
    return {"token": raw.decode(errors="replace"), "logprob": _finite(logprob), "bytes": list(raw)}


def _chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs]) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    return {"content": [{**_token_entry(tokenizer, e.token, e.logprob),
                         "top_logprobs": [_token_entry(tokenizer, *t) for t in e.top]}
                        for e in entries]}


def _completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs], offset: int) -> dict:
    """OpenAI's legacy completions shape, text offsets counted from `offset`."""
    def text(token: int) -> str:
        return tokenizer.token_bytes(token).decode(errors="replace")

    tokens = [text(e.token) for e in entries]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    tops = []
    for entry in entries:  # keyed by text: where two tokens read alike, the likelier one's
        top: dict[str, float] = {}
        for token, logprob in entry.top:
            top.setdefault(text(token), _finite(logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def _streamed(job: Job, chunk, include_usage: bool, opening: bool) -> EventSourceResponse:
    async def source():
        if opening:  # chat: the role comes first
            yield {"data": json.dumps(chunk(None, None))}
        held: list[TokenLogprobs] = []  # a token's logprobs ride on the chunk of its text
        async for event in _events(job):
            if isinstance(event, TokenLogprobs):
                held.append(event)
            elif isinstance(event, (Text, CallStart, CallArguments)):
                yield {"data": json.dumps(chunk(event, None, held))}
                held = []
            elif isinstance(event, Done):
                yield {"data": json.dumps(chunk(None, event.finish, held))}
                if include_usage:
                    yield {"data": json.dumps({**chunk(None, None), "choices": [], "usage": _usage(job)})}
            else:
                yield {"data": json.dumps({"error": {"message": f"generation failed: {event.message}",
                                                     "type": "server_error", "param": None, "code": None}})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(source(), ping=15)


def _plain(message: Message) -> dict[str, Any]:
    """A request message as the chat template reads it: content as one string."""
    plain = history_arguments(message.model_dump(exclude_none=True))
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise ApiError(400, "messages: only text content is supported by this model", param="messages")
        plain["content"] = "".join(part.text or "" for part in content)
    elif content is None:
        plain["content"] = ""
    return plain


@dataclass
class Answer:
    """A whole job's events, gathered."""
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish: str = "length"


def _finite(logprob: float) -> float:
    """A log-probability JSON can carry: a token the sampling's truncation removed (-inf) as
    OpenAI writes one, -9999.0."""
    return logprob if math.isfinite(logprob) else -9999.0


def _finish(reason: str | None) -> str | None:
    return None if reason is None else reason if reason in ("stop", "tool_calls") else "length"


class Http:
    """uvicorn serving `service`'s API on a thread of its own (the engine keeps the calling thread:
    see `Service.work`), started on construction: on `socket` (bound by the caller, so a busy port
    is said before a model loads) or on host:port (port 0: any free one). `url` is its /v1 base."""

    def __init__(self, service: Service, socket=None, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [socket] if socket else None},
                                       name="http", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise OffloadError(f"the HTTP server did not start on {host}:{port}")
            time.sleep(0.01)
        bound_host, bound_port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

