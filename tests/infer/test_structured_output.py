"""Structured output by constrained decoding (`qiusuo/infer/constraint.py`) on a tiny random model, the hardest case:
it never wants to write JSON. Twenty schemas of increasing difficulty, each completed output valid under `jsonschema`;
seeded runs repeat; unconstrained rows of the same batch draw exactly what they draw alone; speculative decoding
leaves constrained rows to plain steps; the reasoning stays free until `</think>`; forced tool calls in every
checkpoint markup parse into valid calls; and the server: `response_format` on both routes, the official `openai`
client's `parse()` with a pydantic model, streaming equal to plain, bad schemas, regexes and grammars as 400s naming
the field, an unsatisfiable constraint ending with "length"."""

import json
import re
from types import SimpleNamespace
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch
from published_checkpoints import FIXTURES, deepseek_style_folder, kimi_folder

from qiusuo.config import get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.infer import Engine, SamplingParams
from qiusuo.infer.constraint import (ConstraintError, Grammar, allowed, advance, grammar, json_schema, regex,
                                     request_grammar, unpack)
from qiusuo.infer.server import create_app, serve_in_thread
from qiusuo.infer.tools import prepare_chat, reply
from qiusuo.model.transformer import Transformer

PROMPT = "The quick brown fox"
S = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS = [  # increasing difficulty; strings and numbers bounded, so a random model can finish within max_tokens
    {"type": "boolean"},
    {"enum": ["red", "green", "blue"]},
    SMALL,
    {"type": "string", "maxLength": 4},
    {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{2}$"},
    obj({"name": S}),
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"ok": {"type": "boolean"}, "n": {"type": "null"}, "c": {"const": "x"}}),
    {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 3},
    obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4}}),
    obj({"name": S, "nick": S}, required=["name"]),
    obj({"inner": obj({"x": SMALL, "y": SMALL})}),
    obj({"v": {"anyOf": [SMALL, {"type": "string", "pattern": "^[A-Z]{3}$"}]}}),
    obj({"kind": {"enum": ["circle", "square"]}, "size": {"type": "number", "minimum": 0, "maximum": 9}}),
    {"type": "array", "prefixItems": [{"type": "boolean"}, S], "items": False, "minItems": 2},
    obj({"points": {"type": "array", "maxItems": 2, "items": obj({"x": SMALL, "y": SMALL})}}),
    obj({"when": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"},
         "code": {"type": "string", "pattern": "^[A-F0-9]{4}$"}}),
    {"$defs": {"leaf": obj({"v": SMALL})}, **obj({"a": {"$ref": "#/$defs/leaf"}, "b": {"$ref": "#/$defs/leaf"}})},
    obj({"shape": {"oneOf": [obj({"r": SMALL}), obj({"w": SMALL, "h": SMALL})]}}),
    obj({"user": obj({"id": SMALL, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2},
                      "address": obj({"city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
         "active": {"type": "boolean"}}),
]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def engine(model, tok):
    return Engine(model, tok, max_batch=32, block_size=4)


def run(engine, schemas, **kw) -> list:
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, grammar=json_schema(s), **kw)
              for i, s in enumerate(schemas)]
    return [o.outputs[0] for o in engine.generate([PROMPT] * len(schemas), params)]


def test_twenty_schemas_of_increasing_difficulty_validate(engine):
    outs = run(engine, SCHEMAS)
    completed = 0
    for schema, c in zip(SCHEMAS, outs):
        assert c.finish_reason in ("stop", "length"), c
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            completed += 1
    assert completed >= 18, [c.text for c in outs]
    assert [c.text for c in run(engine, SCHEMAS)] == [c.text for c in outs]  # seeded runs repeat


def test_unconstrained_rows_are_untouched(engine):
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    alone = engine.generate([PROMPT], free)[0].outputs[0]
    mixed = engine.generate([PROMPT, PROMPT, PROMPT],
                            [SamplingParams(max_tokens=40, temperature=1.0, seed=1, grammar=json_schema(SCHEMAS[6])),
                             free, SamplingParams(max_tokens=40, temperature=0, grammar=regex("[a-f]{3}"))])
    assert (mixed[1].outputs[0].text, mixed[1].outputs[0].token_ids) == (alone.text, alone.token_ids)
    assert re.fullmatch("[a-f]{3}", mixed[2].outputs[0].text)
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0, grammar=regex("[a-f]{3}")))
    assert greedy[0].outputs[0].text == mixed[2].outputs[0].text


def test_logprobs_stay_the_models_own(engine, model, tok):
    out = engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0, logprobs=0,
                                                   grammar=regex("[0-9]{3}")))[0].outputs[0]
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        lp = model(torch.tensor([ids + out.token_ids]))[0].float().log_softmax(-1)  # (T, V)
    want = [lp[len(ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert re.fullmatch("[0-9]{3}", out.text) and out.logprobs == pytest.approx(want, abs=1e-4)


def test_speculative_decoding_leaves_constrained_rows_to_plain_steps(tok):
    """Constrained rows never draft: with MTP on, their output is the plain engine's, greedy token for token; an
    unconstrained row of the same batch still drafts."""
    torch.manual_seed(0)
    mtp = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1)).eval()
    params = [SamplingParams(max_tokens=60, temperature=0, grammar=json_schema(s)) for s in SCHEMAS[5:8]]
    params.append(SamplingParams(max_tokens=20, temperature=0))
    plain = Engine(mtp, tok, max_batch=8, block_size=4).generate([PROMPT] * 4, params)
    spec = Engine(mtp, tok, max_batch=8, block_size=4, speculative="mtp", draft_tokens=2)
    out = spec.generate([PROMPT] * 4, params)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain]
    assert sum(spec.runner.counters.drafted) > 0


