"""`qiusuo serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream server-sent events when
`stream` is true, with `usage` in the last chunk before `data: [DONE]`), GET /health (503 while the model
loads), GET /metrics (Prometheus text). Chat requests may carry `tools` / `tool_choice` and `role: "tool"` results, and
replies carry `tool_calls` (`finish_reason: "tool_calls"`), parsed from the model's markup by `qiusuo.infer.tools`;
sampling values a request leaves unset come from the checkpoint's generation_config.json (`Engine.generation`).
The engine runs in its own thread. Binds 127.0.0.1 unless told otherwise. `--lora NAME=DIR` serves a LoRA adapter
as a model of its own (`/v1/models`), requests for different adapters sharing one batch (`qiusuo.infer.runner`).

Every request field is honoured, accepted without effect, or refused with a 400 naming it (`qiusuo.infer.fields`).
/v1/completions takes the prompt forms of OpenAI's legacy API (a string, strings, token ids, lists of token ids:
one engine request per prompt, run together, choices indexed prompt x n + sample; a stream takes one prompt, which
keeps each stream one engine request) and `echo`, whose prompt logprobs come from the engine's scoring forward
(`ModelRunner.score`): what lm-evaluation-harness's `local-completions` needs (docs/serving.md, "Evaluating with
lm-evaluation-harness").

Built for careless and hostile clients as much as for good ones: one bad request never hurts another.
- Bodies are read with a size cap (413) and a deadline (408), then parsed, checked and validated here rather than
  by FastAPI, in worker threads (as is tokenising): the event loop only routes and streams, so a 5 MB prompt does
  not stall /health. Every string must be valid Unicode (JSON's `\\ud800` escapes can spell lone surrogates, which
  no tokenizer encodes) and nesting is capped; both are 400s naming the JSON path.
- Every error, from a route or not (401, 404, 405, 408, 413, 429, 500, 503, 504), has OpenAI's shape
  `{"error": {"message", "type", "param", "code"}}`; /metrics counts responses by status.
- Requests are counted when admitted, streaming or not: beyond `max_concurrency + max_queue` in flight, 429 with
  `Retry-After`. A request ends early, its sequences aborted in the engine within a step, when its client
  disconnects (Starlette watches streams; `run` watches the others), when it outlives `request_timeout`, or when
  a shutdown's drain time is over; a sample that fails in the engine fails its request alone (500, or an error
  event in a stream, which then still ends with `data: [DONE]`).
- Connections (`serve_config`): at most `max_connections` open (the next is answered 503 and closed), and
  `header_timeout` seconds for a new one to send its request line and headers. SIGTERM drains (`Server`): no new
  connections or requests, in-flight ones get `shutdown_timeout` seconds to finish, the rest end with an error
  (503, or an error event and `[DONE]`), and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, ClassVar, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from qiusuo.hf.load import check_model_folder
from qiusuo.infer import constraint, fields, tools
from qiusuo.infer.engine import Delta, Engine, PromptLogprobs, Usage
from qiusuo.infer.load import add_engine_args, engine_from_args
from qiusuo.infer.output import Completion, StopToken, ThinkSplitter
from qiusuo.infer.output import completions as join_deltas
from qiusuo.infer.sampling import ParamError, SamplingParams

log = logging.getLogger("qiusuo.serve")
MAX_JSON_DEPTH = 64  # a chat request nests 4 deep; JSON schemas of tools a few more
MAX_SAMPLES = 256  # prompts x n in one /v1/completions request (lm-eval sends its batch size, n = 1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client disconnected: nobody to answer (counted on /metrics, no response sent)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None  # None: qiusuo sends the usage chunk all the same
    include_obfuscation: bool | None = None  # accepted, not used (padding against side channels, for OpenAI)


class _Common(BaseModel):
    """The fields both generating routes honour. Each subclass's `rules` (`qiusuo.infer.fields`) remove the fields
    that cannot change the answer and refuse the others before validation; "forbid" then only backs that up."""

    model_config = ConfigDict(extra="forbid")
    rules: ClassVar[dict[str, fields.Rule]]
    route: ClassVar[str]

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    # unset: the checkpoint's generation_config.json value, else SamplingParams' default (`_params`)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict | None = None  # checked by `constraint.response_format`, so errors name the field

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage is not False


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class CompletionRequest(_Common):
    rules = fields.COMPLETIONS
    route = "/v1/completions"

    prompt: list[str | list[int]]  # one entry per prompt (`_prompts`)
    max_tokens: int | None = Field(default=None, ge=0)  # 0: with echo, the prompt (and its logprobs) only
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    skip_special_tokens: bool = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v):
        """One prompt or several, in any of the API's four forms -> a list of prompts, each text or token ids."""
        forms = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if all(_is_id(x) for x in v):
                return [v]
            if all(isinstance(x, str) for x in v) or all(isinstance(x, list) and all(map(_is_id, x)) for x in v):
                return v
        raise ValueError(f"must be {forms}" + ("; got an empty list" if v == [] else ""))


