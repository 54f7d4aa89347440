"""The engine against slow references: one-at-a-time generation, the expanded attention path, the cache formula;
the prefix cache, sampling and incremental detokenisation."""

import pytest
import torch

from qiusuo.infer import BlockPool, Engine, PagedBatch, SamplingParams, sample
from qiusuo.infer.sampling import filter_probs

PROMPTS = ["The quick brown fox", "Hello world, héllo wörld 你好", "def add(a, b):\n    return",
           "Continuous batching lets requests join and leave", "x", "The lazy dog. The quick brown fox jumps over"]


def test_batched_greedy_equals_one_at_a_time(model, tok):
    """Continuous batching (3 slots for 6 prompts of different lengths, rows joining and leaving) gives exactly
    the tokens of `model.generate` run on each prompt alone."""
    eng = Engine(model, tok, max_batch=3, block_size=4)
    n = [7, 12, 5, 9, 11, 6]
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in n]
    outs = eng.generate(PROMPTS, params)
    for p, k, o in zip(PROMPTS, n, outs):
        ids = torch.tensor([tok.encode(p)])
        ref = model.generate(ids, k)[0, ids.shape[1]:].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length" and o.usage.completion_tokens == k
    assert eng.pool.used_blocks == 0


@pytest.mark.parametrize("together", [False, True])
def test_absorbed_decode_equals_expanded_over_paged_cache(model, tok, together):
    """Decode logits of two ragged rows through the paged cache: absorbed == expanded (fp32, <= 1e-4), and both
    equal a full forward pass without a cache; also with rows padded to fixed shapes (the compiled step's input)
    and with both prompts prefilled in one right-padded batch."""
    pool = BlockPool(model.cfg, num_blocks=16, block_size=4)
    seqs = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[3])]
    assert len(seqs[0]) != len(seqs[1])
    pool.allocate([1, 2, 3], 4)  # someone else's block 0: padding must never write there
    tables = [pool.allocate(s, len(s) + 2) for s in seqs]
    with torch.no_grad():
        if together:
            T = max(len(s) for s in seqs) - 1
            ids = torch.tensor([s[:-1] + [0] * (T - len(s) + 1) for s in seqs])
            model.hidden(ids, cache=PagedBatch(pool, tables, [len(s) - 1 for s in seqs]), absorb=False)
        else:
            for s, t in zip(seqs, tables):
                model.hidden(torch.tensor([s[:-1]]), cache=PagedBatch(pool, [t], len(s) - 1), absorb=False)
        for s, t in zip(seqs, tables):
            t.num_cached += len(s) - 1  # the engine advances the tables after each forward
        last = torch.tensor([[s[-1]] for s in seqs])
        saved = [x.clone() for x in pool.layers]
        absorbed = model(last, cache=PagedBatch(pool, tables, 1), absorb=True)[:, -1]
        for x, y in zip(pool.layers, saved):
            x.copy_(y)
        expanded = model(last, cache=PagedBatch(pool, tables, 1), absorb=False)[:, -1]
        for x, y in zip(pool.layers, saved):
            x.copy_(y)
        padded = torch.cat([last, torch.zeros(2, 1, dtype=torch.long)])  # 4 rows, context gathered to 24
        fixed = model.decode_step(padded, PagedBatch(pool, tables, 1, rows=4, length=24))[:2]
        full = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    assert (absorbed - expanded).abs().max() <= 1e-4
    assert (absorbed - full).abs().max() <= 1e-4
    assert (fixed - full).abs().max() <= 1e-4
    owned = {b for t in tables for b in t.blocks}
    others = [b for b in range(pool.num_blocks) if b not in owned]
    untouched = torch.stack(pool.layers)[:, : pool.scratch].view(len(pool.layers), pool.num_blocks, 4, -1)[:, others]
    assert untouched.abs().sum() == 0  # padding rows and positions wrote only to the scratch slot


def test_cache_bytes_per_token_matches_formula(model, tok):
    eng = Engine(model, tok, max_batch=2)
    assert eng.pool.bytes_per_token == model.cfg.cache_bytes_per_token(4)
    assert eng.pool.layers[0].shape[-1] == model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim


def test_prefix_cache_hit_equals_miss_and_frees(model, tok):
    eng = Engine(model, tok, max_batch=4, block_size=4)
    prompt = PROMPTS[5]
    p = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    miss = eng.generate([prompt], p)[0]
    assert miss.usage.cached_tokens == 0 and eng.pool.used_blocks == 0
    hit = eng.generate([prompt], p)[0]
    assert hit.usage.cached_tokens >= 4 * ((len(tok.encode(prompt)) - 1) // 4)
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    assert torch.allclose(torch.tensor(hit.outputs[0].logprobs), torch.tensor(miss.outputs[0].logprobs), atol=1e-5)
    assert eng.pool.used_blocks == 0


def test_pool_refcounts_and_lru_eviction(model):
    pool = BlockPool(model.cfg, num_blocks=4, block_size=2)
    a = pool.allocate([1, 2, 3, 4, 5], 6)  # 3 blocks
    a.num_cached = 5
    pool.register(a, [1, 2, 3, 4, 5])  # blocks 0, 1 full and named
    b = pool.allocate([1, 2, 3, 4, 9], 6)  # shares two blocks, needs one fresh
    assert b.blocks[:2] == a.blocks[:2] and b.num_shared == 4
    assert [pool.refcount[x] for x in a.blocks[:2]] == [2, 2]
    assert pool.allocate([7, 7, 7], 4) is None  # 2 fresh needed, none free
    a_blocks = list(a.blocks)
    pool.release(a)
    pool.release(b)
    assert pool.used_blocks == 0 and len(pool.lru) == 2
    c = pool.allocate([1, 2, 3], 4)  # revives the first cached block
    assert c.blocks[0] == a_blocks[0] and c.num_shared == 2
    d = pool.allocate([8, 8, 8], 4)  # needs 2 blocks: the last free one + evicting the parked one
    assert d is not None and a_blocks[1] in d.blocks and len(pool.by_hash) == 1


def test_sampling_seed_is_batch_independent(model, tok):
    eng = Engine(model, tok, max_batch=8, block_size=4)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=2, ignore_eos=True)
    alone = eng.generate([PROMPTS[0]], p)[0]
    noise = SamplingParams(max_tokens=6, temperature=1.3, ignore_eos=True)
    crowded = eng.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [noise, p, noise])[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowded.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # samples of one request differ


def test_filters_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    probs, ids = filter_probs(logits, torch.tensor([1.0, 0.5, 1.0]), torch.tensor([5, 0, 0]),
                              torch.tensor([1.0, 0.6, 1.0]), torch.tensor([0.0, 0.0, 0.3]))
    kept = [set(ids[r][probs[r] > 0].tolist()) for r in range(3)]
    assert kept[0] == set(logits[0].topk(5).indices.tolist())
    p1 = torch.softmax(logits[1] / 0.5, -1)
    order = p1.argsort(descending=True)
    n = int((p1[order].cumsum(0) < 0.6).sum()) + 1  # smallest prefix reaching 0.6
    assert kept[1] == set(order[:n].tolist())
    p2 = torch.softmax(logits[2], -1)
    assert kept[2] == set((p2 >= 0.3 * p2.max()).nonzero()[:, 0].tolist())
    greedy = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert greedy.tokens == logits.argmax(-1).tolist()
    topk1 = sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 3, [torch.Generator().manual_seed(i) for i in range(3)])
    assert topk1.tokens == greedy.tokens


def test_stop_strings_and_streamed_text(model, tok):
    """Streamed pieces concatenate to the final text (no split UTF-8), and a stop string cuts the output."""
    eng = Engine(model, tok, max_batch=4, block_size=4)
    p = SamplingParams(max_tokens=40, temperature=1.0, seed=1, ignore_eos=True)
    pieces = []
    full = eng.generate([PROMPTS[1]], p, progress=lambda d: pieces.append(d.text))[0].outputs[0]
    assert "".join(pieces) == full.text == tok.decode(full.token_ids)
    assert all("\ufffd" not in x or x == pieces[-1] for x in pieces[:-1]) or "\ufffd" in full.text
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=1.0, seed=1, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert cut.text == full.text[: full.text.find(stop)]
    assert eng.pool.used_blocks == 0


def test_stop_token_and_bad_params(model, tok):
    eng = Engine(model, tok, max_batch=2, block_size=4)
    free = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[0]
    stopped = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0,
                                                        stop_token_ids=[free.token_ids[2]]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:2]
    for bad in [dict(temperature=-1), dict(max_tokens=0), dict(top_p=0), dict(n=0), dict(logprobs=-2)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="context"):
        eng.generate(["hi"], SamplingParams(max_tokens=model.cfg.max_position_embeddings))


def test_compiled_engine_equals_eager(model, tok):
    """The compiled decoding step (rows padded 3 -> 4, context gathered to a fixed 64 slots, weights frozen in)
    gives the eager engine's greedy tokens and logprobs, and leaves no blocks behind."""
    prompts = PROMPTS[:3]  # ragged prompt lengths
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    eager = Engine(model, tok, max_batch=4, block_size=4).generate(prompts, params)
    eng = Engine(model, tok, max_batch=4, block_size=4, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = eng.generate(prompts, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    for a, b in zip(eager, compiled):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
    assert eng.pool.used_blocks == 0
