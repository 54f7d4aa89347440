"""Errors of `qiusuo serve` in OpenAI's shape: every one, from a route or not (401, 404, 405, 408, 413, 429, 500,
503, 504), answers `{"error": {"message", "type", "param", "code"}}`, so a client's error handling reads them all.

`APIError` is raised anywhere a request is refused (parsing, admission, the engine's checks) and turned into a
response by `api_error`; routing's own errors (unknown path, wrong method) are reshaped by `http_error`. Imports
nothing of qiusuo.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """A refused or failed request: its HTTP status, OpenAI's error fields, and headers such as `Retry-After`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client disconnected: nobody to answer (counted on /metrics, no response sent)."""


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Routing's own errors (404 unknown path, 405 wrong method) in OpenAI's shape."""
    what = {404: f"no route {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions",
            405: f"{request.method} is not allowed on {request.url.path}; use "
                 + (e.headers or {}).get("Allow", "another method")}.get(e.status_code, str(e.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(APIError(e.status_code, what, code=code).body(), status_code=e.status_code, headers=e.headers)

