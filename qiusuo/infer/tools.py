"""Tool calls for /v1/chat/completions: the OpenAI request fields (`tools`, `tool_choice`, assistant `tool_calls`,
`role: "tool"` results) in, through the checkpoint's chat template, and the model's tool-call markup back out as
OpenAI `tool_calls`, whole or streamed.

The markup each family writes (`FORMATS`), recognised from the chat template that renders past calls, and parsed
with the patterns of vLLM's `deepseek_v3`, `deepseek_v31` and `kimi_k2` tool parsers and Moonshot's tool-call guide:
- "deepseek_v3" (V3, V3-0324, R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS
  \\n```<｜tool▁call▁end｜>` ... `<｜tool▁calls▁end｜>`
- "deepseek_v31" (V3.1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` ...
- "kimi_k2": `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
  <|tool_call_end|>` ... `<|tool_calls_section_end|>` (the id `functions.NAME:IDX` is the call's id, as Kimi expects back)
- "deepseek_v32" / "deepseek_v4" (DSML, `qiusuo.data.deepseek_encoding`): `<｜DSML｜function_calls>` /
  `<｜DSML｜tool_calls>` blocks of `<｜DSML｜invoke name="NAME">` with `<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>`,
  written "\n\n" after the reply's text (that separator is not content); recognised from the tokenizer's chat
  encoding (V3.2 and V4 ship no template), typed by the tools' schemas. vLLM's conformance strings and its V3.2 / V4
  parser tests pin the wire bytes (tests/infer/test_dsml.py).

Tool definitions: a template that renders `tools` itself (Kimi-K2's), and DeepSeek's V3.2 / V4 encodings, get them as
the `tools` variable; DeepSeek's V3 / V3.1 templates do not, so the definitions go into the system prompt in the block
DeepSeek-V3.1's model card prescribes ("## Tools ... IMPORTANT: ALWAYS adhere to this exact format for tool use: ..."), with the call syntax of the family
(V3's as SGLang's DeepSeek-V3 template patch writes it). That block's markers are control tokens; the names,
descriptions and schemas inside it, like every message, are user text (`Trusted` marks which is which for
`ChatTokenizer.encode_chat`).

`tool_choice`: "auto" (default with tools), "none" (tools neither shown nor parsed), a named function (the reply is
started with that function's call markup, so the model writes its arguments) or "required" (the reply is started
with the call section up to the function's name). Both hold the rest of the reply to one valid call of the offered
tools by constrained decoding (`constraint.tool_call_grammar`), so the parser always reads it. With DeepSeek's V3.2 / V4 encodings a forced call is prompted in chat mode: its reasoning
would have to come before the call markup the reply is started with.

Markup the parser cannot read (an unknown function, arguments that are not a JSON object, text left in the section,
a call cut off) is returned as plain content, never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from qiusuo.data.deepseek_encoding import TOOL_BLOCKS, block_markers, parse_invokes
from qiusuo.data.tokenizer import Trusted

FORMATS = ("deepseek_v3", "deepseek_v31", "kimi_k2", "deepseek_v32", "deepseek_v4")
NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")  # OpenAI's rule for function names

_DS = dict(begin="<｜tool▁calls▁begin｜>", end="<｜tool▁calls▁end｜>")
_MARKUP = {
    "deepseek_v3": dict(_DS, call=re.compile(
        r"<｜tool▁call▁begin｜>(?P<type>[^<\n]*)<｜tool▁sep｜>(?P<name>[^\n]*)\n```json\n(?P<args>.*?)\n```\s*"
        r"<｜tool▁call▁end｜>", re.S), start="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
        open="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>",
        usage="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\ntool_call_arguments"
              "\n```<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>",
        chain="chain them with a newline as separator"),
    "deepseek_v31": dict(_DS, call=re.compile(
        r"<｜tool▁call▁begin｜>(?P<name>[^<]*?)<｜tool▁sep｜>(?P<args>.*?)<｜tool▁call▁end｜>", re.S),
        start="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>",
        open="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>",
        usage="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
              "<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>",
        chain="chain them directly without separators or spaces"),
    "kimi_k2": dict(begin="<|tool_calls_section_begin|>", end="<|tool_calls_section_end|>", call=re.compile(
        r"<\|tool_call_begin\|>\s*(?P<id>[\w.\-]+:\d+)\s*<\|tool_call_argument_begin\|>\s*(?P<args>.*?)\s*"
        r"<\|tool_call_end\|>", re.S),
        start="<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>",
        open="<|tool_calls_section_begin|><|tool_call_begin|>functions."),
}
for _fmt, _block in TOOL_BLOCKS.items():  # DSML: the block, "\n\n" after the reply's text
    _begin, _end = block_markers(_block)
    _MARKUP[_fmt] = dict(begin=_begin, end=_end, sep="\n\n", dsml=True,
                         start=f'\n\n{_begin}\n<｜DSML｜invoke name="{{name}}">\n',
                         open=f'\n\n{_begin}\n<｜DSML｜invoke name="')
# markers that end reasoning the prompt opened even without `</think>` (vLLM's DeepSeek-V4 reasoning parser: a tool
# call block may start before the model closes its reasoning)
REASONING_ENDS = {"deepseek_v4": (block_markers(TOOL_BLOCKS["deepseek_v4"])[0],)}


class ToolError(ValueError):
    """A malformed tools / tool_choice / messages field; `param` names it (the server's 400 says which)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def chat_format(tokenizer) -> str | None:
    """The tool-call markup of a tokenizer's chat format: its template's (`detect_format`), or its DeepSeek encoding's
    DSML (the encodings are named as their formats)."""
    if tokenizer.chat_template is not None:
        return detect_format(tokenizer.chat_template)
    return getattr(tokenizer, "chat_encoding", None)


def detect_format(template: str | None) -> str | None:
    """The tool-call markup a chat template renders past calls in, or None when it renders none."""
    if not template:
        return None
    if "<|tool_calls_section_begin|>" in template:
        return "kimi_k2"
    if "<｜tool▁calls▁begin｜>" in template:
        return "deepseek_v3" if "```json" in template else "deepseek_v31"
    return None


def check_tools(tools) -> list[dict]:
    """OpenAI tool definitions, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?
    (a JSON Schema object)}}], names unique. Returns them as plain dicts."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools", "must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    seen = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ToolError(f"{where}.type", "must be \"function\" (the only tool type)")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{where}.function", "must be an object with a name")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name", f"{name!r} must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"{name!r} is defined twice")
        seen.add(name)
        if "description" in f and not isinstance(f["description"], str):
            raise ToolError(f"{where}.function.description", "must be a string")
        params = f.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ToolError(f"{where}.function.parameters", "must be a JSON Schema object ({\"type\": \"object\", "
                                                             "\"properties\": {...}})")
    return tools


def thinking_mode(template_kwargs: dict | None) -> bool | None:
    """The reply's mode a request asks for in `chat_template_kwargs` (vLLM's extension): `thinking` or
    `enable_thinking` true for thinking mode, false for chat mode, None when it does not say."""
    if not template_kwargs:
        return None
    if not isinstance(template_kwargs, dict):
        raise ToolError("chat_template_kwargs", "must be an object such as {\"thinking\": true}")
    for key, value in template_kwargs.items():
        if key not in ("thinking", "enable_thinking") or not isinstance(value, bool):
            raise ToolError(f"chat_template_kwargs.{key}", "only thinking (or enable_thinking), true or false, is "
                                                           "read: it opens the reply in thinking or chat mode")
    return template_kwargs.get("thinking", template_kwargs.get("enable_thinking"))


REQUIRED = ""  # `forced_name` of tool_choice "required" with several tools: a call to any of them


def forced_name(tool_choice, tools: list[dict] | None) -> str | None:
    """The function a `tool_choice` forces (None: "auto" or "none"; `REQUIRED`, "": "required" among several tools),
    checked against `tools`."""
    if tool_choice in (None, "auto", "none"):
        return None
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice == "required":
        return names[0] if len(names) == 1 else REQUIRED
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(name, str)):
        raise ToolError("tool_choice", "must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                                       "\"function\": {\"name\": ...}}")
    if name not in names:
        raise ToolError("tool_choice", f"names function {name!r}, which is not among tools ({', '.join(names)})")
    return name


def check_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as the templates read them: text content parts joined, `tool_calls` checked (each
    {"id"?, "type": "function", "function": {"name", "arguments": a JSON string}}), tool results with their
    `tool_call_id`. Assistant messages with tool calls keep `content` None when they have no text, as DeepSeek's
    templates test for."""
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None}
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ToolError(f"messages[{i}].content", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                          "are supported")
            content = m["content"] = "".join(p["text"] for p in content)
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            for j, c in enumerate(m["tool_calls"]):
                f = c.get("function") if isinstance(c, dict) else None
                if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
                    raise ToolError(f"messages[{i}].tool_calls[{j}]", "needs function.name and function.arguments "
                                                                      "(a JSON string)")
                c.setdefault("type", "function")
            m.setdefault("content", None)
        elif content is None:
            raise ToolError(f"messages[{i}].content", f"a {role} message needs content")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise ToolError(f"messages[{i}].tool_call_id", "a tool message names the call it answers")
        out.append(m)
    return out