class Message(BaseModel):
    """A chat message. `content` may be OpenAI's list of parts (text parts only; joined with newlines, as vLLM
    does); `developer` is OpenAI's newer name for `system`, and is rendered as one. Assistant `tool_calls` and tool
    results (`role: "tool"`, `tool_call_id`) are checked by `tools.check_messages`."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning (DeepSeek's encodings render it back)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if v is None or isinstance(v, str):
            return v
        texts = []
        for i, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: only text parts ({{'type': 'text', 'text': '...'}}) are supported, "
                                 f"got type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    def for_template(self) -> dict:
        extra = {k: v for k in ("tool_calls", "tool_call_id", "name", "reasoning_content")
                 if (v := getattr(self, k)) is not None}
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content, **extra}


class ChatRequest(_Common):
    rules = fields.CHAT
    route = "/v1/chat/completions"

    messages: list[Message] = Field(min_length=1)
    tools: list[Any] | None = None  # checked by `tools.check_tools`, so errors name the field
    tool_choice: str | dict | None = None
    reasoning_effort: str | None = None  # DeepSeek-V4's "high" / "max"; templates get it as a variable
    chat_template_kwargs: dict | None = None  # {"thinking": true}: the reply opens in thinking mode (vLLM's)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def check_json(obj: Any) -> None:
    """400 naming the path of the first string (key or value) that is not valid Unicode, or of a value nested
    deeper than MAX_JSON_DEPTH (iterative: a deep body must not recurse here either)."""
    stack = [(obj, "", 1)]
    while stack:
        x, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{path or 'the body'}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                           param=path or None, code="invalid_json")
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            p = f"{path}.{k}" if path else str(k)
            for s in (k, v):
                if isinstance(s, str) and not s.isascii():
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise APIError(400, f"{p}: not valid Unicode: a lone surrogate U+{ord(s[e.start]):04X} at "
                                       f"character {e.start}; send UTF-8 text (\\uD800-\\uDFFF escapes only in "
                                       "high-low pairs)", param=p, code="invalid_unicode") from None
            if isinstance(v, (dict, list)):
                stack.append((v, p, depth + 1))


def decode_body(body: bytes, kind: type[BaseModel]) -> Any:
    """The body as a `kind` (runs in a worker thread); any malformed or invalid input is a 400."""
    try:
        obj = json.loads(body)
    except RecursionError:
        raise APIError(400, f"the body is JSON nested deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, bytes that are not UTF-8, integers of more than 4300 digits
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    check_json(obj)
    try:
        obj = fields.check(obj, kind.rules, kind.route)
    except fields.FieldError as e:
        raise APIError(400, str(e), param=e.param, code="unsupported_parameter") from None
    try:
        req = kind.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {msg}", param=param, code="invalid_value") from None
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only with stream: true", param="stream_options", code="invalid_value")
    return req


class _Slot:
    """One admitted request's place in the in-flight count, given back exactly once: when its route returns or
    fails, or, for a stream, when the response has been sent or abandoned (`_SlotStream`)."""

    def __init__(self, st: "ServerState"):
        self.st, self.held, self.streaming = st, True, False
        st.inflight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.st.inflight -= 1

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc) -> None:
        if not self.streaming:
            self.release()

    def stream(self, events) -> StreamingResponse:
        """The server-sent events response that holds this slot until it ends; `events` yields `data:` lines."""
        self.streaming = True
        return _SlotStream(_sse_guard(self.st, events), self)


class _SlotStream(StreamingResponse):
    def __init__(self, events, slot: _Slot):
        super().__init__(events, media_type="text/event-stream")
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def _sse_guard(st: "ServerState", events):
    """A stream's events, ended by an error event when the request fails, then always `data: [DONE]`."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        st.stream_errors += 1
        yield _sse(e.body())
    except Exception:  # a bug mid-stream: the status is sent already; say so in the stream and end it cleanly
        log.exception("error in a stream")
        st.stream_errors += 1
        yield _sse(APIError(500, "internal error while streaming; see the server log", "server_error").body())
    yield "data: [DONE]\n\n"


