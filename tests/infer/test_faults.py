"""Fault injection (issue 18): careless and hostile clients against a live server on 127.0.0.1, and the engine
under requests that cannot be sampled. One bad request must never hurt another, and limits must hold. Every
test is bounded in requests and time; waits poll with a deadline, nothing asserts a duration."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from qiusuo.config import get_config
from qiusuo.infer import BlockPool, Engine, SamplingParams, Usage, sample
from qiusuo.infer.scheduler import Scheduler
from qiusuo.infer.sequence import Request
from qiusuo.infer.server import create_app, free_port, serve_in_thread
from qiusuo.model.transformer import Transformer
from engine_models import HookedTokenizer, in_threads  # tests/infer/engine_models.py

MODEL = "qiusuo-tiny"


def until(cond, seconds: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(engine, conn: dict | None = None, **app):
    srv, url = serve_in_thread(create_app(engine, MODEL, **app), **(conn or {}))
    try:
        yield url
    finally:
        srv.should_exit = True
        engine.shutdown()


@pytest.fixture(scope="module")
def long_model(tok):
    """The tests' tiny model with a 4,096-token context, so a request can outlast the client that sent it."""
    torch.manual_seed(0)
    return Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                  max_position_embeddings=4096)).eval()


@pytest.fixture(scope="module")
def server(long_model, tok):
    """One server for the request-level faults: small body limit and deadlines, a connection cap."""
    engine = Engine(long_model, tok, max_batch=8, block_size=4)
    with serving(engine, dict(max_connections=16, header_timeout=0.5), max_concurrency=8, max_queue=8,
                 max_body_bytes=256 << 10, body_timeout=0.5) as url:
        yield engine, url


def post(url, route, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # json.dumps writes lone surrogates as \ud800
    return httpx.post(f"{url}/v1/{route}", content=data, headers={"Content-Type": "application/json"}, timeout=30, **kw)


def greedy_body(prompt, n_tokens, **kw):
    return {"model": MODEL, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True, **kw}


def stream_text(url, body) -> tuple[str, list[dict]]:
    """A streamed completion's text and its parsed events (the last must be [DONE])."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    assert events[-1] == "[DONE]"
    text = "".join(c["text"] for e in events[:-1] if "choices" in e for c in e["choices"])
    return text, events


def is_openai_error(r, status, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- one bad request must not poison the batch ----

def test_sample_fails_bad_rows_alone():
    """Rows with NaN, +inf or all -inf logits are reported in `errors`; the other rows draw exactly what they draw
    without them (same generators)."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=0, logprobs=2)]
    gens = [p.generator() for p in params]
    out = sample(logits, params, gens)
    assert set(out.errors) == {1, 2, 3} and "not finite" in out.errors[1]
    good = [0, 4]
    alone = sample(logits[good], [params[r] for r in good], [SamplingParams(temperature=1.0, top_p=0.9, seed=1)
                                                             .generator(), None])
    assert [out.tokens[r] for r in good] == alone.tokens


def test_sample_survives_extreme_but_valid_params():
    """top_p too small for float32 keeps the top token (greedy); top_k beyond the vocabulary (and beyond int64)
    keeps every token; seeds outside int64 work and are taken modulo 2^64."""
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    p = [SamplingParams(temperature=1.0, top_p=1e-300, seed=3), SamplingParams(temperature=1.0, top_k=10**20, seed=3),
         SamplingParams(temperature=1.0, seed=3)]
    out = sample(logits, p, [q.generator() for q in p])
    assert not out.errors and out.tokens[0] == int(logits[0].argmax())
    ref = sample(logits[1:2], [p[2]], [p[2].generator()])
    assert out.tokens[1] == ref.tokens[0]  # top_k clamped to "all" draws like no top_k
    big = SamplingParams(seed=2**64 + 5, n=2).generator(1)
    assert torch.equal(torch.rand(4, generator=big), torch.rand(4, generator=SamplingParams(seed=6).generator()))
    SamplingParams(seed=-(2**63) - 1).generator()
    SamplingParams(seed=2**64 - 1, n=2).generator(1)


def test_engine_fails_an_unsampleable_request_alone(model, tok):
    """A request whose parameters slipped past validation (temperature 1e-300: logits / 0 in float32) fails
    alone with a message; the greedy and seeded requests sharing its batch give their solo outputs."""
    eng = Engine(model, tok, max_batch=8, block_size=4)
    good = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)]
    prompts = ["The quick brown fox", "Hello world"]
    alone = [eng.generate([p], g)[0].outputs[0] for p, g in zip(prompts, good)]
    bad = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    bad.temperature = 1e-300
    outs = eng.generate(prompts + ["def add"], good + [bad])
    assert [o.outputs[0].token_ids for o in outs[:2]] == [a.token_ids for a in alone]
    failed = outs[2].outputs[0]
    assert failed.finish_reason == "error" and "sampling failed" in failed.error
    assert eng.stats["failed"] == 1 and eng.pool.used_blocks == 0