def tool_prompt(tools: list[dict], fmt: str) -> Trusted:
    """DeepSeek's tool block for the system prompt (module docstring); names, descriptions, schemas untrusted."""
    mk = _MARKUP[fmt]
    parts = [("## Tools\nYou have access to the following tools:\n", True)]
    for t in tools:
        f = t["function"]
        parts += [("\n### ", True), (f["name"], False), ("\nDescription: ", True), (f.get("description", ""), False),
                  ("\n\nParameters: ", True), (json.dumps(f.get("parameters", {}), ensure_ascii=False), False),
                  ("\n", True)]
    parts.append(("\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n" + mk["usage"] + "\n\nWhere:\n"
                  "- `tool_call_name` must be an exact match to one of the available tools\n"
                  "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
                  f"- For multiple tool calls, {mk['chain']}", True))
    return Trusted(parts)


@dataclass
class ChatPrompt:
    """A chat request made ready to generate: prompt ids, whether the prompt opened a `<think>` block and what else
    ends that reasoning (`REASONING_ENDS`), and for the reply's parser the markup format, the callable functions with
    their parameter schemas, and the markup the reply was started with."""

    ids: list[int]
    thinking: bool
    fmt: str | None = None
    names: frozenset[str] = frozenset()
    prefix: str = ""
    schemas: dict = field(default_factory=dict)
    reasoning_ends: tuple[str, ...] = ()

    def tool_stream(self) -> "ToolCallStream | None":
        """The tool-call parser of one reply, when the request has tools to call."""
        return ToolCallStream(self.fmt, self.names, self.prefix, schemas=self.schemas) if self.fmt else None


