"""`qiusuo serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): the app and its routes.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream server-sent events when
`stream` is true, with `usage` in the last chunk before `data: [DONE]`), GET /health (503 while the model
loads), GET /metrics (Prometheus text). Chat requests may carry `tools` / `tool_choice` and `role: "tool"` results, and
replies carry `tool_calls` (`finish_reason: "tool_calls"`), parsed from the model's markup by `qiusuo.infer.tools`;
sampling values a request leaves unset come from the checkpoint's generation_config.json (`Engine.generation`).
The engine runs in its own thread. Binds 127.0.0.1 unless told otherwise. `--lora NAME=DIR` serves a LoRA adapter
as a model of its own (`/v1/models`), requests for different adapters sharing one batch (`qiusuo.infer.runner`).

/v1/completions takes the prompt forms of OpenAI's legacy API (one engine request per prompt, run together,
choices indexed prompt x n + sample; a stream takes one prompt, which keeps each stream one engine request) and
`echo`, whose prompt logprobs come from the engine's scoring forward (`ModelRunner.score`): what
lm-evaluation-harness's `local-completions` needs (docs/serving.md, "Evaluating with lm-evaluation-harness").

Built for careless and hostile clients as much as for good ones: one bad request never hurts another. The server is
split by role: request bodies (`api_requests`: schemas, Unicode and nesting checks), errors in OpenAI's shape
(`api_errors`), a request's admission, limits, deadlines and drain (`admission`), response shapes and logprobs
(`api_responses`), /metrics (`metrics`), sockets and SIGTERM (`connections`). Here: the app, one function per route,
and the ways to run it (`main`, `serve_in_thread`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from qiusuo.hf.load import check_model_folder
from qiusuo.infer import constraint, tools
from qiusuo.infer.admission import ServerState
from qiusuo.infer.api_errors import APIError, ClientGone, api_error, http_error
from qiusuo.infer.api_requests import ChatRequest, CompletionRequest, SamplingRequest
from qiusuo.infer.api_responses import (chat_logprobs, completion_logprobs, echo_logprobs, sse, usage_json,
                                        vllm_prompt_logprobs)
from qiusuo.infer.connections import Server, serve_config
from qiusuo.infer.engine import Engine, PromptLogprobs, Usage
from qiusuo.infer.load import add_engine_args, engine_from_args
from qiusuo.infer.metrics import MEDIA_TYPE, prometheus_text
from qiusuo.infer.output import Completion, ThinkSplitter
from qiusuo.infer.sampling import ParamError, SamplingParams

log = logging.getLogger("qiusuo.serve")
MAX_SAMPLES = 256  # prompts x n in one /v1/completions request (lm-eval sends its batch size, n = 1)


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
    """Prometheus text (`qiusuo.infer.metrics`)."""
    return PlainTextResponse(prometheus_text(_state(request)), media_type=MEDIA_TYPE)


# ---- helpers of the generating routes ----

def _params(req: SamplingRequest, max_tokens: int | None, prompt_len: int, engine: Engine, logprobs: int | None,
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


def _grammar(engine: Engine, req: SamplingRequest, chat: tools.ChatPrompt | None) -> constraint.Grammar | None:
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
        lp = completion_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs or [], len(echo), c.stop)
        if req.echo:
            lp = echo_logprobs(engine, ids, scores, req.logprobs, lp)
    choice = {"index": index, "text": echo + c.text, "logprobs": lp, "finish_reason": c.finish_reason}
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(engine, ids, scores, req.prompt_logprobs)
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
        return {**head, "choices": choices, "usage": usage_json(usage)}


async def _completion_events(st: ServerState, request: Request, engine: Engine, ids: list[int], prompt_text: str,
                             params: SamplingParams, head: dict, req: CompletionRequest):
    """The stream of one prompt: with echo or prompt_logprobs, a first chunk per sample carrying the prompt (and
    its logprobs, once scored); then the completion's pieces, text offsets counted from the echoed prompt."""
    echo = prompt_text if req.echo else ""
    offsets = [len(echo)] * params.n

    def firsts(scores: PromptLogprobs | None):
        lp = echo_logprobs(engine, ids, scores, req.logprobs, None) if req.echo and req.logprobs is not None else None
        for i in range(params.n):
            choice = {"index": i, "text": echo, "logprobs": lp, "finish_reason": None}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(engine, ids, scores, req.prompt_logprobs)
            yield sse({**head, "choices": [choice]})

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
                yield sse({**head, "choices": [], "usage": usage_json(d)})
            break
        lp = (completion_logprobs(engine, d.token_ids, d.logprobs, d.top_logprobs, offsets[d.index], d.stop)
              if params.logprobs is not None and (d.logprobs or d.stop) else None)
        offsets[d.index] += len(d.text)
        yield sse({**head, "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
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
            lp = ({"content": chat_logprobs(engine, c.token_ids, c.logprobs or [], c.top_logprobs or [])}
                  if params.logprobs is not None else None)
            choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": finish})
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage_json(usage)}


def _tool_stream(chat: tools.ChatPrompt) -> tools.ToolCallStream | None:
    """The tool-call parser of one reply, when the request has tools to call."""
    return chat.tool_stream()


async def _chat_events(st: ServerState, request: Request, engine: Engine, ids: list[int], params: SamplingParams,
                       head: dict, thinking: bool, chat: tools.ChatPrompt, include_usage: bool,
                       adapter: str | None = None):
    split = [ThinkSplitter(thinking, chat.reasoning_ends) for _ in range(params.n)]
    parsers = [_tool_stream(chat) for _ in range(params.n)]
    for i in range(params.n):
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    async for d in st.run(request, engine, ids, params, watch_disconnect=False, adapter=adapter):
        if isinstance(d, Usage):
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage_json(d)})
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
        lp = ({"content": chat_logprobs(engine, d.token_ids, d.logprobs, d.top_logprobs)}
              if params.logprobs is not None and d.logprobs else None)
        yield sse({**head, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                         "finish_reason": finish}]})


# ---- running it ----

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
