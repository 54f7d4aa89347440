"""`qiusuo serve` and `qiusuo chat` on a DeepSeek-V4 folder as DeepSeek publishes it: config.json says deepseek_v4 and
the tokenizer ships no chat template, so chats are rendered by DeepSeek's encoding (`qiusuo.data.deepseek_encoding`).
Held against DeepSeek's documented examples (tests/fixtures/deepseek-v4-encoding): the prompt the engine receives is
DeepSeek's byte for byte, turn after turn, and the model's DSML tool call comes back through the official `openai`
client as OpenAI `tool_calls` (whole and streamed), its reasoning as `reasoning_content`.

Random weights will not write DeepSeek's replies, so the engine is steered by a test hook that replaces each sampled
token with the next token of the reply DeepSeek's example has at that point (the prompt, the cache and the streaming
path run as usual)."""

import builtins
import json

import openai
import pytest
import torch
from published_checkpoints import FIXTURES, deepseek_style_folder

from qiusuo import cli
from qiusuo.config import get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.hf import save_hf
from qiusuo.infer import Engine
from qiusuo.infer.server import create_app, serve_in_thread
from qiusuo.model.transformer import Transformer

EXAMPLES = FIXTURES / "deepseek-v4-encoding"
OPEN = "<｜Assistant｜><think>"
EOS = "<｜end▁of▁sentence｜>"
MODEL = "qiusuo-v4"


def example(n: int):
    data = json.loads((EXAMPLES / f"test_input_{n}.json").read_text(encoding="utf-8"))
    return data, (EXAMPLES / f"test_output_{n}.txt").read_text(encoding="utf-8")


def turns(prompt: str) -> list[tuple[str, str]]:
    """(prompt up to a reply, that reply) for every assistant reply of a documented example in thinking mode."""
    out, start = [], 0
    while (i := prompt.find(OPEN, start)) >= 0:
        j = prompt.find(EOS, i) + len(EOS)
        out.append((prompt[:i + len(OPEN)], prompt[i + len(OPEN): j - len(EOS)]))
        start = j
    return out


# example 2's first turn, before its reasoning was dropped: DeepSeek's rule for a last user turn in thinking mode
HELLO = ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜><think>",
         "The user said hello, I should greet back.</think>Hi there! How can I help you?")
REPLIES = turns(example(1)[1]) + [HELLO] + turns(example(2)[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A V4 folder: a tiny random V4 model, a DeepSeek-style tokenizer with no chat template."""
    d = tmp_path_factory.mktemp("v4")
    src = deepseek_style_folder(tmp_path_factory.mktemp("tok"))
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template")
    (src / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer.from_dir(src)
    torch.manual_seed(0)
    # one layer: the prompts, parsers and streaming are under test, not the layers (hundreds of steered steps)
    model = Transformer(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                   max_position_embeddings=4096, num_hidden_layers=1,
                                   layer_types=["sliding_attention"], mlp_layer_types=["moe"])).eval()
    save_hf(model, d, tokenizer=tok, progress=False)
    return d


def steered(folder):
    """An engine on the folder whose model writes the example's reply to a prompt the example has (else "OK")."""
    from qiusuo.hf import load_model, load_tokenizer

    tok = load_tokenizer(folder)
    assert tok.chat_template is None and tok.chat_encoding == "deepseek_v4"
    engine = Engine(load_model(folder, progress=False), tok, max_batch=4)
    seen = []
    original = engine.runner._sample

    def scripted(seqs, logits):
        out = original(seqs, logits)
        for r, s in enumerate(seqs):
            text = tok.decode(s.req.prompt)
            if not s.out:
                seen.append(text)
            reply = next((reply for prompt, reply in REPLIES if text == prompt), "OK")
            ids = tok.encode(reply, add_bos=False) + [tok.eos_id]
            out.tokens[r] = ids[min(len(s.out), len(ids) - 1)]
        return out

    engine.runner._sample = scripted
    return engine, seen


@pytest.fixture(scope="module")
def server(folder):
    engine, seen = steered(folder)
    srv, url = serve_in_thread(create_app(engine, MODEL))
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120), seen
    srv.should_exit = True
    engine.shutdown()


def test_tool_call_round_trip_renders_deepseeks_prompts(server):
    """DeepSeek's example 1 (thinking mode, two tools, a get_weather call, its result, the answer) as an OpenAI
    client sends it: each prompt equals the example's up to the reply, and the replies come back as OpenAI fields."""
    client, seen = server
    data, gold = example(1)
    (first_prompt, _), (second_prompt, _) = turns(gold)
    messages, thinking = data["messages"][:2], {"chat_template_kwargs": {"thinking": True}}
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=data["tools"], max_tokens=800,
                                         extra_body=thinking)
    assert seen[-1] == first_prompt
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == data["messages"][2]["reasoning_content"]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"location": "Beijing", "unit": "celsius"}

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=data["tools"], max_tokens=800,
                                                 extra_body=thinking, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == [
        (0, "get_weather", {"location": "Beijing", "unit": "celsius"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == data["messages"][2]["reasoning_content"]

    messages = messages + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": data["messages"][3]["content"]}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=data["tools"], max_tokens=800,
                                           extra_body=thinking)
    assert seen[-1] == second_prompt  # the call went back as DSML, its result as a <tool_result> user turn
    assert final.choices[0].message.content == data["messages"][4]["content"]
    assert final.choices[0].message.reasoning_content == data["messages"][4]["reasoning_content"]
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls


def test_chat_mode_thinking_dropped_and_tool_choice(server):
    """Example 2's second turn (earlier reasoning dropped in thinking mode), chat mode by default, and a named
    tool_choice: the reply is started with the call, in chat mode."""
    client, seen = server
    data, gold = example(2)
    client.chat.completions.create(model=MODEL, messages=data[:4], max_tokens=50,
                                   extra_body={"chat_template_kwargs": {"thinking": True}})
    assert seen[-1] == turns(gold)[0][0] and "The user said hello" not in seen[-1]
    client.chat.completions.create(model=MODEL, messages=data[:2], max_tokens=5)
    assert seen[-1] == "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>"
    tools, _ = example(1)
    client.chat.completions.create(model=MODEL, messages=data[1:2], tools=tools["tools"], max_tokens=5,
                                   tool_choice={"type": "function", "function": {"name": "search"}},
                                   extra_body={"chat_template_kwargs": {"thinking": True}})
    assert seen[-1].endswith('<｜User｜>Hello<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="search">\n')
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=data[1:2], max_tokens=5,
                                       extra_body={"chat_template_kwargs": {"temperature": 1}})
    assert e.value.body["param"] == "chat_template_kwargs.temperature"


def test_qiusuo_chat_on_the_folder(folder, monkeypatch, capsys):
    """`qiusuo chat --thinking` over example 2: the second turn's prompt is DeepSeek's (the first reply's reasoning
    kept apart, then dropped), the replies printed."""
    from qiusuo.infer import chat
    from qiusuo.infer.generate import sampling_params

    engine, seen = steered(folder)
    monkeypatch.setattr(chat, "start", lambda args: (sampling_params(args), engine))
    lines = iter(["Hello", "What is the capital of France?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    data, gold = example(2)
    try:
        assert cli.main(["chat", "--model", str(folder), "--thinking", "--system", data[0]["content"],
                         "--max-tokens", "200"]) == 0
    finally:
        engine.shutdown()
    assert seen == [HELLO[0], turns(gold)[0][0]]
    assert "The capital of France is Paris." in capsys.readouterr().out
