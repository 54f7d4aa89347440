"""DeepSeek-V4 in the paged engine: window rings and compressor tails per sequence state, compressed entries in
blocks. Held against the model's own full forward and the contiguous-cache greedy reference."""

import openai
import pytest
import torch

from qiusuo.config import get_config
from qiusuo.infer.engine import Engine
from qiusuo.cache.pool import BlockPool, PagedBatch
from qiusuo.infer.sampling import SamplingParams
from qiusuo.infer.server import create_app, serve_in_thread
from qiusuo.model.transformer import Transformer
from engine_models import abort_midway, in_threads, perturbed, prompts, wait_until_idle  # tests/infer/engine_models.py
from greedy import unambiguous  # tests/greedy.py

TOL = 1e-4


@pytest.fixture(scope="module")
def v4(tok):
    """v4-tiny (window 16, CSA m = 4 with top-4, HCA m' = 16) with every tensor random, so sinks, position biases
    and mHC bases matter; 16 indexer heads so the indexer's selections do not tie."""
    return perturbed(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0, index_n_heads=16))


def test_engine_greedy_equals_the_reference_at_any_batch(v4, tok):
    """8 requests of different lengths decoded together (past the window, the top-k and many windows) give
    the contiguous reference's greedy tokens; nothing leaks afterwards."""
    engine = Engine(v4, tok, max_batch=8, block_size=4, max_model_len=128)
    assert engine.pool.block_size == 16  # a multiple of every compression rate
    ps, refs = unambiguous(v4, tok, (5, 17, 33, 60, 1, 40, 23, 9), 30)
    outs = engine.generate(ps, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert engine.pool.used_blocks == 0 and len(engine.pool.free_states) == 8


def test_paged_logits_equal_the_full_forward(v4, tok):
    """Two rows at different lengths prefilled in different-size pieces in one batch, then decoded together:
    every step's logits equal each sequence's own full forward."""
    pool = BlockPool(v4.cache_specs(), num_blocks=16, block_size=16, num_states=2)
    a, b = prompts(tok, (52, 38), seed=1)
    ta, tb = pool.allocate(a, 60), pool.allocate(b, 60)
    full = [v4(torch.tensor([s])) for s in (a, b)]
    got = [[], []]
    with torch.no_grad():
        for ca, cb in ((9, 20), (30, 1), (5, 10)):  # ragged pieces: (a, b) new tokens per step
            ia, ib = a[ta.num_cached: ta.num_cached + ca], b[tb.num_cached: tb.num_cached + cb]
            T = max(len(ia), len(ib))
            ids = torch.tensor([ia + [0] * (T - len(ia)), ib + [0] * (T - len(ib))])
            logits = v4(ids, cache=PagedBatch(pool, [ta, tb], [len(ia), len(ib)]))
            got[0].append(logits[0, : len(ia)])
            got[1].append(logits[1, : len(ib)])
        while ta.num_cached < len(a) or tb.num_cached < len(b):  # then one token at a time, rows finishing apart
            rows = [(t, s, g) for t, s, g in ((ta, a, got[0]), (tb, b, got[1])) if t.num_cached < len(s)]
            ids = torch.tensor([[s[t.num_cached]] for t, s, _ in rows])
            logits = v4(ids, cache=PagedBatch(pool, [t for t, _, _ in rows], 1))
            for (_, _, g), row in zip(rows, logits):
                g.append(row)
    for f, g in zip(full, got):
        assert (torch.cat(g) - f[0]).abs().max() < TOL


def test_a_row_never_reads_another_rows_state_or_entries(v4, tok):
    """Poison B's window state and its blocks' compressed entries with NaN between steps: A's next logits are
    finite and equal to A's decoding alone (even a masked read would turn them into NaN)."""
    a, b = prompts(tok, (41, 29), seed=2)

    def run(poison: bool):
        pool = BlockPool(v4.cache_specs(), num_blocks=12, block_size=16, num_states=2)
        ta, tb = pool.allocate(a, 48), pool.allocate(b, 48)
        with torch.no_grad():
            T = max(len(a), len(b))
            v4(torch.tensor([a + [0] * (T - len(a)), b + [0] * (T - len(b))]),
               cache=PagedBatch(pool, [ta, tb], [len(a), len(b)]))
            if poison:
                for layer in pool.layers:
                    layer.poison(tb.state, float("nan"))
                    for p in layer.pools.values():
                        per = pool.block_size // p.spec.ratio
                        for blk in tb.blocks:
                            p.entries.values[blk * per: (blk + 1) * per] = float("nan")
            return v4(torch.tensor([[3], [4]]), cache=PagedBatch(pool, [ta, tb], 1))[0]

    clean, poisoned = run(False), run(True)
    assert torch.isfinite(poisoned).all() and (poisoned - clean).abs().max() < TOL


def test_token_by_token_from_an_empty_cache_equals_the_full_forward(v4, tok):
    """No prefill at all: every token fed alone from position 0, past the window (16), many CSA windows and the
    top-k (4), and HCA windows (16)."""
    pool = BlockPool(v4.cache_specs(), num_blocks=8, block_size=16, num_states=1)
    (seq,) = prompts(tok, (70,), seed=7)
    table = pool.allocate(seq, 70)
    with torch.no_grad():
        steps = torch.cat([v4(torch.tensor([[t]]), cache=PagedBatch(pool, [table], 1))[0] for t in seq])
        assert (steps - v4(torch.tensor([seq]))[0]).abs().max() < TOL


def test_long_prompts_prefill_in_pieces_exactly(v4, model, tok):
    """`max_prefill_tokens` smaller than a prompt: pieces give the same tokens as one forward (V4, V4 with one
    indexer head so that most indexer scores tie at exactly 0, and V3)."""
    ps = prompts(tok, (70, 45, 12), seed=3)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    torch.manual_seed(1)
    tied = Transformer(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                  index_n_heads=1)).eval()
    for m in (v4, tied, model):
        one = Engine(m, tok, max_batch=4, max_model_len=96).generate(ps, params)
        pieces = Engine(m, tok, max_batch=4, max_model_len=96, max_prefill_tokens=7).generate(ps, params)
        assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in pieces]


