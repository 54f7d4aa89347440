"""/v1/completions as OpenAI's legacy API defines it: `echo` with the prompt's logprobs (scored by the engine's own
forward, checked against the model's full forward), the four prompt forms, the stop token reported last, vLLM's
`prompt_logprobs`; and every request field honoured, accepted without effect, or refused with a 400 naming it
(`qiusuo.infer.fields`), on both generating routes. The official `openai` client against a live server."""

import re
from pathlib import Path

import httpx
import openai
import pytest
import torch

from qiusuo.infer import Engine, fields
from qiusuo.infer.api_requests import ChatRequest, CompletionRequest
from qiusuo.infer.server import create_app, serve_in_thread

MODEL = "qiusuo-tiny"
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server(model, tok):
    engine = Engine(model, tok, max_batch=8, block_size=4)
    srv, url = serve_in_thread(create_app(engine, MODEL))
    yield engine, url
    srv.should_exit = True
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server[1]}/v1/{route}", json={"model": MODEL, **body}, timeout=60)


def forward_logprobs(model, ids: list[int]) -> list[float]:
    """The slow reference: each prompt token's logprob from one full forward."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    return [lp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]


def test_echo_prompt_logprobs_then_completion(client, model, tok):
    ids = tok.encode(PROMPT)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    echo = client.completions.create(echo=True, **kw).choices[0]
    assert echo.text == PROMPT + plain.text
    lp = echo.logprobs
    n = len(ids)
    assert lp.tokens == [tok.decode([t]) for t in ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx(forward_logprobs(model, ids), abs=1e-5)
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:n], lp.token_logprobs[1:n]))
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)
    assert lp.text_offset[:n] == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert lp.text_offset[n:] == [len(PROMPT) + o for o in plain.logprobs.text_offset]


def test_echo_max_tokens_0_scores_only(client, server, model, tok):
    ids = tok.encode(PROMPT)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        assert c.text == PROMPT and c.finish_reason == "length"
        assert len(c.logprobs.tokens) == len(ids)
        assert c.logprobs.token_logprobs[1:] == pytest.approx(forward_logprobs(model, ids), abs=1e-5)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    bare = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert bare.choices[0].text == PROMPT and bare.choices[0].logprobs is None
    r = post(server, "completions", {"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_echo_scores_every_position_of_a_prefix_cached_prompt(client, server, model, tok):
    """The prefix cache skips the prompt's cached blocks in prefill; the scoring forward covers them all."""
    prompt = "Continuous batching lets requests join and leave between steps, again and again"
    ids = tok.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=0)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    ref = forward_logprobs(model, ids)
    for out in (first, again):
        assert out.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(ref, abs=1e-5)


def test_prompt_forms_give_one_choice_per_prompt_and_sample(client, tok):
    texts = ["Hello world", "def add(a, b):", "The lazy dog"]
    kw = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=t, **kw).choices[0].text for t in texts]
    for prompt in (texts, [tok.encode(t) for t in texts]):
        out = client.completions.create(prompt=prompt, n=2, **kw)
        assert [c.index for c in out.choices] == list(range(6))
        assert [c.text for c in out.choices] == [a for a in alone for _ in range(2)]
    assert client.completions.create(prompt=tok.encode(texts[1]), **kw).choices[0].text == alone[1]
    assert client.completions.create(prompt=[texts[2]], **kw).choices[0].text == alone[2]
    usage = client.completions.create(prompt=texts, **kw).usage
    assert usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) and usage.completion_tokens == 15


@pytest.mark.parametrize("prompt,param", [([], "prompt"), ([1, "a"], "prompt"), ([[1, 2], []], "prompt.1"),
                                          (["x", ""], "prompt.1"), ([[1, 2], [10**6]], "prompt.1")])