class ServerState:
    """What the routes share (`app.state.qiusuo`): the engine (None while loading), limits, counters for /metrics,
    the drain state, and the checks every /v1 route makes."""

    def __init__(self, engine: Engine | None, model_name: str, api_key: str | None, max_concurrency: int,
                 max_queue: int, max_body_bytes: int | None, body_timeout: float, request_timeout: float | None,
                 shutdown_timeout: float):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.max_body_bytes, self.body_timeout, self.request_timeout = max_body_bytes, body_timeout, request_timeout
        self.shutdown_timeout = shutdown_timeout
        self.inflight = 0
        self.responses: Counter[int] = Counter()  # by HTTP status
        self.disconnects = self.stream_errors = 0
        self.draining = False
        self.stopping = asyncio.Event()  # set when the drain time is over: in-flight requests are stopped
        self.created = int(time.time())
        # parsing and tokenising, off the event loop; few threads, so a burst of huge bodies queues, not piles up
        self.workers = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="qiusuo-parse")

    async def in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def ready(self, request: Request) -> Engine:
        """The engine, once the API key checks out and the model has loaded."""
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", "service_unavailable",
                           headers={"Retry-After": "5"})
        return self.engine

    def admit(self) -> _Slot:
        """A place among the requests in flight, or 429 (503 while shutting down)."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance or later",
                           "service_unavailable", code="server_shutdown", headers={"Retry-After": "5"})
        if self.inflight >= self.max_concurrency + self.max_queue:
            raise APIError(429, f"the server is busy ({self.inflight} requests in flight, queue full); retry later",
                           "rate_limit_exceeded", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        return _Slot(self)

    async def parse(self, request: Request, kind: type[BaseModel]) -> Any:
        """The body as a `kind`: read within the size cap and deadline, parsed in a worker thread; 404 for an
        unknown model."""
        limit = self.max_body_bytes or max(1 << 20, 16 * self.engine.max_model_len)  # 16 bytes per token of context
        closing = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused
        too_big = APIError(413, f"the body is larger than this server's limit of {limit} bytes (--max-body-mb)",
                           code="request_too_large", headers=closing)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise too_big

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)",
                           code="request_timeout", headers=closing) from None
        except ClientDisconnect:
            raise ClientGone() from None
        req = await self.in_worker(decode_body, bytes(body), kind)
        if req.model != self.model_name and req.model not in self.engine.adapters:
            served = ", ".join(repr(n) for n in [self.model_name, *self.engine.adapters])
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return req

    def adapter(self, model: str) -> str | None:
        """The LoRA adapter a request's `model` names (`qiusuo serve --lora NAME=DIR`); None: the base model."""
        return None if model == self.model_name else model

    def begin_drain(self) -> None:
        """Shutting down (on the event loop's thread): refuse new requests; stop the in-flight ones after
        `shutdown_timeout` seconds."""
        if not self.draining:
            self.draining = True
            asyncio.get_running_loop().call_later(self.shutdown_timeout, self.stopping.set)

    async def run(self, request: Request, engine: Engine, ids: list[int], params: SamplingParams,
                  watch_disconnect: bool, adapter: str | None = None):
        """Deltas then the Usage of one request. Ends early (aborting it in the engine) when the client
        disconnects (`watch_disconnect`: streams are watched by Starlette), `request_timeout` seconds after it
        was handed to the engine, or when the drain time is over; those, and a sample that failed in the engine,
        raise instead of the Usage."""
        rid, why = uuid.uuid4().hex, []
        watcher = asyncio.create_task(self._watch(request if watch_disconnect else None, engine, rid, why))
        failed = None
        try:
            async for d in engine.stream(ids, params, request_id=rid, adapter=adapter):
                if isinstance(d, Usage):
                    watcher.cancel()
                    if why == ["disconnect"]:
                        raise ClientGone()
                    if why == ["timeout"]:
                        raise APIError(504, f"the request ran longer than this server's limit of "
                                       f"{self.request_timeout:g} s (--request-timeout) and was stopped", "timeout",
                                       code="request_timeout")
                    if why == ["shutdown"]:
                        raise APIError(503, f"the server is shutting down; this request was stopped after "
                                       f"{self.shutdown_timeout:g} s of draining; retry it", "service_unavailable",
                                       code="server_shutdown", headers={"Retry-After": "5"})
                    if failed:
                        raise APIError(500, failed, "server_error", code="generation_failed")
                elif isinstance(d, Delta) and d.error:
                    failed = d.error
                yield d
        finally:
            watcher.cancel()

    async def _watch(self, request: Request | None, engine: Engine, rid: str, why: list[str]) -> None:
        waits = {asyncio.ensure_future(self.stopping.wait()): "shutdown"}
        if request is not None:
            waits[asyncio.ensure_future(_disconnected(request))] = "disconnect"
        try:
            done, _ = await asyncio.wait(waits, timeout=self.request_timeout, return_when=asyncio.FIRST_COMPLETED)
            why.append(waits[done.pop()] if done else "timeout")
            engine.abort(rid)
        finally:
            for t in waits:
                t.cancel()

    async def collect(self, request: Request, engine: Engine, ids: list[int], params: SamplingParams,
                      adapter: str | None = None) -> tuple[list[Completion], Usage, PromptLogprobs | None]:
        """A whole request: each sample's `Completion` (joined as `Engine.generate` joins them), the Usage, and
        the prompt's logprobs when `params` asked for them."""
        pieces: dict[int, list[Delta]] = {}
        usage = scores = None
        async for d in self.run(request, engine, ids, params, watch_disconnect=True, adapter=adapter):
            if isinstance(d, Usage):
                usage = d
            elif isinstance(d, PromptLogprobs):
                scores = d
            else:
                pieces.setdefault(d.index, []).append(d)
        return join_deltas(pieces), usage, scores


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine | None, model_name: str, api_key: str | None = None, max_concurrency: int = 32,
               max_queue: int = 64, *, max_body_bytes: int | None = None, body_timeout: float = 10.0,
               request_timeout: float | None = None, shutdown_timeout: float = 5.0):
    """The FastAPI app. Pass engine=None and set `app.state.qiusuo.engine` later to serve /health 503 while the
    model loads. The engine's thread is started here. max_body_bytes None: 16 bytes per token of context, at
    least 1 MiB."""
    app = FastAPI(title="qiusuo")
    st = app.state.qiusuo = ServerState(engine, model_name, api_key, max_concurrency, max_queue, max_body_bytes,
                                        body_timeout, request_timeout, shutdown_timeout)
    if engine is not None:
        engine.start()
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(_Guard, state=st)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


