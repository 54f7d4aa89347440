"""A request's life inside `qiusuo serve`, bounded at every step: `ServerState` (`app.state.qiusuo`) admits it,
reads its body, runs it on the engine, and ends it early when it must.

- Admission: requests are counted when admitted, streaming or not (`_Slot`, given back exactly once); beyond
  `max_concurrency + max_queue` in flight, 429 with `Retry-After`; during a drain, 503.
- The body is read with a size cap (413) and a deadline (408), then decoded in a worker thread
  (`qiusuo.infer.api_requests.decode_body`): the event loop only routes and streams.
- Running: a request ends early, its sequences aborted in the engine within a step, when its client disconnects
  (Starlette watches streams; `run` watches the others), when it outlives `request_timeout`, or when a shutdown's
  drain time is over (`begin_drain`, called on SIGTERM by `qiusuo.infer.connections.Server`); a sample that fails
  in the engine fails its request alone (500, or an error event in a stream, which then still ends with
  `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from qiusuo.infer.api_errors import APIError, ClientGone
from qiusuo.infer.api_requests import decode_body
from qiusuo.infer.api_responses import sse
from qiusuo.infer.engine import Delta, Engine, PromptLogprobs, Usage
from qiusuo.infer.output import Completion
from qiusuo.infer.output import completions as join_deltas
from qiusuo.infer.sampling import SamplingParams

log = logging.getLogger("qiusuo.serve")


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
        yield sse(e.body())
    except Exception:  # a bug mid-stream: the status is sent already; say so in the stream and end it cleanly
        log.exception("error in a stream")
        st.stream_errors += 1
        yield sse(APIError(500, "internal error while streaming; see the server log", "server_error").body())
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

