"""DSML tool calls (DeepSeek-V3.2 `<｜DSML｜function_calls>`, V4 `<｜DSML｜tool_calls>`) and V4's reasoning split, on the
wire strings vLLM's tests pin, parsed whole and streamed with arbitrary chunk boundaries (every chunk size from 1
to past the longest marker): the same calls and content either way.

The wire strings are copied as test data, each from the file named beside it (vLLM's parser code is not):
- `tests/tool_parsers/test_format_conformance.py`, vllm-project/vllm commit 0e4c702aa688590f5d68af44c0dd2d0cf0430b01
  (`FIXTURES`: the deepseek_v4, deepseek_v3 and kimi_k2 entries, the families qiusuo parses);
- `tests/tool_parsers/test_deepseekv4_tool_parser.py`, vllm-project/vllm commit
  023f36c62e71a247a9bacb7eb4cea5d55505cb63 (`build_tool_call` and its cases);
- `tests/tool_parsers/test_deepseekv32_tool_parser.py`, eigen-hub/vllm commit cca57d421f5aa1786deb113981ebe3bbbbd94581
  (a vLLM snapshot newer than vllm-project's copy here: `build_tool_call` and the extraction, typing and marker-leak
  cases);
- `tests/reasoning/test_deepseekv4_reasoning_parser.py`, vllm-project/vllm commit
  a198e2f2ce034552d6fcf249f32af277e0df7c62 (the deltas of its healthy and defensive paths).
"""

import json

import pytest

from qiusuo.infer.output import ThinkSplitter
from qiusuo.infer.tools import REASONING_ENDS, ToolCallStream

# ---- vLLM test_format_conformance.py FIXTURES (family -> raw_output, expected calls)
CONFORMANCE = {
    "deepseek_v4": ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
                    '<｜DSML｜parameter name="city" string="true">SF</｜DSML｜parameter>\n'
                    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>", [("get_weather", {"city": "SF"})]),
    "deepseek_v3": ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    '```json\n{"city": "SF"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
                    [("get_weather", {"city": "SF"})]),
    "kimi_k2": ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0\n"
                '<|tool_call_argument_begin|>{"city": "SF"}<|tool_call_end|><|tool_calls_section_end|>',
                [("get_weather", {"city": "SF"})]),
}

# ---- vLLM test_deepseekv4_tool_parser.py
TC_START, TC_END = "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>"
INV_START, INV_END = '<｜DSML｜invoke name="', "</｜DSML｜invoke>"
PARAM_START, PARAM_END = '<｜DSML｜parameter name="', "</｜DSML｜parameter>"


def v4_call(func_name: str, params: dict[str, str]) -> str:
    param_strs = "".join(f'{PARAM_START}{k}" string="true">{v}{PARAM_END}\n' for k, v in params.items())
    return f'{TC_START}\n{INV_START}{func_name}">\n{param_strs}{INV_END}\n{TC_END}'


# ---- vLLM test_deepseekv32_tool_parser.py
FC_START, FC_END = "<｜DSML｜function_calls>", "</｜DSML｜function_calls>"


def v32_call(func_name: str, params: dict[str, str]) -> str:
    param_strs = "".join(f'{PARAM_START}{k}" string="true">{v}{PARAM_END}' for k, v in params.items())
    return f'{FC_START}\n{INV_START}{func_name}">\n{param_strs}\n{INV_END}\n{FC_END}'


V32_MULTI = (f"{FC_START}\n"
             f'{INV_START}get_weather">\n{PARAM_START}location" string="true">SF{PARAM_END}\n{INV_END}\n'
             f'{INV_START}get_weather">\n{PARAM_START}location" string="true">NYC{PARAM_END}\n{INV_END}\n'
             f"{FC_END}")
SCHEMAS = {"toggle": {"type": "object", "properties": {"enabled": {"type": "boolean"}, "count": {"type": "integer"}}},
           "score": {"type": "object", "properties": {"value": {"type": "integer"}}},
           "add": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}}