def test_bad_requests_do_not_poison_a_running_stream(server):
    """While a greedy stream runs, requests with unworkable or extreme parameters arrive: each gets a 400 naming
    its parameter or a correct answer, and the stream's text is exactly its solo run's."""
    engine, url = server
    victim = greedy_body("The quick brown fox", 1000)
    solo, _ = stream_text(url, victim)
    crowded = {}

    def run_victim():
        crowded["text"], crowded["events"] = stream_text(url, victim)

    t = threading.Thread(target=run_victim)
    t.start()
    until(lambda: engine.stats["generation_tokens"] > 0 and engine.running, what="the victim to run")
    base = {"model": MODEL, "prompt": "Hello world", "max_tokens": 6, "ignore_eos": True}
    for field, value in [("temperature", 1e-300), ("temperature", 5e-6), ("stop", [""])]:
        is_openai_error(post(url, "completions", {**base, field: value}), 400, param=field, code="invalid_value")
    greedy = post(url, "completions", {**base, "temperature": 0}).json()["choices"][0]["text"]
    assert post(url, "completions", {**base, "top_p": 1e-300, "seed": 1}).json()["choices"][0]["text"] == greedy
    seeded = post(url, "completions", {**base, "seed": 0}).json()["choices"][0]["text"]
    assert post(url, "completions", {**base, "top_k": 10**20, "seed": 0}).json()["choices"][0]["text"] == seeded
    assert post(url, "completions", {**base, "seed": 2**64}).json()["choices"][0]["text"] == seeded
    for seed in [-(2**63) - 1, 2**64 - 1]:
        assert post(url, "completions", {**base, "seed": seed, "n": 2}).status_code == 200
        text, events = stream_text(url, {**base, "seed": seed, "n": 2})
        assert all(c.get("finish_reason") != "error" for e in events[:-1] if "choices" in e for c in e["choices"])
    assert engine.running, "the victim finished before the bad requests were done: make it longer"
    t.join(60)
    assert crowded["text"] == solo
    assert [c["finish_reason"] for e in crowded["events"][:-1] if "choices" in e for c in e["choices"]][-1] == "length"


# ---- input hygiene ----

SURROGATES = ['"\\ud800"', '"a\\ud800b"', '"\\udc00\\ud800"', '"ok \\udfff"']


@pytest.mark.parametrize("text", SURROGATES)
def test_lone_surrogates_are_400_naming_where(server, text):
    url = server[1]
    r = post(url, "completions", f'{{"model": "{MODEL}", "prompt": {text}, "max_tokens": 2}}'.encode())
    err = is_openai_error(r, 400, param="prompt", code="invalid_unicode")
    assert "surrogate" in err["message"]
    chat = (f'{{"model": "{MODEL}", "max_tokens": 2, "messages": [{{"role": "user", "content": "hi"}}, '
            f'{{"role": "user", "content": [{{"type": "text", "text": {text}}}]}}]}}').encode()
    is_openai_error(post(url, "chat/completions", chat), 400, param="messages.1.content.0.text", code="invalid_unicode")


@pytest.mark.parametrize("depth", [100, 5_000, 100_000])
def test_deep_json_is_400(server, depth):
    body = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, "junk": {"[" * depth}{"]" * depth}}}'.encode()
    assert "nested deeper" in is_openai_error(post(server[1], "completions", body), 400, code="invalid_json")["message"]
    assert post(server[1], "completions", greedy_body("still serving", 2)).status_code == 200


