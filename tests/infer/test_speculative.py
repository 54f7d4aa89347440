"""MTP speculative decoding against plain decoding: greedy token for token (MLA and V4, alone and batched, the
model's own drafts and an oracle's that are right for a random number of tokens, so every acceptance length and
rollback happens), the caches after rollback against a run that never drafted, the sampled distribution against
the model's exact one, and no leaks."""

import asyncio

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.infer.engine import Engine
from qiusuo.cache.pool import PagedBatch
from qiusuo.infer.runner import ModelRunner
from qiusuo.infer.sampling import SamplingParams
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.cache.window import entry_slots, ring_reads
from qiusuo.model.transformer import Transformer
from engine_models import abort_midway, perturbed, prompts  # tests/infer/engine_models.py
from greedy import unambiguous  # tests/greedy.py

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def mla(tok):
    return perturbed(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1))


@pytest.fixture(scope="module")
def v4(tok):
    """v4-tiny (window 16, CSA m = 4 top-4, HCA m' = 16) with its MTP block; 16 indexer heads: no ties."""
    return perturbed(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1, index_n_heads=16))


@pytest.fixture
def oracle(monkeypatch):
    """`oracle(refs)`: before each verification, every sequence's drafts become its reference continuation for a
    random 0..K tokens, then wrong tokens: acceptance of every length, rejections at every position."""
    def install(refs: dict[tuple, list[int]], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        original = ModelRunner._speculate

        def speculate(self, seqs):
            for s in seqs:
                ref = refs[tuple(s.req.prompt)]
                done = len(s.out) + 1
                right = int(torch.randint(0, self.K + 1, (), generator=g))
                truth = ref[done: done + self.K] + [0] * self.K
                s.drafts = [t if j < right else (t + 1) % 50 for j, t in enumerate(truth[: self.K])]
                s.draft_q = [None] * self.K
            return original(self, seqs)
        monkeypatch.setattr(ModelRunner, "_speculate", speculate)
    return install


@pytest.mark.parametrize("K", [1, 3])
def test_greedy_equals_plain_alone_and_batched(mla, tok, K):
    """The model's own drafts (a random MTP module: mostly rejected), at batch 1 and 8 requests of different
    lengths together: the tokens of plain greedy decoding; nothing leaks."""
    n = 14
    ps, refs = unambiguous(mla, tok, (5, 17, 33, 2, 9, 24, 13, 40), n)
    alone = Engine(mla, tok, max_batch=1, block_size=4, speculative="mtp", draft_tokens=K)
    assert [alone.generate([p], SamplingParams(max_tokens=n, **GREEDY))[0].outputs[0].token_ids
            for p in ps[:3]] == refs[:3]
    eng = Engine(mla, tok, max_batch=8, block_size=4, speculative="mtp", draft_tokens=K)
    outs = eng.generate(ps, SamplingParams(max_tokens=n, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert eng.pool.used_blocks == 0
    stats = eng.speculation
    assert 0 <= stats["acceptance_rate"] <= 1 and stats["tokens_per_step"] >= 1


def test_hopeless_drafts_are_given_up_and_the_output_stays_exact(mla, tok):
    """A random MTP module's drafts are (nearly) never accepted: after `PROBE` drafting steps each sequence stops
    drafting and decodes plainly, still greedy's tokens; its later blocks stay out of the prefix cache (its
    drafter's cache has holes there), so a repeat of the request is exact too and nothing leaks."""
    from qiusuo.infer.runner import PROBE

    n = 3 * PROBE
    ps, refs = unambiguous(mla, tok, (5, 21, 12), n, seed=2)
    eng = Engine(mla, tok, max_batch=4, block_size=4, speculative="mtp", draft_tokens=2)
    for _ in range(2):
        outs = eng.generate(ps, SamplingParams(max_tokens=n, **GREEDY))
        assert [o.outputs[0].token_ids for o in outs] == refs
    c = eng.runner.counters
    assert c.drafted[0] <= 2 * 3 * (PROBE + 1) < c.steps  # drafting stopped; plain steps went on
    assert eng.pool.used_blocks == 0


@pytest.mark.parametrize("name", ["mla", "v4"])
def test_every_acceptance_length_keeps_greedy_exact(name, tok, oracle, request):
    """Drafts right for a random number of tokens (K = 3): rows of one batch accept different lengths each
    step, every rejection position rolls back (V4: window rings, compressor tails and entries past the window
    and many compression windows), and the output is still plain greedy's."""
    model = request.getfixturevalue(name)
    n = 30
    ps, refs = unambiguous(model, tok, (5, 17, 33, 60, 1, 40, 23, 9), n)
    oracle({tuple(p): r for p, r in zip(ps, refs)})
    eng = Engine(model, tok, max_batch=8, block_size=4, max_model_len=128, speculative="mtp", draft_tokens=3)
    outs = eng.generate(ps, SamplingParams(max_tokens=n, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == refs
    stats = eng.speculation
    assert stats["tokens_per_step"] > 1.8  # the oracle's right drafts were accepted
    assert 0 < stats["acceptance_rate_3"] < stats["acceptance_rate_1"] < 1
    assert eng.pool.used_blocks == 0 and len(eng.pool.free_states) == (8 if name == "v4" else 0)


def logical_cache(pool, table) -> list[torch.Tensor]:
    """What a sequence's cache holds that a later query can read, per layer: latents of its positions; V4: its
    window, open compression windows and compressed entries (stale slots past the length excluded)."""
    n = table.num_cached
    out = []
    batch = PagedBatch(pool, [table], 1)
    st = torch.tensor([table.state if table.state is not None else 0])
    for data in pool.layers:
        if not hasattr(data, "ring"):  # latent layers: the latents of its positions
            out.append(data.latent.read((pool.slots([table], n)[0],)))
            continue
        start = torch.tensor([n])
        at, pos = ring_reads(data.ring, st, start, data.window)
        out.append(data.ring.read((at,))[pos >= 0])
        for p in data.pools.values():
            at, tpos = ring_reads(p.tail_kv, st, start, p.spec.span)
            out.append(p.tail_kv.read((at,))[tpos >= 0])
            e = n // p.spec.ratio
            out.append(p.entries.read((entry_slots(batch, p, torch.arange(e)[None])[0],)))
    return out


@pytest.mark.parametrize("name", ["mla", "v4"])
def test_rollback_leaves_the_cache_of_a_run_that_never_drafted(name, tok, oracle, request):
    """After steps with rejections, the main layers' cache equals a plain engine's at the same length, and the
    drafter's layer equals the MTP module run once over the whole sequence (contiguous reference)."""
    model = request.getfixturevalue(name)
    (p,), (ref,) = unambiguous(model, tok, (37,), 40, seed=3)
    oracle({tuple(p): ref}, seed=1)
    spec = Engine(model, tok, max_batch=1, block_size=4, speculative="mtp", draft_tokens=3)
    plain = Engine(model, tok, max_batch=1, block_size=4)
    params = SamplingParams(max_tokens=40, **GREEDY)
    spec.submit(p, params, lambda d: None)
    plain.submit(p, params, lambda d: None)
    for _ in range(6):
        spec.step()
    s = spec.running[0]
    assert s.table.num_cached > len(p) + 6  # some drafts were accepted
    while not plain.running or plain.running[0].table.num_cached < s.table.num_cached:
        plain.step()
    t = plain.running[0].table
    assert t.num_cached == s.table.num_cached
    got, want = logical_cache(spec.pool, s.table), logical_cache(plain.pool, t)
    L = model.cfg.num_hidden_layers
    drafter = got.pop(L) if name == "mla" else got.pop(-1)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # the drafter's layer: the module over (state at t, token t + 1) for every cached position, in one pass
    ids = torch.tensor([s.tokens + [s.pending]])
    n = s.table.num_cached
    cache = ContiguousCache(model.cache_specs(draft=True), 1, n)
    with torch.no_grad():
        state = model.states(ids[:, :n], cache)
        cache.tables[0].num_cached = 0
        model.draft_states(state, ids[:, 1: n + 1], cache, absorb=False)
        cache.advance(n)
    full = logical_cache(cache.pool, cache.tables[0])[-1]  # the drafter's layer
    assert drafter.shape == full.shape and torch.allclose(drafter, full, atol=1e-5)


class IdTokenizer:
    """Token ids as text: a vocabulary of `n` tokens with no stop token."""

    stop_ids: list[int] = []
    eos_id = None

    def __init__(self, n: int):
        self.vocab_size = n

    def encode(self, text):
        return [int(x) for x in text.split()]

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def test_sampled_output_follows_the_target_distribution(monkeypatch):
    """8-token vocabulary, K = 2, temperature 1: the 2nd and 3rd output tokens both come from the first
    speculative step (the first draft's acceptance or resampling, then the second's or the bonus). Their
    empirical joint over 4,096 seeded samples is within total variation 0.06 of the model's exact distribution
    (computed by enumerating every continuation; ~20 cells carry its mass, so sampling noise alone is ~0.03);
    accepting every draft instead (a broken rule) lands far outside."""
    model = perturbed(get_config("tiny", vocab_size=8, num_nextn_predict_layers=1))
    with torch.no_grad():  # sharper than at init, and the drafter's q differs from p: the rule has work to do
        model.lm_head.weight.mul_(5)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)  # (8,)
        exact = torch.zeros(8, 8)
        for a in range(8):
            p2 = model(torch.tensor([prompt + [a]]))[0, -1].softmax(-1)
            for b in range(8):
                p3 = model(torch.tensor([prompt + [a, b]]))[0, -1].softmax(-1)
                exact += p1[a] * p2[b] * p3[None, :] * (torch.arange(8) == b)[:, None]
    tok = IdTokenizer(8)

    def empirical(requests: int = 64) -> torch.Tensor:
        eng = Engine(model, tok, max_batch=64, block_size=4, speculative="mtp", draft_tokens=2)
        params = [SamplingParams(max_tokens=4, temperature=1.0, seed=1000 * i, n=64, ignore_eos=True)
                  for i in range(requests)]
        outs = eng.generate([prompt] * requests, params)
        counts = torch.zeros(8, 8)
        for o in outs:
            for c in o.outputs:
                counts[c.token_ids[1], c.token_ids[2]] += 1
        assert eng.pool.used_blocks == 0
        return counts / counts.sum(), eng.speculation

    got, stats = empirical()
    assert 0.05 < stats["acceptance_rate_2"] and stats["acceptance_rate_1"] < 0.95  # both branches ran, both drafts
    assert 0.5 * (got - exact).abs().sum() < 0.06
    from qiusuo.infer import speculative

    def always(probs, drafts, qs, gen):
        return drafts + [speculative._draw(probs[len(drafts)], gen)]
    monkeypatch.setattr(speculative, "_accept_sampled", always)
    broken, _ = empirical(16)  # 1,024 samples: noise ~0.06, the broken rule's distance several times that
    assert 0.5 * (broken - exact).abs().sum() > 0.15


def test_seeds_n_stop_strings_logprobs_and_prefix_hits(mla, tok):
    """Per-request seeds reproduce (alone or crowded), n=2 samples differ, a stop string cuts as in plain
    decoding, greedy logprobs equal plain's, and a prefix-cache hit gives the miss's tokens."""
    eng = Engine(mla, tok, max_batch=8, block_size=4, speculative="mtp", draft_tokens=2)
    plain = Engine(mla, tok, max_batch=8, block_size=4)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=2, ignore_eos=True)
    text = "The quick brown fox jumps over the lazy dog. The quick"
    alone = eng.generate([text], p)[0]
    noise = SamplingParams(max_tokens=6, temperature=1.3, ignore_eos=True)
    crowded = eng.generate(["Hello world", text, "def add(a"], [noise, p, noise])[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowded.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids
    g = SamplingParams(max_tokens=16, logprobs=2, **GREEDY)
    miss, want = eng.generate([text], g)[0], plain.generate([text], g)[0]
    hit = eng.generate([text], g)[0]
    assert hit.usage.cached_tokens > 0
    for o in (miss, hit):
        assert o.outputs[0].token_ids == want.outputs[0].token_ids
        assert torch.allclose(torch.tensor(o.outputs[0].logprobs), torch.tensor(want.outputs[0].logprobs), atol=1e-4)
        assert [[i for i, _ in t] for t in o.outputs[0].top_logprobs] == [
            [i for i, _ in t] for t in want.outputs[0].top_logprobs]
    full = want.outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = [e.generate([text], SamplingParams(max_tokens=16, stop=[stop], **GREEDY))[0].outputs[0] for e in (eng, plain)]
    assert cut[0].text == cut[1].text and cut[0].finish_reason == cut[1].finish_reason == "stop"
    assert eng.pool.used_blocks == 0


def test_aborts_and_disconnects_leak_nothing(v4, tok):
    eng = Engine(v4, tok, max_batch=4, max_model_len=96, speculative="mtp", draft_tokens=2)
    got = abort_midway(eng, prompts(tok, (40,), seed=8)[0], steps=3)
    assert got and eng.pool.used_blocks == 0 and len(eng.pool.free_states) == 4

    async def disconnect():
        eng.start()
        try:
            stream = eng.stream(prompts(tok, (20,), seed=9)[0], SamplingParams(max_tokens=60, ignore_eos=True))
            async for _ in stream:
                break
            await stream.aclose()  # the client went away
            for _ in range(200):
                if not eng.has_work():
                    break
                await asyncio.sleep(0.01)
        finally:
            eng.shutdown()
    asyncio.run(disconnect())
    assert eng.pool.used_blocks == 0 and len(eng.pool.free_states) == 4


def test_compiled_speculative_decoding_equals_eager(mla, tok):
    """The compiled verification (K + 1 tokens a row, rows padded), drafter and, once every row gave up
    drafting (the random MTP module), the compiled plain step: greedy tokens equal eager ones."""
    from qiusuo.infer.runner import PROBE

    ps = prompts(tok, (5, 30, 19), seed=4)
    params = SamplingParams(max_tokens=PROBE + 8, **GREEDY)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = Engine(mla, tok, max_batch=4, speculative="mtp", draft_tokens=2).generate(ps, params)
    compiled = Engine(mla, tok, max_batch=4, speculative="mtp", draft_tokens=2, compile=True).generate(ps, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in compiled]


def test_bad_speculative_settings_say_what_to_do(model, tok):
    with pytest.raises(ValueError, match="no.*MTP|num_nextn_predict_layers"):
        Engine(model, tok, speculative="mtp")  # the shared fixture has no MTP module
    mtp = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="draft source"):
        Engine(mtp, tok, speculative="eagle")
    with pytest.raises(ValueError, match="draft_tokens"):
        Engine(mtp, tok, speculative="mtp", draft_tokens=0)


def test_generate_command_and_server_with_speculation(mla, tok, tmp_path, capsys):
    """`qiusuo generate --speculative mtp` prints plain greedy's text; a server on a speculative engine streams
    what it answers plainly, and /metrics reports acceptance by draft position."""
    import httpx
    import openai

    from qiusuo import cli
    from qiusuo.hf import save_hf
    from qiusuo.infer.server import create_app, serve_in_thread

    save_hf(mla, tmp_path, tokenizer=tok)
    prompt = "The quick brown fox"
    want = Engine(mla, tok).generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-tokens", "12",
                     "--speculative", "mtp", "--draft-tokens", "2"]) == 0
    assert capsys.readouterr().out == want
    engine = Engine(mla, tok, max_batch=4, speculative="mtp", draft_tokens=2)
    srv, url = serve_in_thread(create_app(engine, "qiusuo-mtp"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model="qiusuo-mtp", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        plain = client.completions.create(**kw).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        assert streamed == plain
        metrics = httpx.get(url + "/metrics").text
        assert 'qiusuo_spec_acceptance_rate{position="2"}' in metrics and "qiusuo_spec_mean_tokens_per_step" in metrics
    finally:
        srv.should_exit = True
        engine.shutdown()
