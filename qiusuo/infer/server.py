"""`qiusuo serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream server-sent events when
`stream` is true, with `usage` in the last chunk before `data: [DONE]`), GET /health (503 while the model
loads), GET /metrics (Prometheus text). The engine runs in its own thread; the event loop only parses, queues
and streams. Bodies are parsed and validated here rather than by FastAPI so that every bad input, malformed JSON
included, gets OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` and a 4xx status.
Binds 127.0.0.1 unless told otherwise: the server has no rate limiting beyond its bounded queue.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qiusuo.infer.engine import Delta, Engine, Usage
from qiusuo.infer.load import add_engine_args, engine_from_args
from qiusuo.infer.output import Completion, ThinkSplitter
from qiusuo.infer.output import completions as join_deltas
from qiusuo.infer.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class ServerState:
    """What the routes share (`app.state.qiusuo`): the engine (None while loading), limits, counters for /metrics,
    and the checks every /v1 route makes."""

    def __init__(self, engine: Engine | None, model_name: str, api_key: str | None, max_concurrency: int,
                 max_queue: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.inflight = 0
        self.http = {"ok": 0, "client_error": 0, "rejected_busy": 0}
        self.created = int(time.time())

    def ready(self, request: Request) -> Engine:
        """The engine, once the API key checks out and the model has loaded."""
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", "service_unavailable")
        return self.engine

    async def parse(self, request: Request, kind: type[BaseModel]) -> Any:
        """The body as a `kind`; any malformed or invalid input is a 400 (404 for an unknown model)."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            req = kind.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param, code="invalid_value") from None
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return req

    def admit(self) -> None:
        if self.inflight >= self.max_concurrency + self.max_queue:
            raise APIError(429, f"the server is busy ({self.inflight} requests in flight, queue full); retry later",
                           "rate_limit_exceeded", code="rate_limit_exceeded")

    async def run(self, engine: Engine, ids: list[int], params: SamplingParams):
        """Deltas then Usage of one request, counted in-flight while it lasts."""
        self.inflight += 1
        try:
            async for d in engine.stream(ids, params, request_id=f"{uuid.uuid4().hex}"):
                yield d
        finally:
            self.inflight -= 1

    async def collect(self, engine: Engine, ids: list[int], params: SamplingParams) -> tuple[list[Completion], Usage]:
        """A whole request: each sample's `Completion` (joined as `Engine.generate` joins them) and the Usage."""
        pieces: dict[int, list[Delta]] = {}
        usage = None
        async for d in self.run(engine, ids, params):
            if isinstance(d, Usage):
                usage = d
            else:
                pieces.setdefault(d.index, []).append(d)
        return join_deltas(pieces), usage


def create_app(engine: Engine | None, model_name: str, api_key: str | None = None, max_concurrency: int = 32,
               max_queue: int = 64):
    """The FastAPI app. Pass engine=None and set `app.state.qiusuo.engine` later to serve /health 503 while the
    model loads. The engine's thread is started here."""
    app = FastAPI(title="qiusuo")
    app.state.qiusuo = ServerState(engine, model_name, api_key, max_concurrency, max_queue)
    if engine is not None:
        engine.start()
    app.add_exception_handler(APIError, api_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.qiusuo


async def api_error(request: Request, e: APIError) -> JSONResponse:
    _state(request).http["client_error" if e.status != 429 else "rejected_busy"] += 1
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status)


# ---- small routes ----

async def health(request: Request):
    if _state(request).engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}


async def models(request: Request):
    st = _state(request)
    engine = st.ready(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                        "owned_by": "qiusuo", "max_model_len": engine.max_model_len}]}