def prepare_chat(tokenizer, messages: list[dict], tools=None, tool_choice=None, thinking: bool | None = None,
                 reasoning_effort: str | None = None) -> ChatPrompt:
    """Render and encode a chat request (`ChatTokenizer.encode_chat`: markers in user text stay plain text).
    `thinking` / `reasoning_effort`: the reply's mode, passed to the template (as `thinking`, what DeepSeek's V3.1
    template reads) or DeepSeek's encoding (None: the template's default; the encodings' chat mode).
    Raises ToolError for malformed input, a template failure included."""
    from jinja2 import TemplateError

    messages = check_messages(messages)
    if tools is not None:
        tools = check_tools(tools)
    elif tool_choice not in (None, "none", "auto"):
        raise ToolError("tool_choice", "needs tools")
    name = forced_name(tool_choice, tools)
    use = tools is not None and tool_choice != "none"
    fmt = chat_format(tokenizer) if use else None
    if use and fmt is None:
        raise ToolError("tools", "this model's chat template renders no tool calls, so there is no tool-call format "
                                 "to prompt for and parse")
    encoding = getattr(tokenizer, "chat_encoding", None) if tokenizer.chat_template is None else None
    kwargs = {}
    if thinking is not None:
        kwargs["thinking"] = thinking and name is None  # a forced call starts the reply: no reasoning before it
    if reasoning_effort is not None:
        kwargs["reasoning_effort"] = reasoning_effort
    if use and (encoding or _renders_tools(tokenizer.chat_template)):
        kwargs["tools"] = tools
    elif use:
        if "usage" not in _MARKUP[fmt]:
            raise ToolError("tools", f"this {fmt} chat template renders no tool definitions, and qiusuo knows no "
                                     f"prompt format for them")
        block = tool_prompt(tools, fmt)
        last = max((i for i, m in enumerate(messages) if m["role"] == "system"), default=-1)
        messages.insert(last + 1, {"role": "system", "content": block})
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True, **kwargs)
    except (TemplateError, TypeError, ValueError) as e:
        raise ToolError("messages", f"the chat template cannot render these messages: {e}") from None
    opened = tokenizer.decode(ids[-8:]).rstrip().endswith("<think>")  # templates that open the reasoning
    mk = _MARKUP.get(fmt, {})
    prefix = mk["open"] if name == REQUIRED else mk["start"].format(name=name) if name else ""
    if prefix:
        ids = ids + tokenizer.encode(prefix, add_bos=False, parse_special=True)
    names = frozenset(t["function"]["name"] for t in tools) if use else frozenset()
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools} if use else {}
    return ChatPrompt(ids, opened, fmt, names, prefix, schemas, REASONING_ENDS.get(chat_format(tokenizer), ()))