def test_body_size_limit_is_413_and_parsing_never_blocks_the_loop(model, tok):
    """A body over the limit is 413, declared or streamed; tokenising happens off the event loop: /health answers
    while a prompt is being encoded."""
    gate, entered = threading.Event(), threading.Event()

    def slow(text):
        if "SLOW" in text:
            entered.set()
            gate.wait(20)

    engine = Engine(model, HookedTokenizer(tok, slow), max_batch=4, block_size=4)
    with serving(engine, max_body_bytes=4096) as url:
        is_openai_error(post(url, "completions", greedy_body("x" * 5000, 2)), 413, code="request_too_large")

        def chunks():
            yield json.dumps(greedy_body("y" * 3000, 2))[:-1].encode()
            yield b', "pad": "' + b"z" * 3000 + b'"}'

        r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30)  # chunked: no Content-Length
        is_openai_error(r, 413, code="request_too_large")
        slow = threading.Thread(target=post, args=(url, "completions", greedy_body("SLOW prompt", 2)))
        slow.start()
        try:
            assert entered.wait(10)
            assert httpx.get(url + "/health", timeout=5).status_code == 200  # while the prompt is being encoded
        finally:
            gate.set()
            slow.join(30)


NOT_ROUTES = [("GET", "/v1/completions", 405), ("PUT", "/v1/chat/completions", 405), ("POST", "/v1/models", 405),
              ("DELETE", "/health", 405), ("GET", "/v1/nope", 404), ("POST", "/v2/completions", 404)]


@pytest.mark.parametrize("method,path,status", NOT_ROUTES)
def test_routing_errors_are_openai_shaped(server, method, path, status):
    r = httpx.request(method, server[1] + path, timeout=10)
    err = is_openai_error(r, status)
    assert path in err["message"]
    if status == 405:
        assert "allow" in r.headers


def test_chat_content_parts_and_developer_role(server):
    """OpenAI's content parts and the `developer` role render exactly as a string and a `system` message."""
    url = server[1]
    base = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    plain = post(url, "chat/completions", {**base, "messages": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hello\nworld"}]}).json()
    parts = post(url, "chat/completions", {**base, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]}).json()
    assert parts["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    err = is_openai_error(post(url, "chat/completions", {**base, "messages": [image]}), 400)
    assert err["param"].startswith("messages.0.content") and "text parts" in err["message"]


def test_500_is_openai_shaped_and_counted(model, tok):
    def broken(text):
        if "boom" in text:
            raise RuntimeError("tokenizer bug")

    engine = Engine(model, HookedTokenizer(tok, broken), max_batch=2, block_size=4)
    with serving(engine) as url:
        err = is_openai_error(post(url, "completions", greedy_body("boom", 2)), 500)
        assert err["type"] == "server_error"
        assert post(url, "completions", greedy_body("fine", 2)).status_code == 200
        httpx.get(url + "/nope")
        text = httpx.get(url + "/metrics").text
        for status in (200, 404, 500):
            assert f'qiusuo_http_responses_total{{status="{status}"}} 1' in text


# ---- limits that hold ----

def test_limits_count_streams_when_admitted(model, tok):
    """max_concurrency + max_queue bound requests in flight, streaming or not, from the moment each is admitted:
    with all three admitted ones held in tokenisation, the fourth (a stream) gets 429 with Retry-After."""
    gate = threading.Event()

    class Gate:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, text, *a, **kw):
            if "HOLD" in text:
                gate.wait(20)
            return self.inner.encode(text, *a, **kw)

    engine = Engine(model, Gate(tok), max_batch=2, block_size=4)
    with serving(engine, max_concurrency=2, max_queue=1) as url:
        results = []
        body = greedy_body("HOLD on", 3)

        def go(stream):
            if stream:
                results.append(stream_text(url, body)[0])
            else:
                results.append(post(url, "completions", body).json()["choices"][0]["text"])

        threads = [threading.Thread(target=go, args=(s,)) for s in (True, True, False)]
        for t in threads:
            t.start()
        try:
            until(lambda: "qiusuo_http_inflight_requests 3" in httpx.get(url + "/metrics").text,
                  what="three admitted requests")
            busy = post(url, "completions", {**body, "stream": True})
            is_openai_error(busy, 429, code="rate_limit_exceeded")
            assert int(busy.headers["retry-after"]) >= 1
        finally:
            gate.set()
            for t in threads:
                t.join(30)
        assert len(results) == 3 and len(set(results)) == 1
        until(lambda: "qiusuo_http_inflight_requests 0" in httpx.get(url + "/metrics").text, what="slots released")
        assert post(url, "completions", greedy_body("x", 2)).status_code == 200


# ---- fair scheduling ----

def test_admission_round_robin_between_requests(model, tok):
    """Each free row goes to the request holding the fewest rows, oldest first; one request takes at most
    `share` rows (3 of 4 here)."""
    sched = Scheduler(BlockPool(model.cache_specs(), num_blocks=64, block_size=4), max_batch=4)
    a, b, c = (Request(name, [i + 1] * 3, SamplingParams(max_tokens=2, n=n), set(), lambda d: None, tok)
               for i, (name, n) in enumerate([("a", 5), ("b", 1), ("c", 1)]))
    for r in (a, b, c):
        sched.add(r)
    admitted = [s for g in sched.admit() for s in g]
    assert [(s.req.id, s.index) for s in admitted] == [("a", 0), ("b", 0), ("c", 0), ("a", 1)]
    sched.finish(b.seqs[0], "length")
    sched.finish(c.seqs[0], "length")
    sched.collect()
    assert [(s.req.id, s.index) for g in sched.admit() for s in g] == [("a", 2)]  # a's share is 3 of 4 rows
    assert len(sched.running) == 3


def test_short_request_is_not_starved_by_n_copies(model, tok):
    """A request with n=8 long samples cannot hold the whole batch: a short request that arrives after it is
    admitted at once and finishes within a few steps, not after the hog's samples."""
    eng = Engine(model, tok, max_batch=4, block_size=4)
    ends = {}

    def sink(name):
        return lambda d: ends.setdefault(name, []).append(d)

    eng.submit("The lazy dog", SamplingParams(max_tokens=60, n=8, temperature=0, ignore_eos=True), sink("hog"))
    eng.step()
    eng.submit("Hello world", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), sink("short"))
    steps = 0
    while not any(isinstance(d, Usage) for d in ends.get("short", [])):
        eng.step()
        steps += 1
        assert steps <= 10, "the short request waited behind the hog's samples"
    while eng.has_work():
        eng.step()
    assert eng.pool.used_blocks == 0


