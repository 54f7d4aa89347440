"""`qiusuo serve`'s sockets: uvicorn with a cap on open connections, a deadline for each request's headers, and a
drain on SIGTERM.

- Connections (`serve_config`): at most `max_connections` open (the next is answered 503 and closed), and
  `header_timeout` seconds for a new one to send its request line and headers (and for a kept-alive one to start
  its next request).
- SIGTERM drains (`Server`): no new connections or requests, in-flight ones get `shutdown_timeout` seconds to
  finish (`qiusuo.infer.admission.ServerState.begin_drain`), the rest end with an error (503, or an error event
  and `[DONE]`), and the process exits.
"""

from __future__ import annotations

import asyncio
import json
import math
from http import HTTPStatus

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qiusuo.infer.admission import ServerState
from qiusuo.infer.api_errors import APIError


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