class _Guard:
    """ASGI middleware around the routes: counts every response by status for /metrics, and turns an exception
    nothing handled into an OpenAI-shaped 500 (logged with its traceback), so a bug answers like any error."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.state.responses[message["status"]] += 1
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except ClientGone:
            self.state.disconnects += 1
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            e = APIError(500, "internal error; see the server log", "server_error")
            await JSONResponse(e.body(), status_code=500)(scope, receive, counted)


def _state(request: Request) -> ServerState:
    return request.app.state.qiusuo


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Routing's own errors (404 unknown path, 405 wrong method) in OpenAI's shape."""
    what = {404: f"no route {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions",
            405: f"{request.method} is not allowed on {request.url.path}; use "
                 + (e.headers or {}).get("Allow", "another method")}.get(e.status_code, str(e.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(APIError(e.status_code, what, code=code).body(), status_code=e.status_code, headers=e.headers)


# ---- small routes ----

async def health(request: Request):
    st = _state(request)
    if st.engine is None or st.draining:
        return JSONResponse({"status": "loading" if st.engine is None else "shutting down"}, status_code=503)
    return {"status": "ok"}


async def models(request: Request):
    st = _state(request)
    engine = st.ready(request)
    base = {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "qiusuo",
            "max_model_len": engine.max_model_len}
    # each LoRA adapter is a model of its own, named as vLLM names them (`parent`: the base it adapts)
    return {"object": "list", "data": [base, *({**base, "id": name, "root": name, "parent": st.model_name}
                                               for name in engine.adapters)]}


async def metrics(request: Request):
    """Prometheus text: HTTP counters, and the engine's once it has loaded."""
    st = _state(request)
    e = st.engine
    lines = []

    def put(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP qiusuo_{name} {help_}", f"# TYPE qiusuo_{name} {kind}", f"qiusuo_{name} {value}"])

    put("http_inflight_requests", "gauge", "requests admitted and not yet answered", st.inflight)
    lines += ["# HELP qiusuo_http_responses_total responses by HTTP status (streams count once, at their start)",
              "# TYPE qiusuo_http_responses_total counter"]
    lines += [f'qiusuo_http_responses_total{{status="{s}"}} {n}' for s, n in sorted(st.responses.items())]
    put("http_disconnects_total", "counter", "requests whose client went away before the answer", st.disconnects)
    put("http_stream_errors_total", "counter", "streams ended by an error event", st.stream_errors)
    if e is not None:
        s = e.stats
        put("requests_total", "counter", "requests the engine accepted", s["requests"])
        put("prompt_tokens_total", "counter", "prompt tokens accepted", s["prompt_tokens"])
        put("generation_tokens_total", "counter", "tokens generated", s["generation_tokens"])
        put("sequences_aborted_total", "counter", "sequences stopped before their end", s["aborted"])
        put("sequences_failed_total", "counter", "sequences that failed (could not be sampled)", s["failed"])
        put("queue_depth", "gauge", "sequences waiting for a batch slot or cache blocks", len(e.waiting))
        put("running_sequences", "gauge", "sequences in the running batch", len(e.running))
        put("cache_blocks_used", "gauge", "latent cache blocks held by sequences", e.pool.used_blocks)
        put("cache_blocks_total", "gauge", "latent cache blocks in the pool", e.pool.num_blocks)
        put("cache_usage_ratio", "gauge", "fraction of cache blocks in use", e.pool.used_blocks / e.pool.num_blocks)
        put("prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
            e.pool.hit_tokens)
        if e.runner.K:  # speculative decoding
            c = e.runner.counters
            put("spec_verify_steps_total", "counter", "sequence-steps that verified drafts", c.steps)
            put("spec_emitted_tokens_total", "counter", "tokens those steps emitted", c.emitted)
            put("spec_mean_tokens_per_step", "gauge", "tokens emitted per verified sequence-step",
                c.emitted / max(c.steps, 1))
            lines += ["# HELP qiusuo_spec_acceptance_rate drafts accepted / drafted, by draft position",
                      "# TYPE qiusuo_spec_acceptance_rate gauge"]
            lines += [f'qiusuo_spec_acceptance_rate{{position="{j + 1}"}} {a / max(d, 1)}'
                      for j, (a, d) in enumerate(zip(c.accepted, c.drafted))]
        lines += ["# HELP qiusuo_time_to_first_token_seconds time from arrival to the first token",
                  "# TYPE qiusuo_time_to_first_token_seconds summary",
                  f"qiusuo_time_to_first_token_seconds_sum {s['ttft_sum']}",
                  f"qiusuo_time_to_first_token_seconds_count {s['ttft_count']}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


# ---- helpers of the generating routes ----

def _params(req: _Common, max_tokens: int | None, prompt_len: int, engine: Engine, logprobs: int | None,
            prompt_param: str, **route) -> SamplingParams:
    """The request's sampling values over the checkpoint's generation_config.json defaults (`engine.generation`);
    `route`: SamplingParams values the route sets."""
    sampling = dict(engine.generation.sampling)
    sampling.update({k: v for k in ("temperature", "top_p", "top_k", "min_p") if (v := getattr(req, k)) is not None})
    default_max = sampling.pop("max_tokens", None)
    if max_tokens is None:
        max_tokens = default_max or max(engine.max_model_len - prompt_len, 1)
    try:
        p = SamplingParams(max_tokens=max_tokens, **sampling, seed=req.seed, stop=req.stop or [], n=req.n,
                           stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs, **route)
    except ParamError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    try:
        engine.check_fits(prompt_len, p)
    except ValueError as e:
        raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
    return p


def _grammar(engine: Engine, req: _Common, chat: tools.ChatPrompt | None) -> constraint.Grammar | None:
    """The constraint a request asks for (`constraint.request_grammar`), compiled here (worker thread) so that a bad
    schema, regex or grammar is a 400 naming its field."""
    try:
        g = constraint.request_grammar(engine.tokenizer, req.response_format, chat, getattr(req, "tools", None),
                                       getattr(req, "tool_choice", None))
        if g is not None:
            engine.grammars.compile(g)
    except constraint.ConstraintError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    return g


def _encode(engine: Engine, prompt, param: str) -> list[int]:
    """Token ids of a prompt (runs in a worker thread)."""
    try:
        return engine.encode_prompt(prompt)
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _tok_str(engine: Engine, t: int) -> str:
    return engine.tokenizer.decode([t])


def _completion_logprobs(engine: Engine, tokens, lps, tops, offset0: int, stop: StopToken | None = None) -> dict:
    """OpenAI's legacy logprobs of some tokens whose text starts at `offset0`; a stop token that ended the sample
    goes last (vLLM reports it too; lm-eval's loglikelihood drops the last entry as the generated token, so without
    it a choice whose greedy next token is EOS would lose its last token's logprob)."""
    if stop is not None:
        tokens, lps, tops = [*tokens, stop.id], [*lps, stop.logprob], [*tops, stop.top]
    toks = [_tok_str(engine, t) for t in tokens]
    offsets, o = [], offset0
    for t in toks:
        offsets.append(o)
        o += len(t)
    return {"tokens": toks, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [_top_dict(engine, top) for top in tops]}


def _echo_logprobs(engine: Engine, ids: list[int], scores: PromptLogprobs, k: int, after: dict | None) -> dict:
    """The legacy logprobs of an echoed prompt (the first token's logprob and top_logprobs null), then `after`'s."""
    lp = _completion_logprobs(engine, ids, scores.logprobs, [t if t is None else t[:k] for t in scores.top], 0)
    for key in lp if after is not None else ():
        lp[key] += after[key]
    return lp


def _vllm_prompt_logprobs(engine: Engine, ids: list[int], scores: PromptLogprobs, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the k most likely."""
    out: list[dict | None] = [None]
    for t, lp, rank, top in zip(ids[1:], scores.logprobs[1:], scores.ranks[1:], scores.top[1:]):
        entry = {str(t): {"logprob": lp, "rank": rank, "decoded_token": _tok_str(engine, t)}}
        for j, (a, v) in enumerate(top[:k]):
            entry.setdefault(str(a), {"logprob": v, "rank": j + 1, "decoded_token": _tok_str(engine, a)})
        out.append(entry)
    return out


def _top_dict(engine: Engine, top: list[tuple[int, float]] | None) -> dict[str, float] | None:
    """OpenAI's legacy format keys alternatives by text; tokens with equal text keep the likelier one. None (the
    first prompt token's) stays None."""
    if top is None:
        return None
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(_tok_str(engine, t), v)
    return out


def _chat_logprobs(engine: Engine, tokens, lps, tops) -> list[dict]:
    def entry(t: int, v: float) -> dict:
        s = _tok_str(engine, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
    return [{**entry(t, v), "top_logprobs": [entry(a, b) for a, b in top]} for t, v, top in zip(tokens, lps, tops)]


# ---- /v1/completions ----

def _encode_prompts(engine: Engine, prompts: list[str | list[int]]) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids and text (what `echo` returns; token ids decoded), in a worker thread."""
    ids = [_encode(engine, p, "prompt" if len(prompts) == 1 else f"prompt.{i}") for i, p in enumerate(prompts)]
    return ids, [p if isinstance(p, str) else engine.tokenizer.decode(x) for p, x in zip(prompts, ids)]


async def _all(aws) -> list:
    """Await coroutines together; when one fails, the others are cancelled (their engine requests aborted)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def _completion_choice(engine: Engine, req: CompletionRequest, index: int, ids: list[int], prompt_text: str,
                       scores: PromptLogprobs | None, c: Completion) -> dict:
    echo = prompt_text if req.echo else ""
    lp = None
    if req.logprobs is not None:
        lp = _completion_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs or [], len(echo), c.stop)
        if req.echo:
            lp = _echo_logprobs(engine, ids, scores, req.logprobs, lp)
    choice = {"index": index, "text": echo + c.text, "logprobs": lp, "finish_reason": c.finish_reason}
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = _vllm_prompt_logprobs(engine, ids, scores, req.prompt_logprobs)
    return choice


async def completions(request: Request):
    st = _state(request)
    engine = st.ready(request)
    with st.admit() as slot:
        req = await st.parse(request, CompletionRequest)
        if req.stream and len(req.prompt) > 1:
            raise APIError(400, f"prompt: a stream takes one prompt, got {len(req.prompt)}; send them without "
                           "stream, or one request each", param="prompt", code="invalid_value")
        if len(req.prompt) * req.n > MAX_SAMPLES:
            raise APIError(400, f"prompt: {len(req.prompt)} prompts x n={req.n} samples; at most {MAX_SAMPLES} "
                           "per request", param="prompt", code="invalid_value")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
            raise APIError(400, "max_tokens: 0 generates nothing; send it with echo (the prompt and its logprobs) "
                           "or prompt_logprobs", param="max_tokens", code="invalid_value")
        ids, texts = await st.in_worker(_encode_prompts, engine, req.prompt)
        grammar = await st.in_worker(_grammar, engine, req, None)
        # the scoring forward's top entries serve both echo's logprobs and prompt_logprobs; echo with max_tokens 0
        # and no logprobs scores too (k 0): it is the engine's one way of running a request that generates nothing
        asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
        scoring = max(asked) if asked else 0 if max_tokens == 0 else None
        # a raw continuation ends where transformers' generate and vLLM end it: at EOS, not at the chat template's
        # end of turn; its text leaves out control tokens unless asked (vLLM's default): lm-eval's `hf` model then
        # gives the same text
        params = [_params(req, max_tokens, len(x), engine, req.logprobs, "prompt", prompt_logprobs=scoring,
                          stop_at_turn_end=False, skip_special_tokens=req.skip_special_tokens, grammar=grammar)
                  for x in ids]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            return slot.stream(_completion_events(st, request, engine, ids[0], texts[0], params[0], head, req))
        results = await _all(st.collect(request, engine, x, p, st.adapter(req.model)) for x, p in zip(ids, params))
        choices = [_completion_choice(engine, req, i * req.n + c.index, x, text, scores, c)
                   for i, (x, text, (outs, _, scores)) in enumerate(zip(ids, texts, results)) for c in outs]
        usage = Usage(*(sum(getattr(u, f) for _, u, _ in results)
                        for f in ("prompt_tokens", "completion_tokens", "cached_tokens")))
        return {**head, "choices": choices, "usage": _usage(usage)}


async def _completion_events(st: ServerState, request: Request, engine: Engine, ids: list[int], prompt_text: str,
                             params: SamplingParams, head: dict, req: CompletionRequest):
    """The stream of one prompt: with echo or prompt_logprobs, a first chunk per sample carrying the prompt (and
    its logprobs, once scored); then the completion's pieces, text offsets counted from the echoed prompt."""
    echo = prompt_text if req.echo else ""
    offsets = [len(echo)] * params.n

    def firsts(scores: PromptLogprobs | None):
        lp = _echo_logprobs(engine, ids, scores, req.logprobs, None) if req.echo and req.logprobs is not None else None
        for i in range(params.n):
            choice = {"index": i, "text": echo, "logprobs": lp, "finish_reason": None}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(engine, ids, scores, req.prompt_logprobs)
            yield _sse({**head, "choices": [choice]})

    if req.echo and params.prompt_logprobs is None:  # nothing to wait for
        for chunk in firsts(None):
            yield chunk
    async for d in st.run(request, engine, ids, params, watch_disconnect=False, adapter=st.adapter(req.model)):
        if isinstance(d, PromptLogprobs):
            for chunk in firsts(d):
                yield chunk
            continue
        if isinstance(d, Usage):
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(d)})
            break
        lp = (_completion_logprobs(engine, d.token_ids, d.logprobs, d.top_logprobs, offsets[d.index], d.stop)
              if params.logprobs is not None and (d.logprobs or d.stop) else None)
        offsets[d.index] += len(d.text)
        yield _sse({**head, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                         "finish_reason": d.finish_reason}]})


# ---- /v1/chat/completions ----

def _chat_prompt(engine: Engine, req: ChatRequest) -> tools.ChatPrompt:
    """The chat rendered with its tools and encoded, markers in user text kept plain (`tools.prepare_chat`; runs in
    a worker thread)."""
    try:
        chat = tools.prepare_chat(engine.tokenizer, [m.for_template() for m in req.messages], req.tools,
                                  req.tool_choice, tools.thinking_mode(req.chat_template_kwargs), req.reasoning_effort)
    except tools.ToolError as e:  # bad tools / tool_choice / messages, or the template refused the conversation
        raise APIError(400, str(e), param=e.param) from None
    chat.ids = _encode(engine, chat.ids, "messages")
    return chat


async def chat_completions(request: Request):
    st = _state(request)
    engine = st.ready(request)
    with st.admit() as slot:
        req = await st.parse(request, ChatRequest)
        chat = await st.in_worker(_chat_prompt, engine, req)
        ids = chat.ids
        want_lp = (req.top_logprobs or 0) if req.logprobs else None
        grammar = await st.in_worker(_grammar, engine, req, chat)
        params = _params(req, req.max_completion_tokens or req.max_tokens, len(ids), engine, want_lp, "messages",
                         grammar=grammar)
        thinking = chat.thinking  # templates that open the reasoning themselves
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": req.model}
        adapter = st.adapter(req.model)
        if req.stream:
            return slot.stream(_chat_events(st, request, engine, ids, params, head, thinking, chat,
                                            req.include_usage, adapter))
        outs, usage, _ = await st.collect(request, engine, ids, params, adapter)
        choices = []
        for c in outs:
            reasoning, content = ThinkSplitter(thinking, chat.reasoning_ends).feed(c.text, final=True)
            content, calls, finish = tools.reply(_tool_stream(chat), content, c.finish_reason)
            msg = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = calls
            if reasoning:
                msg["reasoning_content"] = reasoning
            lp = ({"content": _chat_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs or [])}
                  if params.logprobs is not None else None)
            choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": finish})
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(usage)}