# ---- abandoned work ----

def test_disconnected_non_streaming_request_is_aborted(long_model, tok):
    engine = Engine(long_model, tok, max_batch=4, block_size=4)
    with serving(engine) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(greedy_body("The lazy dog", 3500)).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        until(lambda: engine.stats["generation_tokens"] > 5, what="generation to start")
        s.close()
        until(lambda: engine.stats["aborted"] == 1 and not engine.has_work() and engine.pool.used_blocks == 0,
              what="the abandoned request to be aborted")
        produced = engine.stats["generation_tokens"]
        assert produced < 3500
        assert "qiusuo_http_disconnects_total 1" in httpx.get(url + "/metrics").text


def test_request_timeout_stops_a_long_request(long_model, tok):
    engine = Engine(long_model, tok, max_batch=4, block_size=4)
    with serving(engine, request_timeout=0.3) as url:
        err = is_openai_error(post(url, "completions", greedy_body("The lazy dog", 3500)), 504, code="request_timeout")
        assert "--request-timeout" in err["message"]
        _, events = stream_text(url, greedy_body("The lazy dog", 3500))
        assert events[-2]["error"]["code"] == "request_timeout"  # an error event, then [DONE]
        until(lambda: not engine.has_work() and engine.pool.used_blocks == 0, what="blocks freed")


# ---- connections: body and header deadlines, the cap ----

def raw(url):
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.settimeout(10)
    return s


def read_all(s) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_stalled_body_gets_408_and_is_closed(server):
    s = raw(server[1])
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"model\": ")
    reply = read_all(s)  # the server answers and closes: recv returns b"" instead of timing out
    assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply


def test_connection_cap_and_header_deadline(model, tok):
    engine = Engine(model, tok, max_batch=2, block_size=4)
    with serving(engine, dict(max_connections=3, header_timeout=0.5)) as url:
        silent = [raw(url) for _ in range(3)]
        silent[0].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        extra = raw(url)
        reply = read_all(extra)
        assert reply.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in reply
        assert read_all(silent[0]).startswith(b"HTTP/1.1 408")  # part of a request: answered, then closed
        for s in silent[1:]:
            assert read_all(s) == b""  # idle: closed at the header deadline
        for s in silent:
            s.close()
        assert httpx.get(url + "/health", timeout=5).status_code == 200