def test_bad_prompts_are_400_naming_which(server, prompt, param):
    r = post(server, "completions", {"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_stream_takes_one_prompt_and_a_request_at_most_256_samples(server):
    r = post(server, "completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "one prompt" in r.text
    r = post(server, "completions", {"prompt": ["a"] * 5, "n": 64, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "256" in r.text


def test_streamed_echo_equals_whole(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=1,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((lp.tokens for lp in lps), []) == whole.logprobs.tokens
    n = len(whole.logprobs.tokens) - 6  # the prompt's offsets; a stream counts the completion's from released text
    assert sum((lp.text_offset for lp in lps), [])[:n] == whole.logprobs.text_offset[:n]
    assert sum((lp.token_logprobs for lp in lps), []) == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)


def test_stop_token_is_reported_last(client, tok):
    """lm-eval drops the last logprob entry as the generated token: a sample ended by a stop token must still
    report it, or the prompt's last token would be dropped instead."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, echo=True)
    first = client.completions.create(**kw).choices[0]
    every = list(range(tok.vocab_size))  # whatever comes first is a stop token
    c = client.completions.create(**kw, extra_body={"stop_token_ids": every}).choices[0]
    n = len(tok.encode(PROMPT))
    assert c.finish_reason == "stop" and c.text == PROMPT
    assert len(c.logprobs.tokens) == n + 1 and c.logprobs.text_offset[-1] == len(PROMPT)
    assert c.logprobs.token_logprobs[-1] == pytest.approx(first.logprobs.token_logprobs[-1], abs=1e-6)
    assert c.logprobs.token_logprobs[-1] == pytest.approx(max(c.logprobs.top_logprobs[-1].values()), abs=1e-6)


def test_vllm_prompt_logprobs(server, model, tok):
    ids = tok.encode(PROMPT)
    r = post(server, "completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2, "temperature": 0})
    got = r.json()["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    for t in range(1, len(ids)):
        entry = got[t][str(ids[t])]
        assert entry["logprob"] == pytest.approx(lp[t - 1, ids[t]].item(), abs=1e-5)
        assert entry["rank"] == int((lp[t - 1] > lp[t - 1, ids[t]]).sum()) + 1
        best = next(e for e in got[t].values() if e["rank"] == 1)
        assert len(got[t]) <= 3 and best["logprob"] == pytest.approx(lp[t - 1].max().item(), abs=1e-5)


def test_include_usage_false_leaves_out_the_usage_chunk(client):
    kw = dict(model=MODEL, max_tokens=3, stream=True, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(prompt="hi", stream_options={"include_usage": False}, **kw))
    assert all(c.usage is None for c in chunks) and chunks
    chat = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                               stream_options={"include_usage": False}, **kw))
    assert all(c.usage is None for c in chat)
    assert list(client.completions.create(prompt="hi", **kw))[-1].usage is not None  # qiusuo's default


# ---- no field silently ignored ----

def _asking(name: str):
    """A value that asks for something each refused field does not do."""
    return {"suffix": "tail", "best_of": 2, "logit_bias": {"5": 10}, "response_format": {"type": "json_object"},
            "parallel_tool_calls": False, "frequency_penalty": 0.5, "presence_penalty": 0.5,
            "functions": [{"name": "f"}], "function_call": "auto", "audio": {"voice": "alloy", "format": "mp3"},
            "modalities": ["text", "audio"], "verbosity": "low",
            "web_search_options": {}}[name]


def _base(route: str) -> dict:
    return ({"prompt": "hi", "max_tokens": 2} if route == "completions"
            else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


ROUTES = {"completions": fields.COMPLETIONS, "chat/completions": fields.CHAT}
REFUSED = [(route, name) for route, rules in ROUTES.items() for name, r in rules.items() if r.what == fields.REFUSED]


@pytest.mark.parametrize("route,name", REFUSED)
def test_refused_field_is_400_naming_it(server, route, name):
    r = post(server, route, {**_base(route), name: _asking(name)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and err["message"].startswith(f"{name}: ") and err["code"] == "unsupported_parameter"


@pytest.mark.parametrize("route", ROUTES)
def test_fields_that_ask_nothing_are_accepted(server, route):
    rules = ROUTES[route]
    nothing = {"suffix": "", "best_of": 1, "logit_bias": {}, "response_format": {"type": "text"},
               "parallel_tool_calls": True, "frequency_penalty": 0, "presence_penalty": 0.0,
               "modalities": ["text"], "audio": None, "functions": None}
    body = {**_base(route), **{k: v for k, v in nothing.items() if k in rules},
            **{k: "anything" for k, r in rules.items() if r.what == fields.ACCEPTED}}
    r = post(server, route, body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_field_is_400(server, route):
    r = post(server, route, {**_base(route), "repetition_penalty": 1.2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"
    assert "not a field" in r.json()["error"]["message"]


def test_stream_options_need_stream(server):
    r = post(server, "completions", {**_base("completions"), "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("kind,rules", [(CompletionRequest, fields.COMPLETIONS), (ChatRequest, fields.CHAT)])
def test_honoured_fields_are_exactly_the_request_models(kind, rules):
    """A field the table honours but the model does not declare would be dropped; one the model declares but the
    table does not name would be refused: the two must agree."""
    assert {k for k, r in rules.items() if r.what == fields.HONOURED} == set(kind.model_fields)


def test_serving_page_table_lists_every_field():
    page = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \|", page, re.M)}
    for route, rules in [("completions", fields.COMPLETIONS), ("chat", fields.CHAT)]:
        for name, rule in rules.items():
            assert name in rows, f"docs/serving.md's 'Request fields' table has no row for `{name}`"
            assert rule.what in rows[name], f"docs/serving.md says {rows[name]!r} for `{name}`, the code {rule.what!r}"


def test_refusals_leave_the_server_serving(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=3)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