def _tool_stream(chat: tools.ChatPrompt) -> tools.ToolCallStream | None:
    """The tool-call parser of one reply, when the request has tools to call."""
    return chat.tool_stream()


async def _chat_events(st: ServerState, request: Request, engine: Engine, ids: list[int], params: SamplingParams,
                       head: dict, thinking: bool, chat: tools.ChatPrompt, include_usage: bool,
                       adapter: str | None = None):
    split = [ThinkSplitter(thinking, chat.reasoning_ends) for _ in range(params.n)]
    parsers = [_tool_stream(chat) for _ in range(params.n)]
    for i in range(params.n):
        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    async for d in st.run(request, engine, ids, params, watch_disconnect=False, adapter=adapter):
        if isinstance(d, Usage):
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(d)})
            break
        final = d.finish_reason is not None
        reasoning, content = split[d.index].feed(d.text, final=final)
        delta, finish, parser = {}, d.finish_reason, parsers[d.index]
        if parser is not None:
            content, new = parser.feed(content, final=final)
            if new:
                delta["tool_calls"] = tools.call_deltas(new, len(parser.calls) - len(new))
            if final and parser.calls:
                finish = "tool_calls"
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or not (reasoning or "tool_calls" in delta):
            delta["content"] = content
        lp = ({"content": _chat_logprobs(engine, d.token_ids, d.logprobs, d.top_logprobs)}
              if params.logprobs is not None and d.logprobs else None)
        yield _sse({**head, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": finish}]})


# ---- running it ----

def _raw_response(status: int, error: APIError) -> bytes:
    """A whole HTTP/1.1 response written straight to a socket, for connections refused before any request."""
    body = json.dumps(error.body()).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _protocol(state: ServerState, max_connections: int, header_timeout: float):
    """uvicorn's HTTP/1.1 protocol with a hard cap on open connections (the one past it gets a 503 and is closed
    before anything is read; uvicorn's own `limit_concurrency` answers only once a request has arrived, so silent
    connections would pile up) and a deadline for each request line and headers, on a new connection and after
    every response (uvicorn's keep-alive timer stops at the first byte, so a request dribbled byte by byte would
    hold its connection for ever)."""
    busy = APIError(503, f"too many open connections (limit {max_connections}, --max-connections); retry later",
                    "service_unavailable", code="too_many_connections")
    slow = APIError(408, f"no request headers within {header_timeout:g} s (--header-timeout)", code="request_timeout")

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._refuse(503, busy)
            else:
                self._expect_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._expect_request()

        def _expect_request(self) -> None:
            self.loop.call_later(header_timeout, self._request_due, self.cycle)

        def _request_due(self, cycle) -> None:
            """No new request has started since the timer was armed and none is being answered: 408 to a
            connection holding part of a request; an idle one is closed silently, as keep-alive expiry does (an
            unsolicited 408 could be read as the answer to a request the client sends at that moment)."""
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():
                if self.conn.trailing_data[0]:
                    self._refuse(408, slow)
                else:
                    self.transport.close()

        def _refuse(self, status: int, error: APIError) -> None:
            state.responses[status] += 1
            self.transport.write(_raw_response(status, error))
            self.transport.close()

    return Protocol


def serve_config(app, host: str = "127.0.0.1", port: int = 8000, max_connections: int = 256,
                 header_timeout: float = 10.0, log_level: str = "warning"):
    """uvicorn's Config for `app`, with the connection cap and header deadline of `_protocol`; uvicorn's own
    graceful-shutdown timeout backs up the drain (`Server`) by a second."""
    st = app.state.qiusuo
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          http=_protocol(st, max_connections, header_timeout),
                          timeout_graceful_shutdown=math.ceil(st.shutdown_timeout) + 1)


class Server(uvicorn.Server):
    """uvicorn's server, draining on SIGTERM / SIGINT (`handle_exit`; a second SIGINT forces exit): uvicorn stops
    accepting and closes idle connections, the app refuses new requests and stops in-flight ones after
    `shutdown_timeout` (`ServerState.begin_drain`), then the engine's thread is stopped."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.state: ServerState = config.app.state.qiusuo
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:  # a signal handler, or any thread
        super().handle_exit(sig, frame)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.state.begin_drain)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        self.state.workers.shutdown(wait=False)
        if self.state.engine is not None:
            self.state.engine.shutdown()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None, **config):
    """Run uvicorn on `app` in a daemon thread (tests, benchmarks); returns (server, base_url). Stop it with
    `server.should_exit = True`, or drain it as SIGTERM does with `server.handle_exit(signal.SIGTERM, None)`.
    config: `serve_config`'s max_connections, header_timeout."""
    port = port or free_port(host)
    server = Server(serve_config(app, host, port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server failed to start on {host}:{port}")
        time.sleep(0.02)
    return server, f"http://{host}:{port}"


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None, help="name clients pass as `model`; unset: the folder name")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (peft folder) over the model as the model NAME; repeat for more: "
                   "requests for different adapters share one batch, each adapter keeps its own prefix cache")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-concurrency", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests admitted beyond --max-concurrency (they wait); past both, 429 with Retry-After")
    p.add_argument("--max-connections", type=int, default=256, help="open connections; the next gets 503")
    p.add_argument("--max-body-mb", type=float, default=None,
                   help="largest request body in MiB (413 beyond); unset: 16 bytes per token of context, >= 1")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a new connection has to send its request headers")
    p.add_argument("--body-timeout", type=float, default=10.0, help="seconds to receive a request body (408 after)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="stop a request that runs longer than this many seconds (504); unset: no limit")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are stopped")