# ---- threads ----

def test_engine_threads_leave_a_busy_neighbours_core(monkeypatch, model, tok, tmp_path):
    """`--threads 0` (the default) takes the cores other processes leave free: with a neighbour spinning on one
    of two cores, one thread; `--threads N` is taken as given."""
    from qiusuo.hf import save_hf
    from qiusuo.infer.load import load_engine
    from qiusuo.runtime import free_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        assert free_cores()[1] == 1
    finally:
        busy.kill()
        busy.wait()
    save_hf(model, tmp_path, tokenizer=tok)
    before = torch.get_num_threads()
    try:
        load_engine(str(tmp_path), device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---- load: 32 concurrent streams equal their solo runs ----

def test_32_concurrent_streams_equal_alone(model, tok):
    engine = Engine(model, tok, max_batch=32, block_size=4)
    with serving(engine, max_concurrency=32, max_queue=8) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        reqs = []
        for i in range(32):
            kw = dict(temperature=0) if i % 4 else dict(temperature=0.9, seed=100 + i, n=2)
            reqs.append(dict(prompt=f"The quick brown fox {i} jumps" + " over" * (i % 5), max_tokens=6 + i % 7, **kw))

        def run(kw):
            texts = {}
            for c in client.completions.create(model=MODEL, stream=True, extra_body={"ignore_eos": True}, **kw):
                for ch in c.choices:
                    texts[ch.index] = texts.get(ch.index, "") + ch.text
            return texts

        alone = [run(kw) for kw in reqs]
        assert in_threads(run, reqs) == alone
        until(lambda: not engine.has_work() and engine.pool.used_blocks == 0, what="blocks freed")


# ---- graceful shutdown of a real `qiusuo serve` ----

def test_sigterm_drains_short_streams_stops_long_ones_and_exits(long_model, tok, tmp_path):
    from qiusuo.hf import save_hf

    save_hf(long_model, tmp_path / "model", tokenizer=tok)
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # a file, not a pipe nobody reads: access logs must never block it
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "serve", "--model", str(tmp_path / "model"),
                             "--port", str(port),
                             "--served-model-name", MODEL, "--shutdown-timeout", "3", "--threads", "1",
                             "--block-size", "4", "--max-concurrency", "8"],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                return False

        until(up, 120, "the server to load")
        out = [None] * 8
        started = [threading.Event() for _ in range(8)]

        def go(i):
            body = greedy_body(f"The lazy dog {i}", 3500 if i < 4 else 150)
            events = []
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        started[i].set()
                        events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
            out[i] = events

        threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)  # raises if the server does not exit
        for t in threads:
            t.join(30)
        for i, events in enumerate(out):
            assert events and events[-1] == "[DONE]", (i, events[-2:] if events else None)
            if i < 4:
                assert events[-2]["error"]["code"] == "server_shutdown"
            else:
                assert [c["finish_reason"] for e in events[:-1] if "choices" in e for c in e["choices"]][-1] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def test_sigint_ends_serve_with_one_line_and_no_traceback(long_model, tok, tmp_path):
    """Ctrl-C on a real `qiusuo serve` with a stream in flight: uvicorn drains as on SIGTERM, then the command
    ends with exit code 0 or 130 and no Python traceback (uvicorn re-raises the signal after its shutdown)."""
    from qiusuo.hf import save_hf

    save_hf(long_model, tmp_path / "model", tokenizer=tok)
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "serve", "--model", str(tmp_path / "model"),
                             "--port", str(port), "--served-model-name", MODEL, "--shutdown-timeout", "1",
                             "--threads", "1", "--block-size", "4"],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                return False

        until(up, 120, "the server to load")
        started, events = threading.Event(), []

        def go():
            with contextlib.suppress(httpx.HTTPError):
                with httpx.stream("POST", url + "/v1/completions", json={**greedy_body("The lazy dog", 3500),
                                                                         "stream": True}, timeout=60) as r:
                    for line in r.iter_lines():
                        started.set()
                        events.append(line)

        client = threading.Thread(target=go)
        client.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
        client.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert rc in (0, 130), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "data: [DONE]" in events  # the stream in flight was ended, not cut