def _renders_tools(template: str) -> bool:
    from jinja2 import Environment, meta

    return "tools" in meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))


@dataclass
class ToolCallStream:
    """One reply's text split into content and tool calls, piece by piece. Text before the tool-call section is
    content (a tail that may begin the section marker is held back); the section is held until it closes, or the
    reply ends, and then parsed whole: its calls, or, if any part cannot be read, its raw text as content. So a
    streamed reply and the same reply parsed at once give the same content and calls."""

    fmt: str
    names: frozenset[str]
    buf: str = ""  # starts with the forced call's markup, when the reply was started with it
    state: str = "content"  # "content" -> "section" -> "after"
    calls: list[dict] = field(default_factory=list)
    schemas: dict = field(default_factory=dict)  # name -> JSON Schema parameters (types DSML values)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content released, tool calls completed) by this piece of the reply."""
        mk = _MARKUP[self.fmt]
        self.buf += text
        content, new = "", []
        if self.state == "content":
            i = self.buf.find(mk["begin"])
            if i >= 0:
                content, self.buf, self.state = self.buf[:i], self.buf[i:], "section"
                sep = mk.get("sep", "")
                if sep and content.endswith(sep):  # DSML's separator goes with the block (back with it if unread)
                    content, self.buf = content[:-len(sep)], sep + self.buf
            else:
                marks = (mk.get("sep", "") + mk["begin"], mk["begin"])
                keep = 0 if final else max(next((k for k in range(min(len(m) - 1, len(self.buf)), 0, -1)
                                                 if self.buf.endswith(m[:k])), 0) for m in marks)
                content, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        if self.state == "section":
            j = self.buf.find(mk["end"])
            if j >= 0 or final:
                section = self.buf[:j + len(mk["end"])] if j >= 0 else self.buf
                self.buf, self.state = (self.buf[j + len(mk["end"]):] if j >= 0 else ""), "after"
                body = section[section.find(mk["begin"]) + len(mk["begin"]):]
                new = self._parse(body[:len(body) - len(mk["end"])] if j >= 0 else body)
                if new is None:
                    content, new = content + section, []
                self.calls += new
        if self.state == "after":
            content, self.buf = content + self.buf, ""
        return content, new

    def _parse(self, body: str) -> list[dict] | None:
        """The calls in a section body, or None when any of it cannot be read (module docstring)."""
        mk, calls, pos = _MARKUP[self.fmt], [], 0
        if mk.get("dsml"):
            found = parse_invokes(body, self.schemas)
            if found is None or any(name not in self.names for name, _ in found):
                return None
            return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                    for name, args in found]
        for m in mk["call"].finditer(body):
            if body[pos:m.start()].strip():
                return None
            pos = m.end()
            g = m.groupdict()
            name = g["id"].rpartition(":")[0].removeprefix("functions.") if "id" in g else g["name"].strip()
            if name not in self.names or g.get("type", "function").strip() != "function":
                return None
            try:
                args = json.loads(g["args"])
            except json.JSONDecodeError:
                return None
            if not isinstance(args, dict):
                return None
            call_id = g["id"] if "id" in g else f"call_{uuid.uuid4().hex[:24]}"
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": g["args"].strip()}})
        return calls if calls and not body[pos:].strip() else None


def reply(stream: ToolCallStream | None, text: str, finish_reason: str) -> tuple[str | None, list[dict], str]:
    """A whole reply's (content, tool calls, finish reason): "tool_calls" when it called any."""
    if stream is None:
        return text, [], finish_reason
    content, calls = stream.feed(text, final=True)
    if calls:
        return (content if content.strip() else None), calls, "tool_calls"
    return content, [], finish_reason


def call_deltas(calls: list[dict], first_index: int) -> list[dict]:
    """Streamed `delta.tool_calls` entries: each call whole, indexed in reply order."""
    return [{"index": first_index + k, **c} for k, c in enumerate(calls)]
