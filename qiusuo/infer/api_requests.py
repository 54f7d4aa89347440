"""The request bodies of `qiusuo serve`'s generating routes: the pydantic models of /v1/completions and
/v1/chat/completions, and `decode_body`, which turns raw bytes into one of them or a 400 naming what is wrong.

Bodies are parsed, checked and validated here rather than by FastAPI, in the server's worker threads (the event
loop only routes and streams, so a 5 MB prompt does not stall /health; `qiusuo.infer.admission` reads the bytes
under their size cap and deadline). Every string must be valid Unicode (JSON's `\\ud800` escapes can spell lone
surrogates, which no tokenizer encodes) and nesting is capped; both are 400s naming the JSON path. Every request
field is honoured, accepted without effect, or refused with a 400 naming it (`qiusuo.infer.fields`).
/v1/completions takes the prompt forms of OpenAI's legacy API: a string, strings, token ids, lists of token ids.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qiusuo.infer import fields
from qiusuo.infer.api_errors import APIError

MAX_JSON_DEPTH = 64  # a chat request nests 4 deep; JSON schemas of tools a few more


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None  # None: qiusuo sends the usage chunk all the same
    include_obfuscation: bool | None = None  # accepted, not used (padding against side channels, for OpenAI)


class SamplingRequest(BaseModel):
    """The fields both generating routes honour. Each subclass's `rules` (`qiusuo.infer.fields`) remove the fields
    that cannot change the answer and refuse the others before validation; "forbid" then only backs that up."""

    model_config = ConfigDict(extra="forbid")
    rules: ClassVar[dict[str, fields.Rule]]
    route: ClassVar[str]

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    # unset: the checkpoint's generation_config.json value, else SamplingParams' default (`server._params`)
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


class CompletionRequest(SamplingRequest):
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


class ChatRequest(SamplingRequest):
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

