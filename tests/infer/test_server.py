"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn on 127.0.0.1."""

import json

import httpx
import openai
import pytest

from qiusuo.infer import Engine
from qiusuo.infer.server import create_app, serve_in_thread
from engine_models import in_threads, wait_until_idle  # tests/infer/engine_models.py

MODEL = "qiusuo-tiny"
KEY = "sk-test"


@pytest.fixture(scope="module")
def server(model, tok):
    engine = Engine(model, tok, max_batch=16, block_size=4)
    srv, url = serve_in_thread(create_app(engine, MODEL, api_key=KEY, max_concurrency=16, max_queue=16))
    yield engine, url
    srv.should_exit = True
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(client, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=kw.pop("max_tokens", 10),
                                     temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[1] + "/health").status_code == 200
    text = httpx.get(server[1] + "/metrics").text
    for name in ["qiusuo_requests_total", "qiusuo_generation_tokens_total", "qiusuo_queue_depth",
                 "qiusuo_cache_usage_ratio", "qiusuo_time_to_first_token_seconds_sum",
                 'qiusuo_http_responses_total{status="200"}', "qiusuo_sequences_failed_total"]:
        assert name in text


def test_completion_plain_and_streamed(server, client, model, tok):
    import torch

    prompt = "The quick brown fox"
    out = greedy(client, prompt, max_tokens=12)
    ids = torch.tensor([tok.encode(prompt)])
    ref = model.generate(ids, 12)[0, ids.shape[1]:].tolist()
    assert out.choices[0].text == tok.decode(ref)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == ids.shape[1]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_plain_and_streamed(client, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_n2_seed_and_logprobs(client):
    kw = dict(model=MODEL, prompt="Hello world", max_tokens=10, temperature=1.0, n=2, seed=11,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    lp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3,
                                   extra_body={"ignore_eos": True}).choices[0].logprobs
    # top_logprobs maps token text to logprob: byte tokens that decode to the same U+FFFD merge into one key
    assert len(lp.token_logprobs) == 4 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert all(max(t.values()) == pytest.approx(v, abs=1e-6) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)


def test_stop_strings(client):
    full = greedy(client, "def add(a, b):", max_tokens=20).choices[0].text
    stop = full[6:9]
    cut = greedy(client, "def add(a, b):", max_tokens=20, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]


def test_16_concurrent_equal_alone(server, client):
    prompts = [f"The quick brown fox {i} jumps" + " over" * (i % 5) for i in range(16)]
    alone = [greedy(client, p, max_tokens=8 + i % 4).choices[0].text for i, p in enumerate(prompts)]
    assert in_threads(lambda i: greedy(client, prompts[i], max_tokens=8 + i % 4).choices[0].text,
                      list(range(16))) == alone
    wait_until_idle(server[0])
    assert server[0].pool.used_blocks == 0  # no leaks


def test_prefix_cache_hit_same_tokens_and_logprobs(server, client):
    prompt = "Continuous batching lets requests join and leave between steps, again and again"
    a = greedy(client, prompt, max_tokens=8, logprobs=1)
    hits = server[0].pool.hit_tokens
    b = greedy(client, prompt, max_tokens=8, logprobs=1)
    assert server[0].pool.hit_tokens > hits and b.usage.prompt_tokens_details.cached_tokens > 0
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].logprobs.token_logprobs == pytest.approx(b.choices[0].logprobs.token_logprobs, abs=1e-5)


BAD = [
    ("completions", b"{not json", 400),
    ("chat/completions", {"model": MODEL}, 400),  # missing messages
    ("chat/completions", {"model": MODEL, "messages": "hello"}, 400),  # wrong type
    ("completions", {"model": MODEL, "prompt": 5}, 400),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": 3.5}, 400),
    ("completions", {"model": MODEL, "prompt": "hi " * 600, "max_tokens": 5}, 400),  # longer than the context
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404),
]


@pytest.mark.parametrize("route,body,status", BAD)
def test_bad_input_gets_openai_error(server, client, route, body, status):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server[1]}/v1/{route}", content=data,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert greedy(client, "still serving", max_tokens=2).choices[0].text is not None


def test_wrong_api_key(server):
    bad = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_disconnect_mid_stream_frees_blocks(server):
    engine, url = server
    body = {"model": MODEL, "prompt": "The lazy dog", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert engine.pool.used_blocks > 0
        r.close()  # the client goes away mid-stream
    wait_until_idle(engine)
    assert engine.pool.used_blocks == 0 and engine.stats["aborted"] >= 1


def test_queue_full_gets_429(model, tok):
    engine = Engine(model, tok, max_batch=1, block_size=4)
    srv, url = serve_in_thread(create_app(engine, MODEL, max_concurrency=1, max_queue=0))
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept referenced: a closed line iterator closes the response
            next(line for line in lines if line.startswith("data: "))
            busy = httpx.post(f"{url}/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        wait_until_idle(engine)
        ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        srv.should_exit = True
        engine.shutdown()


def test_health_503_while_loading(model, tok):
    app = create_app(None, MODEL)
    srv, url = serve_in_thread(app)
    try:
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        engine = Engine(model, tok, max_batch=2)
        engine.start()
        app.state.qiusuo.engine = engine
        assert httpx.get(url + "/health").status_code == 200
        engine.shutdown()
    finally:
        srv.should_exit = True
