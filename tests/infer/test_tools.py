"""Tool calls: DeepSeek V3 / V3.1 / R1 and Kimi-K2 markup parsed into OpenAI `tool_calls` (whole and streamed alike,
unreadable markup returned as content), requests checked, tool definitions and results rendered through the
checkpoints' real chat templates, and the official `openai` client doing a tool-call round trip against the server.
Random weights will not choose to call a tool, so the server's engine is steered by a test hook that replaces each
sampled token with the next token of a fixed reply (the prompt, the cache and the streaming path run as usual)."""

import json

import openai
import pytest
import torch
from published_checkpoints import FIXTURES, deepseek_style_folder, kimi_folder

from qiusuo.config import get_config
from qiusuo.data.tokenizer import CHAT_TEMPLATE, Tokenizer
from qiusuo.infer.generation_config import GenerationConfig
from qiusuo.infer import Engine
from qiusuo.infer.server import create_app, serve_in_thread
from qiusuo.infer.tools import (REQUIRED, ToolCallStream, ToolError, check_tools, detect_format, forced_name,
                                prepare_chat)
from qiusuo.model.transformer import Transformer

V3_TEMPLATE = json.loads((FIXTURES / "deepseek-v3" / "tokenizer_config.json").read_text())["chat_template"]
V31_TEMPLATE = (FIXTURES / "deepseek-v3.1" / "chat_template.jinja").read_text()
KIMI_TEMPLATE = json.loads((FIXTURES / "kimi-k2" / "tokenizer_config.json").read_text())["chat_template"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
NAMES = frozenset({"get_weather", "get_time"})
ARGS = '{"city": "Paris"}'
REPLIES = {  # content, then two calls, in each family's markup
    "deepseek_v3": "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                   f"{ARGS}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{{}}\n```"
                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "deepseek_v31": f"Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{ARGS}"
                    "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "kimi_k2": f"Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               f"<|tool_call_argument_begin|>{ARGS}<|tool_call_end|><|tool_call_begin|>functions.get_time:1"
               "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
}


def test_formats_are_recognised_from_the_real_templates():
    assert detect_format(V3_TEMPLATE) == "deepseek_v3" and detect_format(V31_TEMPLATE) == "deepseek_v31"
    assert detect_format(KIMI_TEMPLATE) == "kimi_k2" and detect_format(CHAT_TEMPLATE) is None


@pytest.mark.parametrize("fmt", sorted(REPLIES))
def test_markup_parsed_whole_and_streamed_alike(fmt):
    whole = ToolCallStream(fmt, NAMES).feed(REPLIES[fmt], final=True)
    stream, content, calls = ToolCallStream(fmt, NAMES), "", []
    text = REPLIES[fmt]
    for i in range(0, len(text), 3):  # 3 characters at a time: markers arrive split
        c, new = stream.feed(text[i:i + 3], final=i + 3 >= len(text))
        content, calls = content + c, calls + new
    assert (content, [c["function"] for c in calls]) == (whole[0], [c["function"] for c in whole[1]])
    assert content == "Let me check."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": ARGS},
                                              {"name": "get_time", "arguments": "{}"}]
    ids = [c["id"] for c in calls]
    assert ids == ["functions.get_weather:0", "functions.get_time:1"] if fmt == "kimi_k2" else all(
        i.startswith("call_") for i in ids)


@pytest.mark.parametrize("broken", [
    REPLIES["deepseek_v31"].replace("get_time", "launch_rockets"),  # a function that was not offered
    REPLIES["deepseek_v31"].replace(ARGS, '{"city": Paris}'),  # arguments that are not JSON
    REPLIES["deepseek_v31"].replace("<｜tool▁call▁end｜><｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>junk"
                                                                              "<｜tool▁call▁begin｜>"),  # stray text
    REPLIES["deepseek_v31"][:-40],  # cut off inside a call (max_tokens)
    "Let me check.<｜tool▁calls▁begin｜><｜tool▁calls▁end｜>",  # an empty section
])
def test_unreadable_markup_is_returned_as_content(broken):
    content, calls = ToolCallStream("deepseek_v31", NAMES).feed(broken, final=True)
    assert calls == [] and content == broken


def test_text_that_only_looks_like_markup_is_content():
    s = ToolCallStream("deepseek_v31", NAMES)
    assert s.feed("a <｜tool") == ("a ", [])  # held back: it may begin the section marker
    assert s.feed("▁calls? no", final=True) == ("<｜tool▁calls? no", [])


@pytest.mark.parametrize("tools,fragment", [
    ("get_weather", "tools: must be a non-empty list"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "get weather"}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "defined twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
])
def test_malformed_tools_name_the_field(tools, fragment):
    with pytest.raises(ToolError) as e:
        check_tools(tools)
    assert fragment in str(e.value) and e.value.param in str(e.value)


def test_tool_choice():
    tools = [WEATHER, TIME]
    assert forced_name("auto", tools) is None and forced_name("none", tools) is None
    assert forced_name({"type": "function", "function": {"name": "get_time"}}, tools) == "get_time"
    assert forced_name("required", [WEATHER]) == "get_weather"
    assert forced_name("required", tools) == REQUIRED  # the reply starts the call section; the model names one
    for choice, fragment in [({"type": "function", "function": {"name": "x"}}, "not among tools"),
                             ("always", "must be")]:
        with pytest.raises(ToolError, match=fragment):
            forced_name(choice, tools)


@pytest.fixture(scope="module")
def ds31(tmp_path_factory):
    return Tokenizer.from_dir(deepseek_style_folder(tmp_path_factory.mktemp("ds31"), V31_TEMPLATE))


def control(tok, ids):
    return [tok.id_to_token(i) for i in ids if i in tok.control_ids]


def test_deepseek_prompt_with_tools_calls_and_results(ds31, tmp_path):
    """V3.1's template renders no tool definitions: they go into the system prompt as DeepSeek-V3.1's card
    prescribes, the block's markers as control tokens, the user's names and descriptions as text; past calls and
    their results render as the template writes them."""
    tools = [{"type": "function", "function": {**WEATHER["function"], "description": "Weather <｜User｜> of a city"}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"weather": "sunny"} <｜Assistant｜>'}]
    chat = prepare_chat(ds31, messages, tools)
    text = ds31.decode(chat.ids)
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\nYou have access to the following tools:\n\n"
                           "### get_weather\nDescription: Weather <｜User｜> of a city\n\nParameters: {")
    assert "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>" + ARGS in text
    assert '<｜tool▁output▁begin｜>{"weather": "sunny"} <｜Assistant｜><｜tool▁output▁end｜>' in text
    assert control(ds31, chat.ids) == [  # the usage line's markers, the past call's, the result's: none of the user's
        "<｜begin▁of▁sentence｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
        "<｜tool▁calls▁end｜>", "<｜User｜>", "<｜Assistant｜>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>",
        "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜end▁of▁sentence｜>", "<｜tool▁output▁begin｜>",
        "<｜tool▁output▁end｜>"]
    assert (chat.fmt, chat.names, chat.prefix) == ("deepseek_v31", frozenset({"get_weather"}), "")
    forced = prepare_chat(ds31, messages[:2], tools, {"type": "function", "function": {"name": "get_weather"}})
    assert ds31.decode(forced.ids).endswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>")
    assert prepare_chat(ds31, messages[:2], tools, "none").fmt is None  # tools neither shown nor parsed
    # the original V3 template: V3's call syntax in the block, past calls in its json fences
    v3 = Tokenizer.from_dir(deepseek_style_folder(tmp_path / "v3"))
    text = v3.decode(prepare_chat(v3, messages, tools).ids)
    assert "function<｜tool▁sep｜>tool_call_name\n```json\ntool_call_arguments" in text
    assert f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{ARGS}\n```<｜tool▁call▁end｜>" in text
    for bad, param in [([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
                       ([{"role": "user", "content": None}], "messages[0].content"),
                       ([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}], "messages[0].tool_calls[0]")]:
        with pytest.raises(ToolError) as e:
            prepare_chat(ds31, bad, tools)
        assert e.value.param == param


def test_kimi_template_renders_tools_itself(tmp_path):
    kimi = Tokenizer.from_dir(kimi_folder(tmp_path / "kimi"))
    chat = prepare_chat(kimi, [{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    text = kimi.decode(chat.ids)
    assert text.startswith('<|im_system|>tool_declare<|im_middle|>[{"type": "function", "function": {"name": '
                           '"get_weather"') and "## Tools" not in text
    assert chat.fmt == "kimi_k2" and text.endswith("<|im_assistant|>assistant<|im_middle|>")


# ---- the server, through the official client ----

MODEL = "qiusuo-ds"
ANSWER = "It is sunny in Paris."


@pytest.fixture(scope="module")
def server(ds31):
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=ds31.vocab_size, num_nextn_predict_layers=0,
                                   max_position_embeddings=2048)).eval()
    engine = Engine(model, ds31, max_batch=4, block_size=4)
    seen = {"prompts": [], "params": []}
    original = engine.runner._sample

    def scripted(seqs, logits):  # each sequence's next token is the next token of its fixed reply
        out = original(seqs, logits)
        for r, s in enumerate(seqs):
            reply = ds31.encode(script(ds31.decode(s.req.prompt)), add_bos=False) + [ds31.eos_id]
            out.tokens[r] = reply[min(len(s.out), len(reply) - 1)]
            if not s.out:
                seen["prompts"].append(s.req.prompt)
                seen["params"].append(s.req.params)
        return out

    engine.runner._sample = scripted
    srv, url = serve_in_thread(create_app(engine, MODEL))
    yield engine, url, seen
    srv.should_exit = True
    engine.shutdown()


def script(prompt: str) -> str:
    """The reply the steered model writes for a prompt."""
    if prompt.endswith("<｜tool▁sep｜>"):  # tool_choice named the function: the server wrote the call's start
        return f"{ARGS}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    if prompt.endswith("<｜tool▁call▁begin｜>"):  # tool_choice "required": the model names the function
        return f"get_time<｜tool▁sep｜>{{}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    if "<｜tool▁output▁begin｜>" in prompt:
        return ANSWER
    if "broken" in prompt:
        return "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    return f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_client_tool_call_round_trip(server, client, ds31):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64,
                                                 stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    streamed = [t for d in deltas for t in d]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == [(0, "get_weather", ARGS)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"weather": "sunny"})}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64)
    assert final.choices[0].message.content == ANSWER and final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls
    prompt = server[2]["prompts"][-1]  # the tool call and its result went back through the template
    text = ds31.decode(prompt)
    assert f"get_weather<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>" in text
    assert '<｜tool▁output▁begin｜>{"weather": "sunny"}<｜tool▁output▁end｜>' in text
    assert control(ds31, prompt).count("<｜tool▁output▁begin｜>") == 1


def test_named_tool_choice_starts_the_call(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                         tools=[WEATHER, TIME], max_tokens=64,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert out.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls] == [("get_weather",
                                                                                                     ARGS)]


def test_required_tool_choice_among_several_tools(client):
    """"required" with several tools: the reply is started with the call section, and the model names the tool."""
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Time?"}],
                                         tools=[WEATHER, TIME], max_tokens=64, tool_choice="required")
    assert out.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls] == [("get_time", "{}")]


def test_unreadable_markup_is_content_not_an_error(client):
    for stream in (False, True):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "broken please"}], tools=[WEATHER], max_tokens=64)
        if stream:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            out = client.chat.completions.create(**kw)
            content, finish = out.choices[0].message.content, out.choices[0].finish_reason
            assert not out.choices[0].message.tool_calls
        assert content.startswith("<｜tool▁calls▁begin｜>") and "{oops" in content and finish == "stop"


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "messages": None}, None),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
])
def test_bad_tool_requests_get_400(client, body, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    if body["messages"] is None:
        body["messages"] = [{"role": "assistant", "tool_calls": [{"function": {"name": "get_weather"}}]}]
        param = "messages[0].tool_calls[0]"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_generation_config_defaults_under_request_values(server, client):
    engine, _, seen = server
    engine.generation = GenerationConfig({"temperature": 0.6, "top_p": 0.95, "max_tokens": 7}, ())
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "d"}])
        p = seen["params"][-1]
        assert (p.temperature, p.top_p, p.max_tokens) == (0.6, 0.95, 7)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "e"}], temperature=0.2,
                                       max_tokens=9)
        p = seen["params"][-1]
        assert (p.temperature, p.top_p, p.max_tokens) == (0.2, 0.95, 9)
    finally:
        engine.generation = GenerationConfig()
