"""Admission: blocks reserved up front in arrival order, prefix-sharing waits, the memory budget."""

import pytest

from qiusuo.infer import BlockPool, Engine, SamplingParams
from qiusuo.infer.scheduler import Scheduler, pool_blocks
from qiusuo.infer.sequence import Request


def test_blocks_reserved_up_front_in_arrival_order(model, tok):
    """A sequence is admitted only with blocks for its prompt plus max_tokens; one that does not fit waits, and so
    does everyone behind it (no overtaking), until a running sequence finishes; nothing running is preempted."""
    pool = BlockPool(model.cache_specs(), num_blocks=4, block_size=4)
    sched = Scheduler(pool, max_batch=8)
    big, small = SamplingParams(max_tokens=6), SamplingParams(max_tokens=1)
    a, b, c = (Request(f"r{i}", [i + 1] * (5 if p is big else 1), p, set(), lambda d: None, tok)
               for i, p in enumerate([big, big, small]))  # a, b: 11 tokens = 3 blocks each; c: 1 block
    for r in (a, b, c):
        sched.add(r)
    assert list(sched.admit()) == [a.seqs]
    assert sched.waiting == b.seqs + c.seqs and len(a.seqs[0].table.blocks) == 3  # c would fit, but b is first
    assert list(sched.admit()) == [] and sched.running == a.seqs
    sched.finish(a.seqs[0], "length")
    sched.collect()
    assert list(sched.admit()) == [b.seqs + c.seqs] and sched.waiting == [] and pool.used_blocks == 4


def test_n_samples_compute_their_prompt_prefix_once(model, tok):
    """The samples of one request share their first block, so each waits until the one before is prefilled and
    then finds every full block of the prompt (but the last token) in the prefix cache."""
    eng = Engine(model, tok, max_batch=4, block_size=4)
    prompt = "The lazy dog. The quick brown fox jumps over"
    P = len(tok.encode(prompt))
    out = eng.generate([prompt], SamplingParams(max_tokens=3, temperature=0, n=3, ignore_eos=True))[0]
    assert out.usage.cached_tokens == 2 * 4 * ((P - 1) // 4)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1 and eng.pool.used_blocks == 0


def test_pool_budget():
    assert pool_blocks(100, block_size=4, max_batch=2, max_model_len=10, cache_memory=None) == 5  # every row full
    assert pool_blocks(100, block_size=4, max_batch=2, max_model_len=10, cache_memory=1000) == 2
    assert pool_blocks(10**8, block_size=4, max_batch=2, max_model_len=10, cache_memory=None) == 2  # 1 GiB cap
    assert pool_blocks(0, block_size=4, max_batch=2, max_model_len=10, cache_memory=None) == 5  # window layers only
    with pytest.raises(ValueError, match="cache_memory"):
        pool_blocks(100, block_size=4, max_batch=2, max_model_len=10, cache_memory=100)
