"""DeepSeek-V3.2's and V4's chat encodings, and DSML, the markup their tool calls are written in.

DeepSeek ships no Jinja chat template with V3.2 or V4: the model repositories carry Python encoders instead
(`encoding/encoding_dsv32.py`, `encoding/encoding_dsv4.py`; vLLM keeps copies in `vllm/tokenizers/`). This module is
our own implementation of the same prompts, tested against the examples DeepSeek documents with its encoders
(tests/fixtures/deepseek-v3.2-encoding, deepseek-v4-encoding: the prompt must equal theirs byte for byte). A
tokenizer folder with no `chat_template` whose config.json is one of these families uses it (`ChatTokenizer`), so
`qiusuo chat`, `qiusuo serve` and GRPO chat with a V3.2 or V4 folder as published.

The two encodings (messages in OpenAI's form; `reasoning_content`, DeepSeek's name, or `reasoning` on assistant
messages; tools as OpenAI tool definitions):
- modes: "chat" opens the reply with `<｜Assistant｜></think>`, "thinking" with `<｜Assistant｜><think>`; earlier turns'
  reasoning is dropped in thinking mode (V4: unless the conversation has tools; V3.2: always), and only replies
  after the last user message keep theirs.
- tools: rendered after the system message's content as DeepSeek's encoder renders them (a "## Tools" section with
  the DSML call syntax and one JSON schema per line); past tool calls as a DSML block after the reply's text, "\\n\\n"
  before it; tool results as `<function_results>` (V3.2) or merged into the next user turn as `<tool_result>` blocks
  in the order of the calls (V4).
- V4 also has `latest_reminder` messages, internal task markers (`task` on a user message), `reasoning_effort="max"`
  (a preamble in thinking mode), and `developer` messages rendered as user turns; V3.2 renders a developer message as a
  user turn with the tools before "# The user's message is: ...".

DSML (`render_invokes` / `parse_invokes`): a block `<｜DSML｜function_calls>` (V3.2) or `<｜DSML｜tool_calls>` (V4) holds
`<｜DSML｜invoke name="NAME">` elements, each with
`<｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>` lines: string="true" values are the raw text, "false" values JSON. Parsing is the inverse, lenient about whitespace
between elements, and types a string="false" value that is not JSON by the tool's schema (integer, number, boolean,
null), as vLLM's DeepSeek-V3.2 parser does.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
V4_TASKS = {t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")}
REASONING_EFFORTS = (None, "high", "max")
# V4's preamble for reasoning_effort="max" in thinking mode, as DeepSeek's encoder writes it
EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

_V32_TOOLS = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{d}function_calls>" block like the following as part of your reply to the user:
<{d}function_calls>
<{d}invoke name="$FUNCTION_NAME">
<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>
...
</{d}invoke>
<{d}invoke name="$FUNCTION_NAME2">
...
</{d}invoke>
</{d}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

<{d}function_calls>
...
</{d}function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""

_V4_TOOLS = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{d}tool_calls>" block like the following:

<{d}tool_calls>
<{d}invoke name="$TOOL_NAME">
<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>
...
</{d}invoke>
<{d}invoke name="$TOOL_NAME2">
...
</{d}invoke>
</{d}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside \
<think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def to_json(value: Any) -> str:
    """JSON as DeepSeek's encoders write it (non-ASCII kept, ", " and ": " separators)."""
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- DSML
def block_markers(block: str) -> tuple[str, str]:
    """The opening and closing markers of a DSML block ("function_calls": V3.2, "tool_calls": V4)."""
    return f"<{DSML}{block}>", f"</{DSML}{block}>"


def _arguments(call: dict) -> dict:
    args = call["function"]["arguments"]
    args = json.loads(args) if isinstance(args, str) else args
    if not isinstance(args, dict):
        raise ValueError(f"tool call {call['function'].get('name')!r}: arguments must be a JSON object, got {args!r}")
    return args