def test_reasoning_stays_free_until_the_end_of_reasoning_token(engine, tok):
    """A prompt that opened `<think>`: no mask while the row reasons; the grammar switches on with `</think>`."""
    end = tok.token_to_id("</think>")
    steps = []
    original = engine.runner._sample

    def think_then_answer(seqs, logits):  # the model closes its reasoning at its fourth token
        steps.append(len(seqs[0].out))
        if len(steps) == 4:
            logits = logits.clone()
            logits[:, end] += 1e4
        return original(seqs, logits)

    g = Grammar(json_schema(SCHEMAS[6]).lark, "response_format", after_reasoning=True)
    engine.runner._sample = think_then_answer
    try:
        out = engine.generate([PROMPT], SamplingParams(max_tokens=80, temperature=1.0, seed=5, grammar=g))
    finally:
        del engine.runner._sample
    c = out[0].outputs[0]
    assert c.token_ids[3] == end and c.finish_reason == "stop"
    reasoning, answer = c.text.split("</think>")
    jsonschema.validate(json.loads(answer), SCHEMAS[6])
    assert not reasoning.startswith("{")  # the reasoning was sampled freely


def test_row_constraint_switches_on_at_its_trigger(engine, tok):
    compiled = engine.grammars.compile(Grammar(regex("ab").lark, "r", after_reasoning=True))
    seq = SimpleNamespace(constraint=compiled.start(), req=SimpleNamespace(stop_ids={tok.eos_id}))
    V = engine.model.cfg.vocab_size
    assert allowed([seq], V) is None
    advance([seq], [tok.encode("x")[0]], {})
    assert allowed([seq], V) is None
    advance([seq], [tok.token_to_id("</think>")], {})
    rows, mask = allowed([seq], V)
    assert rows == [0] and not mask[0, tok.eos_id]  # "ab" not written yet: the stop token is not allowed
    assert {tok.decode([i]) for i in mask[0].nonzero().flatten().tolist()} <= {"a", "ab"}


def test_unpack_matches_the_bitmask():
    bits = torch.tensor([[0b1011, -1], [-(1 << 31), 0]], dtype=torch.int32)  # (2, 2) words
    mask = unpack(bits, 40)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 3] + list(range(32, 40))
    assert mask[1].nonzero().flatten().tolist() == [31]


# ---- forced tool calls in each checkpoint's markup ----

V3_TEMPLATE = json.loads((FIXTURES / "deepseek-v3" / "tokenizer_config.json").read_text())["chat_template"]
V31_TEMPLATE = (FIXTURES / "deepseek-v3.1" / "chat_template.jinja").read_text()
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": obj({"city": S, "unit": {
        "enum": ["C", "F"]}}, required=["city"])}},
    {"type": "function", "function": {"name": "add", "parameters": obj({"a": SMALL, "b": SMALL})}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def checkpoint_tokenizer(fmt: str, tmp_path) -> Tokenizer:
    if fmt == "kimi_k2":
        return Tokenizer.from_dir(kimi_folder(tmp_path / "kimi"))
    template = {"deepseek_v3": V3_TEMPLATE, "deepseek_v31": V31_TEMPLATE}.get(fmt)
    tok = Tokenizer.from_dir(deepseek_style_folder(tmp_path / fmt, template))
    if template is None:  # V3.2 / V4 folders ship DeepSeek's encoding, no template
        tok.chat_template, tok.chat_encoding = None, fmt
    return tok


@pytest.mark.parametrize("fmt", ["deepseek_v3", "deepseek_v31", "kimi_k2", "deepseek_v32", "deepseek_v4"])
def test_forced_tool_call_is_a_valid_call_in_the_checkpoints_markup(fmt, tmp_path):
    tok = checkpoint_tokenizer(fmt, tmp_path)
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                   max_position_embeddings=4096)).eval()
    engine = Engine(model, tok, max_batch=4, block_size=16)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "add"}}
    for choice, seed in [("required", 0), ("required", 1), (named, 2)]:
        chat = prepare_chat(tok, messages, TOOLS, choice)
        g = request_grammar(tok, None, chat, TOOLS, choice)
        c = engine.generate([chat.ids], SamplingParams(max_tokens=400, temperature=1.0, seed=seed,
                                                       grammar=g))[0].outputs[0]
        content, calls, finish = reply(chat.tool_stream(), c.text, c.finish_reason)
        assert finish == "tool_calls" and len(calls) == 1, (c.text, c.finish_reason)
        f = calls[0]["function"]
        assert choice == "required" or f["name"] == "add"
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == f["name"])
        jsonschema.validate(json.loads(f["arguments"]), schema)