# fmt, text, expected content (None: whatever precedes is content, asserted elsewhere), expected calls
CASES = [
    ("deepseek_v4", CONFORMANCE["deepseek_v4"][0], "", CONFORMANCE["deepseek_v4"][1]),
    ("deepseek_v3", CONFORMANCE["deepseek_v3"][0], "", CONFORMANCE["deepseek_v3"][1]),
    ("kimi_k2", CONFORMANCE["kimi_k2"][0], "", CONFORMANCE["kimi_k2"][1]),
    ("deepseek_v4", "Let me check. " + v4_call("get_weather", {"location": "Beijing", "unit": "celsius"}),
     "Let me check. ", [("get_weather", {"location": "Beijing", "unit": "celsius"})]),
    ("deepseek_v4", v4_call("search", {"query": "deepseek v4"}), "", [("search", {"query": "deepseek v4"})]),
    ("deepseek_v32", f'{FC_START}\n{INV_START}get_time">\n{INV_END}\n{FC_END}', "", [("get_time", {})]),
    ("deepseek_v32", v32_call("get_weather", {"location": "SF", "date": "2024-01-16"}), "",
     [("get_weather", {"location": "SF", "date": "2024-01-16"})]),
    ("deepseek_v32", "Sure, let me check! " + v32_call("get_weather", {"location": "NYC"}), "Sure, let me check! ",
     [("get_weather", {"location": "NYC"})]),
    ("deepseek_v32", V32_MULTI, "", [("get_weather", {"location": "SF"}), ("get_weather", {"location": "NYC"})]),
    ("deepseek_v32", (f'{FC_START}\n{INV_START}toggle">\n{PARAM_START}enabled" string="false">true{PARAM_END}\n'
                      f'{PARAM_START}count" string="false">42{PARAM_END}\n{INV_END}\n{FC_END}'), "",
     [("toggle", {"enabled": True, "count": 42})]),
    ("deepseek_v32", f'{FC_START}\n{INV_START}score">\n{PARAM_START}value" string="true">42{PARAM_END}\n{INV_END}\n'
                     f'{FC_END}', "", [("score", {"value": "42"})]),  # string="true" stays a string despite the schema
    ("deepseek_v32", f'{FC_START}\n{INV_START}score">\n{PARAM_START}value" string="false">42{PARAM_END}\n{INV_END}\n'
                     f'{FC_END}', "", [("score", {"value": 42})]),
    ("deepseek_v32", (f'{FC_START}\n{INV_START}add">\n{PARAM_START}x" string="false">3{PARAM_END}\n'
                      f'{PARAM_START}y" string="false">4{PARAM_END}\n{INV_END}\n{FC_END}'), "",
     [("add", {"x": 3, "y": 4})]),
    ("deepseek_v32", "Hello!" + v32_call("fn", {"a": "b"}), "Hello!", [("fn", {"a": "b"})]),
    ("deepseek_v32", "Here is the weather: " + v32_call("get_weather", {"location": "Tokyo"}), "Here is the weather: ",
     [("get_weather", {"location": "Tokyo"})]),
]
NAMES = frozenset({"get_weather", "search", "get_time", "toggle", "score", "add", "fn"})


def whole(fmt: str, text: str) -> tuple[str, list]:
    content, calls = ToolCallStream(fmt, NAMES, schemas=SCHEMAS).feed(text, final=True)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def streamed(fmt: str, text: str, size: int) -> tuple[str, list]:
    stream, content, calls = ToolCallStream(fmt, NAMES, schemas=SCHEMAS), "", []
    for i in range(0, len(text), size):
        c, new = stream.feed(text[i:i + size], final=i + size >= len(text))
        content, calls = content + c, calls + new
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_wire_strings_parse_whole_and_streamed(case):
    fmt, text, content, calls = CASES[case]
    assert whole(fmt, text) == (content, calls)
    for size in range(1, len(FC_START) + 2):  # a marker split at every boundary
        assert streamed(fmt, text, size) == (content, calls), size