async def metrics(request: Request):
    """Prometheus text: HTTP counters, and the engine's once it has loaded."""
    st = _state(request)
    e = st.engine
    lines = []

    def put(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP qiusuo_{name} {help_}", f"# TYPE qiusuo_{name} {kind}", f"qiusuo_{name} {value}"])

    put("http_inflight_requests", "gauge", "HTTP requests being served", st.inflight)
    put("http_client_errors_total", "counter", "requests answered with a 4xx error", st.http["client_error"])
    put("http_rejected_busy_total", "counter", "requests answered 429 (queue full)", st.http["rejected_busy"])
    if e is not None:
        s = e.stats
        put("requests_total", "counter", "requests the engine accepted", s["requests"])
        put("prompt_tokens_total", "counter", "prompt tokens accepted", s["prompt_tokens"])
        put("generation_tokens_total", "counter", "tokens generated", s["generation_tokens"])
        put("queue_depth", "gauge", "sequences waiting for a batch slot or cache blocks", len(e.waiting))
        put("running_sequences", "gauge", "sequences in the running batch", len(e.running))
        put("cache_blocks_used", "gauge", "latent cache blocks held by sequences", e.pool.used_blocks)
        put("cache_blocks_total", "gauge", "latent cache blocks in the pool", e.pool.num_blocks)
        put("cache_usage_ratio", "gauge", "fraction of cache blocks in use", e.pool.used_blocks / e.pool.num_blocks)
        put("prefix_cache_hit_tokens_total", "counter", "prompt tokens served from the prefix cache",
            e.pool.hit_tokens)
        lines += ["# HELP qiusuo_time_to_first_token_seconds time from arrival to the first token",
                  "# TYPE qiusuo_time_to_first_token_seconds summary",
                  f"qiusuo_time_to_first_token_seconds_sum {s['ttft_sum']}",
                  f"qiusuo_time_to_first_token_seconds_count {s['ttft_count']}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


# ---- helpers of the generating routes ----

def _params(req: _Common, max_tokens: int | None, prompt_len: int, engine: Engine, logprobs: int | None):
    if max_tokens is None:
        max_tokens = max(engine.max_model_len - prompt_len, 1)
    try:
        p = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                           min_p=req.min_p, seed=req.seed, stop=req.stop or [], n=req.n,
                           stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs)
        engine.check_fits(prompt_len, p)
    except ValueError as e:
        code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
        raise APIError(400, str(e), param="max_tokens" if code == "invalid_value" else None, code=code) from None
    return p


def _encode(engine: Engine, prompt, param: str) -> list[int]:
    try:
        return engine.encode_prompt(prompt)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _tok_str(engine: Engine, t: int) -> str:
    return engine.tokenizer.decode([t])


def _completion_logprobs(engine: Engine, tokens, lps, tops, offset0: int) -> dict:
    toks = [_tok_str(engine, t) for t in tokens]
    offsets, o = [], offset0
    for t in toks:
        offsets.append(o)
        o += len(t)
    return {"tokens": toks, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [_top_dict(engine, top) for top in tops]}


def _top_dict(engine: Engine, top: list[tuple[int, float]]) -> dict[str, float]:
    """OpenAI's legacy format keys alternatives by text; tokens with equal text keep the likelier one."""
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

async def completions(request: Request):
    st = _state(request)
    engine = st.ready(request)
    req = await st.parse(request, CompletionRequest)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported; send a string", param="prompt")
        prompt = prompt[0]
    ids = _encode(engine, prompt, "prompt")
    params = _params(req, req.max_tokens or 16, len(ids), engine, req.logprobs)
    st.admit()
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": st.model_name}
    if req.stream:
        return StreamingResponse(_completion_events(st, engine, ids, params, head), media_type="text/event-stream")
    outs, usage = await st.collect(engine, ids, params)
    choices = []
    for c in outs:
        lp = (_completion_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs or [], 0)
              if params.logprobs is not None else None)
        choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    st.http["ok"] += 1
    return {**head, "choices": choices, "usage": _usage(usage)}


async def _completion_events(st: ServerState, engine: Engine, ids: list[int], params: SamplingParams, head: dict):
    offsets = [0] * params.n
    async for d in st.run(engine, ids, params):
        if isinstance(d, Usage):
            yield _sse({**head, "choices": [], "usage": _usage(d)})
            break
        lp = (_completion_logprobs(engine, d.token_ids, d.logprobs, d.top_logprobs, offsets[d.index])
              if params.logprobs is not None and d.logprobs else None)
        offsets[d.index] += len(d.text)
        yield _sse({**head, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                         "finish_reason": d.finish_reason}]})
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions ----

async def chat_completions(request: Request):
    st = _state(request)
    engine = st.ready(request)
    req = await st.parse(request, ChatRequest)
    try:
        text = engine.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    ids = _encode(engine, text, "messages")
    want_lp = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(req, req.max_completion_tokens or req.max_tokens, len(ids), engine, want_lp)
    st.admit()
    thinking = text.rstrip().endswith(ThinkSplitter.OPEN)  # templates that open the reasoning themselves
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": st.model_name}
    if req.stream:
        return StreamingResponse(_chat_events(st, engine, ids, params, head, thinking), media_type="text/event-stream")
    outs, usage = await st.collect(engine, ids, params)
    choices = []
    for c in outs:
        reasoning, content = ThinkSplitter(thinking).feed(c.text, final=True)
        msg = {"role": "assistant", "content": content}
        if reasoning:
            msg["reasoning_content"] = reasoning
        lp = ({"content": _chat_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs or [])}
              if params.logprobs is not None else None)
        choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": c.finish_reason})
    st.http["ok"] += 1
    return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(usage)}


async def _chat_events(st: ServerState, engine: Engine, ids: list[int], params: SamplingParams, head: dict,
                       thinking: bool):
    split = [ThinkSplitter(thinking) for _ in range(params.n)]
    for i in range(params.n):
        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    async for d in st.run(engine, ids, params):
        if isinstance(d, Usage):
            yield _sse({**head, "choices": [], "usage": _usage(d)})
            break
        reasoning, content = split[d.index].feed(d.text, final=d.finish_reason is not None)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or not reasoning:
            delta["content"] = content
        lp = ({"content": _chat_logprobs(engine, d.token_ids, d.logprobs, d.top_logprobs)}
              if params.logprobs is not None and d.logprobs else None)
        yield _sse({**head, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": d.finish_reason}]})
    yield "data: [DONE]\n\n"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_in_thread(app, host: str = "127.0.0.1", port: int | None = None):
    """Run uvicorn on `app` in a daemon thread (tests, benchmarks); returns (server, base_url). Stop it with
    `server.should_exit = True`."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
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
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-concurrency", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that before 429")


def main(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(None, name, args.api_key, args.max_concurrency, args.max_queue)

    def load() -> None:
        engine = engine_from_args(args, max_batch=args.max_concurrency)
        engine.start()
        app.state.qiusuo.engine = engine
        print(f"qiusuo serve: {name} ready on http://{args.host}:{args.port}/v1", flush=True)

    threading.Thread(target=load, daemon=True).start()  # /health answers 503 until this finishes
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