def test_aborted_and_finished_requests_leave_nothing_behind(v4, tok):
    engine = Engine(v4, tok, max_batch=4, max_model_len=96)
    got = abort_midway(engine, prompts(tok, (40,), seed=8)[0])
    assert got and engine.pool.used_blocks == 0 and len(engine.pool.free_states) == 4


def test_compiled_decoding_equals_eager(tok):
    """The compiled step (rows padded to a power of two, context gathered in multiples of 64) on V4's paged
    caches: the same greedy tokens as eager for ragged requests. One layer of each attention kind (compiling
    is most of this test's time)."""
    v4 = perturbed(get_config("v4-tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0, index_n_heads=16,
                              num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"], layer_types=[
                                  "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]))
    ps = prompts(tok, (5, 30, 19), seed=4)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    eager = Engine(v4, tok, max_batch=4, max_model_len=96).generate(ps, params)
    compiled = Engine(v4, tok, max_batch=4, max_model_len=96, compile=True).generate(ps, params)
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in compiled]


def test_what_v4_cannot_do_says_so(v4, tok):
    with pytest.raises(ValueError, match="num_states"):
        BlockPool(v4.cache_specs(), num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="block size"):
        BlockPool(v4.cache_specs(), num_blocks=4, block_size=8, num_states=1)
    with pytest.raises(ValueError, match="window states"):
        Engine(v4, tok, max_batch=8, cache_memory=1000)
    engine = Engine(v4, tok, max_batch=2, max_model_len=64)
    with pytest.raises(ValueError, match="context is 64 tokens"):
        engine.submit([1] * 60, SamplingParams(max_tokens=10), lambda d: None)


def test_openai_client_against_a_v4_server(v4, tok):
    """Greedy, streaming equal to plain, n=2 with seeds, 8 concurrent equal to alone, no leaked blocks or states."""
    engine = Engine(v4, tok, max_batch=8, block_size=16, max_model_len=128)
    srv, url = serve_in_thread(create_app(engine, "qiusuo-v4", api_key=None, max_concurrency=16, max_queue=16))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def greedy(prompt, n=16, **kw):
            return client.completions.create(model="qiusuo-v4", prompt=prompt, max_tokens=n, temperature=0,
                                             extra_body={"ignore_eos": True}, **kw)

        plain = greedy("The quick brown fox").choices[0].text
        streamed = "".join(c.choices[0].text for c in greedy("The quick brown fox", stream=True) if c.choices)
        assert streamed == plain
        two = client.completions.create(model="qiusuo-v4", prompt="hello", max_tokens=8, n=2, seed=7,
                                        temperature=1.0, extra_body={"ignore_eos": True})
        again = client.completions.create(model="qiusuo-v4", prompt="hello", max_tokens=8, n=2, seed=7,
                                          temperature=1.0, extra_body={"ignore_eos": True})
        assert [c.text for c in two.choices] == [c.text for c in again.choices] and len(two.choices) == 2
        texts = [f"def add(a, b): {i}" + " return" * (i % 3) for i in range(8)]
        alone = [greedy(t, 10 + i).choices[0].text for i, t in enumerate(texts)]
        assert in_threads(lambda i: greedy(texts[i], 10 + i).choices[0].text, list(range(8))) == alone
        wait_until_idle(engine)
        assert engine.pool.used_blocks == 0 and len(engine.pool.free_states) == 8
    finally:
        srv.should_exit = True
        engine.shutdown()


def test_prefix_hits_reuse_blocks_and_a_snapshot_and_equal_misses(v4, tok):
    """A second prompt sharing the first's leading blocks starts after them (its window state restored from the
    snapshot taken at the first's last full block) and gives the same tokens as on a fresh engine; n=4 copies of
    one prompt compute its prefix once."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (base,) = prompts(tok, (50,), seed=5)
    other = base[:48] + prompts(tok, (9,), seed=6)[0]  # shares 3 full blocks (48 tokens) with `base`
    engine = Engine(v4, tok, max_batch=4, max_model_len=96)
    engine.generate([base], params)
    hit = engine.generate([other], params)[0]
    assert engine.pool.hit_tokens == 48  # `base` snapshotted its state at 48, its last full block
    shorter = Engine(v4, tok, max_batch=4, max_model_len=96)
    shorter.generate([base], params)
    shorter.generate([base[:40] + other[48:]], params)
    assert shorter.pool.hit_tokens == 0  # 2 shared blocks, but no snapshot at 32: recomputed
    miss = Engine(v4, tok, max_batch=4, max_model_len=96).generate([other], params)[0]
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    fresh = Engine(v4, tok, max_batch=4, max_model_len=96)
    four = fresh.generate([other], SamplingParams(max_tokens=8, temperature=1.0, seed=1, n=4, ignore_eos=True))[0]
    assert fresh.pool.hit_tokens == 3 * 48 and len(four.outputs) == 4
    assert fresh.pool.used_blocks == 0 and len(fresh.pool.free_states) == 4