def lora_args(specs: list[str], base: str) -> dict[str, str]:
    """`--lora NAME=DIR ...` -> {NAME: DIR}, checked before anything loads: the form, names unique and not the
    base's, each folder an adapter."""
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, folder = spec.partition("=")
        if not eq or not name or not folder:
            raise ValueError(f"--lora {spec!r}: give NAME=DIR (the model name clients pass, the peft adapter folder)")
        if name == base or name in out:
            raise ValueError(f"--lora {spec!r}: the model name {name!r} is taken; each adapter needs its own")
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise ValueError(f"--lora {spec!r}: {folder} holds no adapter_config.json (a peft adapter folder)")
        out[name] = folder
    return out


def main(args: argparse.Namespace) -> int:
    check_model_folder(args.model, "--model")  # before the server starts: a run folder named as such, at once
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    lora = lora_args(args.lora, name)
    body = int(args.max_body_mb * 2**20) if args.max_body_mb else None
    app = create_app(None, name, args.api_key, args.max_concurrency, args.max_queue, max_body_bytes=body,
                     body_timeout=args.body_timeout, request_timeout=args.request_timeout,
                     shutdown_timeout=args.shutdown_timeout)
    server = Server(serve_config(app, args.host, args.port, args.max_connections, args.header_timeout, "info"))
    failed: list[BaseException] = []

    def load() -> None:
        try:
            engine = engine_from_args(args, max_batch=args.max_concurrency, lora=lora)
        except Exception as e:  # stop the server: answering 503 "loading" forever would hide it
            failed.append(e)
            server.should_exit = True
            return
        engine.start()
        app.state.qiusuo.engine = engine
        print(f"qiusuo serve: {name} ready on http://{args.host}:{args.port}/v1 "
              f"({torch.get_num_threads()} CPU threads)", flush=True)

    threading.Thread(target=load, daemon=True).start()  # /health answers 503 until this finishes
    server.run()
    if failed:
        raise failed[0]  # the command's one-line error
    return 0