def render_invokes(calls: list[dict], block: str) -> str:
    """OpenAI tool calls as one DSML block (no separator before it)."""
    begin, end = block_markers(block)
    invokes = []
    for call in calls:
        params = [f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                  f'{v if isinstance(v, str) else to_json(v)}</{DSML}parameter>' for k, v in _arguments(call).items()]
        invokes.append(f'<{DSML}invoke name="{call["function"]["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"{begin}\n" + "\n".join(invokes) + f"\n{end}"


_INVOKE = re.compile(rf'<{DSML}invoke\s+name="(?P<name>[^"]*)"\s*>(?P<body>.*?)</{DSML}invoke>', re.S)
_PARAM = re.compile(rf'<{DSML}parameter\s+name="(?P<name>[^"]*)"\s+string="(?P<string>true|false)"\s*>'
                    rf'(?P<value>.*?)</{DSML}parameter>', re.S)


def parse_invokes(body: str, schemas: dict[str, dict] | None = None) -> list[tuple[str, dict]] | None:
    """The (name, arguments) of every invoke in a block's body (between its markers), or None when any of it cannot
    be read: text between elements, a parameter outside the grammar, a name given twice. `schemas`: each tool's JSON
    Schema `parameters`, which type string="false" values that are not JSON."""
    calls, pos = [], 0
    for m in _INVOKE.finditer(body):
        if body[pos:m.start()].strip():
            return None
        pos = m.end()
        args, at, inner = {}, 0, m.group("body")
        props = ((schemas or {}).get(m.group("name")) or {}).get("properties") or {}
        for p in _PARAM.finditer(inner):
            if inner[at:p.start()].strip() or p.group("name") in args:
                return None
            at = p.end()
            args[p.group("name")] = _typed(p.group("value"), p.group("string") == "true", props.get(p.group("name")))
        if inner[at:].strip():
            return None
        calls.append((m.group("name"), args))
    return calls if calls and not body[pos:].strip() else None


def _typed(value: str, string: bool, schema: dict | None) -> Any:
    """A parameter's value: string="true" is the text itself (whatever the schema says); "false" is JSON, or, when
    it is not, what the schema's type makes of the text (vLLM's V3.2 parser's rules), else the text."""
    if string:
        return value
    types = (schema or {}).get("type")
    types = types if isinstance(types, list) else [types]
    if types == ["string"]:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    text = value.strip()
    for t in types:
        if t in ("integer", "int") and re.fullmatch(r"[-+]?\d+", text):
            return int(text)
        if t in ("number", "float") and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
            return float(text)
        if t in ("boolean", "bool") and text in ("true", "false", "1", "0"):
            return text in ("true", "1")
    return value


# ---------------------------------------------------------------- shared by both encodings
def _reasoning(msg: dict) -> str:
    return msg.get("reasoning_content") or msg.get("reasoning") or ""


def _last_user(messages: list[dict]) -> int:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") in ("user", "developer")), -1)


def _tools_block(template: str, tools: list[dict]) -> str:
    return template.format(d=DSML, schemas="\n".join(to_json(t["function"]) for t in tools))


def _with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The request's tools on the first message when it is a system message (DeepSeek's examples), else on an empty
    system message put first (vLLM's placement)."""
    messages = [dict(m) for m in messages]
    if tools:
        if messages and messages[0].get("role") == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return messages


def _system_extras(msg: dict, template: str) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + _tools_block(template, msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT.format(schema=to_json(msg["response_format"]))
    return out


# ---------------------------------------------------------------- DeepSeek-V3.2
def _v32_message(i: int, messages: list[dict], thinking: bool) -> str:
    msg, last_user = messages[i], _last_user(messages)
    role, content = msg.get("role"), msg.get("content")
    opens = THINK if i == last_user and thinking else END_THINK  # what a user turn's reply starts with
    if role == "system":
        return (content or "") + _system_extras(msg, _V32_TOOLS)
    if role == "developer":
        return f"{USER}{_system_extras(msg, _V32_TOOLS)}\n\n# The user's message is: {content}{ASSISTANT}{opens}"
    if role == "user":
        return f"{USER}{content}{ASSISTANT}{opens}"
    if role == "tool":
        j = i - 1
        while j >= 0 and messages[j].get("role") == "tool":
            j -= 1
        calls = messages[j].get("tool_calls") if j >= 0 and messages[j].get("role") == "assistant" else None
        order = i - j
        if not calls or order > len(calls):
            raise ValueError(f"messages[{i}]: a tool result with no tool call before it to answer")
        out = "\n\n<function_results>" if order == 1 else ""
        out += f"\n<result>{content}</result>"
        if order == len(calls):
            out += "\n</function_results>\n\n" + (THINK if i >= last_user and thinking else END_THINK)
        return out
    if role == "assistant":
        reasoning = _reasoning(msg) + END_THINK if thinking and i > last_user else ""
        calls = "\n\n" + render_invokes(msg["tool_calls"], "function_calls") if msg.get("tool_calls") else ""
        return reasoning + (content or "") + calls + EOS
    raise ValueError(f"messages[{i}]: role {role!r} is not one of DeepSeek-V3.2's (system, developer, user, tool, "
                     f"assistant)")


def encode_v32(messages: list[dict], thinking: bool = False, drop_thinking: bool = True, add_bos: bool = True,
               **_) -> str:
    """DeepSeek-V3.2's prompt for `messages` (tools already attached to a message: `encode`)."""
    if thinking and drop_thinking:  # earlier turns' reasoning, and developer turns before the last user one, go
        last = _last_user(messages)
        kept = []
        for i, m in enumerate(messages):
            if m.get("role") in ("user", "system", "tool") or i >= last:
                kept.append(m)
            elif m.get("role") == "assistant":
                kept.append({k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")})
        messages = kept
    return (BOS if add_bos else "") + "".join(_v32_message(i, messages, thinking) for i in range(len(messages)))


# ---------------------------------------------------------------- DeepSeek-V4
def _v4_merge_tool_results(messages: list[dict]) -> list[dict]:
    """V4 has no tool role: results become `<tool_result>` blocks of a user turn. As DeepSeek's encoder does it, a
    user turn is a list of blocks; a tool result joins the user turn before it or opens one, and user text joins a
    user turn right before it (unless that turn is a task); results are ordered as the calls of the last assistant
    turn that made calls (a stable sort: unknown ids keep their place)."""
    merged: list[dict] = []
    order: dict[str, int] = {}
    for msg in messages:
        role, last = msg.get("role"), merged[-1] if merged else {}
        if role == "assistant" and msg.get("tool_calls"):
            order = {c.get("id"): k for k, c in enumerate(msg["tool_calls"]) if c.get("id")}
        if role == "tool":
            block = {"type": "tool_result", "id": msg.get("tool_call_id") or "", "content": msg.get("content") or ""}
            if last.get("role") == "user" and "blocks" in last:
                last["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block], "order": order})
        elif role == "user":
            text = {"type": "text", "text": msg.get("content") or ""}
            if last.get("role") == "user" and "blocks" in last and last.get("task") is None:
                last["blocks"].append(text)
            else:
                merged.append({"role": "user", "blocks": [text], "order": order,
                               **{k: msg[k] for k in ("task", "wo_eos") if k in msg}})
        else:
            merged.append(copy.copy(msg))
    for msg in merged:
        if "blocks" in msg:
            results = iter(sorted((b for b in msg["blocks"] if b["type"] == "tool_result"),
                                  key=lambda b: msg["order"].get(b["id"], 0)))
            msg["blocks"] = [next(results) if b["type"] == "tool_result" else b for b in msg["blocks"]]
    return merged


def _tool_result_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                           for p in content)
    return content or ""


def _v4_message(i: int, messages: list[dict], thinking: bool, drop: bool, effort: str | None) -> str:
    msg, last_user = messages[i], _last_user(messages)
    role, content = msg.get("role"), msg.get("content")
    out = EFFORT_MAX if i == 0 and thinking and effort == "max" else ""
    if role == "system":
        out += (content or "") + _system_extras(msg, _V4_TOOLS)
    elif role == "developer":
        out += USER + (content or "") + _system_extras(msg, _V4_TOOLS)
    elif role == "user":
        out += USER + "\n\n".join(b["text"] if b["type"] == "text"
                                  else f"<tool_result>{_tool_result_text(b['content'])}</tool_result>"
                                  for b in msg["blocks"])
    elif role == "latest_reminder":
        out += REMINDER + (content or "")
    elif role == "assistant":
        after_task = i > 0 and messages[i - 1].get("task") is not None
        reasoning = ""
        if thinking and not after_task and (not drop or i > last_user):
            reasoning = _reasoning(msg) + END_THINK
        calls = "\n\n" + render_invokes(msg["tool_calls"], "tool_calls") if msg.get("tool_calls") else ""
        out += reasoning + (content or "") + calls + ("" if msg.get("wo_eos") else EOS)
    else:
        raise ValueError(f"messages[{i}]: role {role!r} is not one of DeepSeek-V4's (system, developer, user, tool, "
                         f"assistant, latest_reminder)")
    if i + 1 < len(messages) and messages[i + 1].get("role") not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None:  # DeepSeek's internal quick-instruction tasks
        if task not in V4_TASKS:
            raise ValueError(f"messages[{i}].task {task!r} is not one of {sorted(V4_TASKS)}")
        if task == "action":
            out += ASSISTANT + (THINK if thinking else END_THINK) + V4_TASKS[task]
        else:
            out += V4_TASKS[task]
    elif role in ("user", "developer"):
        out += ASSISTANT + (THINK if thinking and (not drop or i >= last_user) else END_THINK)
    return out


def encode_v4(messages: list[dict], thinking: bool = False, drop_thinking: bool = True, add_bos: bool = True,
              reasoning_effort: str | None = None, **_) -> str:
    """DeepSeek-V4's prompt for `messages` (tools already attached to a message: `encode`)."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort {reasoning_effort!r}: DeepSeek-V4 knows 'high' and 'max' (or none)")
    messages = _v4_merge_tool_results(messages)
    drop = drop_thinking and not any(m.get("tools") for m in messages)  # with tools, every turn keeps its reasoning
    if thinking and drop:
        last = _last_user(messages)
        kept = []
        for i, m in enumerate(messages):
            if m.get("role") in ("user", "system", "tool", "latest_reminder") or i >= last:
                kept.append(m)
            elif m.get("role") == "assistant":
                kept.append({k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")})
        messages = kept
    return (BOS if add_bos else "") + "".join(_v4_message(i, messages, thinking, drop, reasoning_effort)
                                             for i in range(len(messages)))


ENCODINGS = {"deepseek_v32": encode_v32, "deepseek_v4": encode_v4}
# the DSML block each encoding's replies call tools in
TOOL_BLOCKS = {"deepseek_v32": "function_calls", "deepseek_v4": "tool_calls"}


def encode(name: str, messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
           reasoning_effort: str | None = None, drop_thinking: bool = True, add_bos: bool = True) -> str:
    """The prompt of encoding `name` ("deepseek_v32" | "deepseek_v4") for OpenAI-style `messages` and `tools`, the
    reply opened in thinking or chat mode."""
    return ENCODINGS[name](_with_tools(messages, tools), thinking=thinking, drop_thinking=drop_thinking,
                           add_bos=add_bos, reasoning_effort=reasoning_effort)
