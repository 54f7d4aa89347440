"""The paged cache against slow references: absorbed and expanded attention over it vs a full forward without a
cache, the cache-bytes formula, reference counts and LRU eviction of the prefix cache, advancing."""

import pytest
import torch

from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.infer import BlockPool, Engine, PagedBatch
from qiusuo.infer.sampling import SamplingParams
from qiusuo.model.count import cache_bytes_per_token

PROMPTS = ["The quick brown fox", "Continuous batching lets requests join and leave"]


@pytest.mark.parametrize("together", [False, True])
def test_absorbed_decode_equals_expanded_over_paged_cache(model, tok, together):
    """Decode logits of two ragged rows through the paged cache: absorbed == expanded (fp32, <= 1e-4), and both
    equal a full forward pass without a cache; also with rows padded to fixed shapes (the compiled step's input)
    and with both prompts prefilled in one right-padded batch."""
    pool = BlockPool(model.cache_specs(), num_blocks=16, block_size=4)
    seqs = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])]
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
        last = torch.tensor([[s[-1]] for s in seqs])
        storage = [t for layer in pool.layers for t in layer.tensors]
        saved, cached = [x.clone() for x in storage], [t.num_cached for t in tables]

        def rewind():  # each decoding step below writes and advances the tables: start each from the prompts
            for x, y in zip(storage, saved):
                x.copy_(y)
            for t, n in zip(tables, cached):
                t.num_cached = n

        absorbed = model(last, cache=PagedBatch(pool, tables, 1), absorb=True)[:, -1]
        rewind()
        expanded = model(last, cache=PagedBatch(pool, tables, 1), absorb=False)[:, -1]
        rewind()
        padded = torch.cat([last, torch.zeros(2, 1, dtype=torch.long)])  # 4 rows, context gathered to 24
        fixed = model.decode_step(padded, PagedBatch(pool, tables, 1, rows=4, length=24))[:2]
        full = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    assert (absorbed - expanded).abs().max() <= 1e-4
    assert (absorbed - full).abs().max() <= 1e-4
    assert (fixed - full).abs().max() <= 1e-4
    owned = {b for t in tables for b in t.blocks}
    others = [b for b in range(pool.num_blocks) if b not in owned]
    latents = torch.stack([layer.latent.values for layer in pool.layers])
    untouched = latents[:, : pool.scratch].view(len(pool.layers), pool.num_blocks, 4, -1)[:, others]
    assert untouched.abs().sum() == 0  # padding rows and positions wrote only to the scratch slot


def test_cache_bytes_per_token_matches_formula(model, tok):
    eng = Engine(model, tok, max_batch=2)
    assert eng.pool.bytes_per_token == cache_bytes_per_token(model.cfg, torch.float32)
    assert eng.pool.layers[0].latent.width == model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim


def test_pool_refcounts_and_lru_eviction(model):
    pool = BlockPool(model.cache_specs(), num_blocks=4, block_size=2)
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


def test_forward_advances_each_table_by_its_own_count(model):
    """The model advances the cache after each forward: every row's table by the tokens it added, padding
    excluded (padded prefill rows; decoding rows padded to a fixed batch)."""
    pool = BlockPool(model.cache_specs(), num_blocks=8, block_size=4)
    a, b = pool.allocate([1] * 5, 8), pool.allocate([2] * 3, 8)
    with torch.no_grad():
        model.hidden(torch.tensor([[1] * 5, [2] * 3 + [0, 0]]), cache=PagedBatch(pool, [a, b], [5, 3]), absorb=False)
        assert (a.num_cached, b.num_cached) == (5, 3)
        model.decode_step(torch.tensor([[1], [2], [0], [0]]), PagedBatch(pool, [a, b], 1, rows=4, length=16))
    assert (a.num_cached, b.num_cached) == (6, 4)


def test_fp8_cache_in_the_engine(model, tok):
    """`kv_cache_dtype="fp8"`: the pool counts FP8 bytes per token, so the same cache_memory holds more blocks, and
    the engine's greedy tokens are `generate`'s over its FP8 cache (the same cache classes; a prompt whose FP8
    greedy choices all win by 1e-3)."""
    mem = 1 << 15  # fewer blocks than max_batch x max_model_len want: the budget decides
    fp32, fp8 = (Engine(model, tok, max_batch=2, block_size=4, cache_memory=mem, kv_cache_dtype=d)
                 for d in ("auto", "fp8"))
    assert fp8.pool.bytes_per_token == cache_bytes_per_token(model.cfg, "fp8") < fp32.pool.bytes_per_token / 2
    assert fp8.pool.num_blocks == mem // (4 * fp8.pool.bytes_per_token) > 2 * fp32.pool.num_blocks
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        ids = torch.randint(0, tok.vocab_size, (1, 9), generator=g)
        out = model.generate(ids, 12, kv_cache_dtype="fp8")
        with torch.no_grad():  # the FP8 cache's logits at each greedy choice, through a cache of its own
            top = model(out[:, :-1], cache=ContiguousCache(model.cache_specs(), 1, 21, dtype="fp8"))[0, 8:].topk(2)
        if (top.values[:, 0] - top.values[:, 1]).min() > 1e-3:
            break
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert fp8.generate([ids[0].tolist()], params)[0].outputs[0].token_ids == out[0, 9:].tolist()