def test_forced_tool_call_through_the_openai_client(tmp_path):
    """Three tools offered, `tool_choice` "required", a random model: the server answers with one valid call."""
    tok = checkpoint_tokenizer("deepseek_v31", tmp_path)
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                   max_position_embeddings=4096)).eval()
    engine = Engine(model, tok, max_batch=4, block_size=16)
    srv, url = serve_in_thread(create_app(engine, MODEL))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3"}],
                                             tools=TOOLS, tool_choice="required", max_tokens=200, seed=4)
    finally:
        srv.should_exit = True
        engine.shutdown()
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    f = choice.message.tool_calls[0].function
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == f.name)
    jsonschema.validate(json.loads(f.arguments), schema)


# ---- the command ----

def test_generate_json_schema_file(tmp_path, model, tok, capsys):
    from qiusuo import cli
    from qiusuo.hf import save_hf

    save_hf(model, tmp_path / "m", tokenizer=tok)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMAS[6]))
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", PROMPT, "--max-tokens", "60"]
    assert cli.main([*args, "--json-schema", str(tmp_path / "schema.json")]) == 0
    out = capsys.readouterr()
    assert "finish: stop" in out.err
    jsonschema.validate(json.loads(out.out), SCHEMAS[6])
    (tmp_path / "bad.json").write_text(json.dumps({"type": "object", "properties": {"a": {"not": {}}}}))
    assert cli.main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "--json-schema" in capsys.readouterr().err and cli.main([*args, "--json-schema", "missing.json"]) == 2


# ---- the server ----

MODEL = "qiusuo-tiny"


@pytest.fixture(scope="module")
def server(engine):
    srv, url = serve_in_thread(create_app(engine, MODEL))
    yield url
    srv.should_exit = True
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=99)
    role: Literal["admin", "dev"]


def test_openai_parse_returns_a_pydantic_object(client):
    out = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                        response_format=Person, max_tokens=60, temperature=0)
    person = out.choices[0].message.parsed
    assert isinstance(person, Person) and out.choices[0].finish_reason == "stop"


def test_streaming_equals_plain(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=1.0,
              seed=11, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[19],
                                                                                 "strict": True}})
    plain = client.chat.completions.create(**kw).choices[0]
    streamed = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.message.content
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == plain.finish_reason
    if plain.finish_reason == "stop":
        jsonschema.validate(json.loads(text), SCHEMAS[19])


def test_completions_route_regex_grammar_and_json_object(client):
    def text(rf, **kw):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0,
                                         extra_body={"response_format": rf}, **kw).choices[0]

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text({"type": "regex", "regex": r"\d{3}-[a-z]{2}"}).text)
    lark = 'start: "yes" | "no" | num\nnum: /[0-9]{1,3}/'
    assert re.fullmatch(r"yes|no|[0-9]{1,3}", text({"type": "grammar", "grammar": lark}).text)
    gbnf = 'root ::= ("cat" | "dog") " " [0-9]'
    assert re.fullmatch(r"(cat|dog) [0-9]", text({"type": "grammar", "grammar": gbnf, "syntax": "gbnf"}).text)
    c = text({"type": "json_object"})
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    else:
        assert c.text.startswith("{")


def test_unsatisfiable_within_max_tokens_ends_with_length(client):
    rf = {"type": "json_schema", "json_schema": {"name": "long", "schema": obj({"s": {"type": "string",
                                                                                       "minLength": 50}})}}
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                         response_format=rf)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith('{"s": "')


def _schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("rf,param,fragment", [
    (_schema_format({"type": "object", "properties": {"a": {"not": {"type": "integer"}}}}),
     "response_format.json_schema.schema", "not"),
    (_schema_format({"type": "strin"}), "response_format.json_schema.schema", "strin"),
    (_schema_format([1, 2]), "response_format.json_schema.schema", "object"),
    ({"type": "json_schema"}, "response_format.json_schema", "schema"),
    ({"type": "regex", "regex": "[a-"}, "response_format.regex", "regex"),
    ({"type": "grammar", "grammar": "start: foo"}, "response_format.grammar", "foo"),
    ({"type": "grammar", "grammar": "root ::= (", "syntax": "gbnf"}, "response_format.grammar", "GBNF"),
    ({"type": "grammar", "grammar": "start: x", "syntax": "ebnf"}, "response_format.syntax", "ebnf"),
    ({"type": "xml"}, "response_format.type", "xml"),
])
def test_bad_constraints_are_400s_naming_the_field(server, rf, param, fragment):
    for route, body in [("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("completions", {"prompt": "hi"})]:
        r = httpx.post(f"{server}/v1/{route}", json={"model": MODEL, "max_tokens": 4, "response_format": rf, **body},
                       timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"].startswith(param) and fragment in err["message"], err


def test_python_api_errors_name_the_field(engine):
    with pytest.raises(ConstraintError) as e:
        engine.generate([PROMPT], SamplingParams(grammar=grammar("start: nothing_here")))
    assert e.value.param == "grammar"
