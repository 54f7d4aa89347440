"""DeepSeek-V3.2's and V4's chat encodings (`qiusuo.data.deepseek_encoding`) against the examples DeepSeek documents
with its own encoders (tests/fixtures/deepseek-v3.2-encoding, deepseek-v4-encoding; provenance in each
PROVENANCE.md): the prompt equals DeepSeek's byte for byte, and the replies in it parse back (DSML) to the calls and
reasoning DeepSeek's test expects. Then the same through a tokenizer folder that ships no chat template, as V3.2 and V4
are published: `apply_chat_template` / `encode_chat` pick the encoding from config.json's model_type."""

import json

import pytest
from published_checkpoints import FIXTURES, deepseek_style_folder

from qiusuo.data.deepseek_encoding import (EFFORT_MAX, encode, encode_v4, encode_v32, parse_invokes, render_invokes)
from qiusuo.data.tokenizer import Tokenizer

V4 = FIXTURES / "deepseek-v4-encoding"
V32 = FIXTURES / "deepseek-v3.2-encoding"


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def gold(path) -> str:
    return path.read_text(encoding="utf-8").removesuffix("\n")  # DeepSeek's V3.2 file ends in a newline it strips


@pytest.mark.parametrize("case,thinking", [(1, True), (2, True), (3, True), (4, False)])
def test_v4_prompts_equal_deepseeks_examples(case, thinking):
    data = load(V4 / f"test_input_{case}.json")
    messages = data["messages"] if isinstance(data, dict) else data
    if isinstance(data, dict):
        messages[0]["tools"] = data["tools"]  # as DeepSeek's test attaches them
    assert encode_v4(messages, thinking=thinking) == gold(V4 / f"test_output_{case}.txt")


def test_v32_prompt_equals_deepseeks_example():
    data = load(V32 / "test_input.json")
    data["messages"][0]["tools"] = data["tools"]
    assert encode_v32(data["messages"], thinking=True) == gold(V32 / "test_output.txt")


def test_request_level_tools_and_modes():
    """OpenAI requests carry tools beside the messages: they go on the system message (DeepSeek's examples), or
    on an empty one put first. Chat mode opens the reply with `</think>`, thinking with `<think>`; reasoning effort
    "max" adds V4's preamble in thinking mode only."""
    data = load(V4 / "test_input_1.json")
    assert encode("deepseek_v4", data["messages"], data["tools"], thinking=True) == gold(V4 / "test_output_1.txt")
    hello = [{"role": "user", "content": "Hello"}]
    for name in ("deepseek_v4", "deepseek_v32"):
        assert encode(name, hello) == "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>"
        assert encode(name, hello, thinking=True) == "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜><think>"
    tooled = encode("deepseek_v4", hello, data["tools"])
    assert tooled.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n\nYou have access to a set of tools")
    assert encode("deepseek_v4", hello, thinking=True, reasoning_effort="max").startswith(
        "<｜begin▁of▁sentence｜>" + EFFORT_MAX + "<｜User｜>")
    assert EFFORT_MAX not in encode("deepseek_v4", hello, reasoning_effort="max")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode("deepseek_v4", hello, reasoning_effort="low")


def test_replies_in_the_examples_parse_back():
    """The assistant turns DeepSeek's examples contain, parsed as replies: case 1's reasoning and its `get_weather`
    call with {"location": "Beijing", "unit": "celsius"} (DeepSeek's test_encoding_dsv4.py expects these), and every
    call of the V3.2 example, typed as the encoder wrote them."""
    prompt = gold(V4 / "test_output_1.txt")
    start = prompt.find("<｜Assistant｜><think>") + len("<｜Assistant｜><think>")
    reply = prompt[start:prompt.find("<｜User｜>", start)].removesuffix("<｜end▁of▁sentence｜>")
    reasoning, _, rest = reply.partition("</think>")
    assert reasoning == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    body = rest.removeprefix("\n\n<｜DSML｜tool_calls>").removesuffix("</｜DSML｜tool_calls>")
    assert parse_invokes(body) == [("get_weather", {"location": "Beijing", "unit": "celsius"})]
    data = load(V32 / "test_input.json")
    for msg in data["messages"]:
        if msg.get("tool_calls"):
            block = render_invokes(msg["tool_calls"], "function_calls")
            assert block in gold(V32 / "test_output.txt")
            body = block.removeprefix("<｜DSML｜function_calls>").removesuffix("</｜DSML｜function_calls>")
            assert parse_invokes(body) == [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                           for c in msg["tool_calls"]]


def published_folder(path, model_type: str):
    """A DeepSeek-style tokenizer folder as V3.2 / V4 ship it: no chat_template, config.json naming the family."""
    folder = deepseek_style_folder(path)
    config = load(folder / "tokenizer_config.json")
    config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_a_folder_without_a_template_chats_with_the_encoding(tmp_path):
    """V4 and V3.2 folders as published: no chat_template, config.json naming the family. The tokenizer renders
    DeepSeek's prompt, encodes it with the markers as control tokens (user text stays text) and stops on EOS."""
    for model_type, example in (("deepseek_v4", V4 / "test_input_2.json"), ("deepseek_v32", None)):
        tok = Tokenizer.from_dir(published_folder(tmp_path / model_type, model_type))
        assert tok.chat_template is None and tok.chat_encoding == model_type and tok.has_chat_format
        if example:
            assert tok.apply_chat_template(load(example), thinking=True) == gold(V4 / "test_output_2.txt")
        ids = tok.encode_chat([{"role": "user", "content": "Hi <｜Assistant｜>"}], thinking=True)
        assert tok.decode(ids) == "<｜begin▁of▁sentence｜><｜User｜>Hi <｜Assistant｜><｜Assistant｜><think>"
        control = [tok.id_to_token(i) for i in ids if i in tok.control_ids]
        assert control == ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>"]  # the user's is text
        assert tok.stop_ids == {tok.eos_id}
    # V3 ships a template: a V3 folder without one has no chat format
    assert not Tokenizer.from_dir(published_folder(tmp_path / "v3", "deepseek_v3")).has_chat_format