def test_call_ids_are_distinct_and_the_separator_is_not_content():
    """DeepSeek writes "\\n\\n" between the reply's text and the block (its encoder, its parser's start token):
    it is neither content nor lost when the block cannot be read."""
    two = (f'{TC_START}\n{INV_START}search">\n{PARAM_START}q" string="true">a{PARAM_END}\n{INV_END}\n'
           f'{INV_START}search">\n{INV_END}\n{TC_END}')
    content, calls = ToolCallStream("deepseek_v4", NAMES).feed("Checking.\n\n" + two, final=True)
    assert content == "Checking." and [c["function"]["arguments"] for c in calls] == ['{"q": "a"}', "{}"]
    assert len({c["id"] for c in calls}) == 2
    broken = "Checking.\n\n" + v4_call("launch", {"q": "a"})  # not an offered tool: all of it is content
    assert whole("deepseek_v4", broken) == (broken, [])


@pytest.mark.parametrize("text", [
    v4_call("search", {"query": "vllm"}).replace("tool_calls", "function_calls"),  # V3.2's block in a V4 reply
    "<｜DSM some regular text",  # a false partial marker
    v4_call("search", {"query": "x"})[:-12],  # cut off inside the block (max_tokens)
    f'{TC_START}\n{INV_START}search">\n{PARAM_START}q" string="maybe">x{PARAM_END}\n{INV_END}\n{TC_END}',
    f'{TC_START}\n{INV_START}search">\n{PARAM_START}q" string="true">x{PARAM_END}\n'
    f'{PARAM_START}q" string="true">y{PARAM_END}\n{INV_END}\n{TC_END}',  # a parameter given twice
])
def test_unreadable_or_foreign_markup_is_content(text):
    for size in (1, 3, 7, len(text)):
        assert streamed("deepseek_v4", text, size) == (text, []), size


# ---- V4's reasoning split (vLLM's test_deepseekv4_reasoning_parser.py deltas)
DSML_MARKER = "<｜DSML｜tool_calls>"
SPLITS = [  # reply text after a prompt that opened the reasoning -> (reasoning, content)
    ("some reasoning </think>after", "some reasoning ", "after"),
    ("reasoning</think>some content", "reasoning", "some content"),
    ("step 1 step 2" + DSML_MARKER, "step 1 step 2", DSML_MARKER),  # the block ends the reasoning, stays content
    ("head tail of reasoning" + DSML_MARKER + '\n<｜DSML｜invoke name="w"', "head tail of reasoning",
     DSML_MARKER + '\n<｜DSML｜invoke name="w"'),
    ("reasoning" + DSML_MARKER + "\n<｜DSML｜invoke", "reasoning", DSML_MARKER + "\n<｜DSML｜invoke"),
]


def split(text: str, size: int, thinking: bool = True) -> tuple[str, str]:
    s, reasoning, content = ThinkSplitter(thinking, REASONING_ENDS["deepseek_v4"]), "", ""
    for i in range(0, len(text), size):
        r, c = s.feed(text[i:i + size], final=i + size >= len(text))
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("case", range(len(SPLITS)))
def test_v4_reasoning_ends_at_think_or_at_a_tool_call_block(case):
    text, reasoning, content = SPLITS[case]
    for size in range(1, len(DSML_MARKER) + 2):
        assert split(text, size) == (reasoning, content), size


def test_a_block_inside_a_think_the_reply_opened_does_not_end_it():
    """vLLM's guard: with an explicit `<think>` in the reply, only `</think>` ends the reasoning."""
    text = f"<think>discussing {DSML_MARKER}"
    for size in (1, 5, len(text)):
        assert split(text, size, thinking=False) == (f"discussing {DSML_MARKER}", "")
    assert split("<think>quick thought</think>answer", 4, thinking=False) == ("quick thought", "answer")
