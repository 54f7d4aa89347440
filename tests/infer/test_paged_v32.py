"""DeepSeek-V3.2 in the paged engine (`sparse_latent` layers, `qiusuo/cache/sparse.py`): latents and indexer keys
in two tensors, a decoding step reading the S keys and only the k chosen latents. Held against the model's full
forward, the contiguous cache and `Transformer.generate`."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qiusuo.config import get_config
from qiusuo.infer.engine import Engine
from qiusuo.cache.pool import BlockPool, PagedBatch
from qiusuo.infer.sampling import SamplingParams
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.count import cache_bytes_per_token
from engine_models import perturbed, prompts  # tests/infer/engine_models.py
from greedy import unambiguous  # tests/greedy.py

TOL = 1e-4
TOPK = 8


@pytest.fixture(scope="module")
def v32(tok):
    """`tiny` with the indexer (top-8) and every weight perturbed; 16 indexer heads so selections do not tie."""
    return perturbed(get_config("tiny", model_type="deepseek_v32", vocab_size=tok.vocab_size,
                                num_nextn_predict_layers=0, index_n_heads=16, index_head_dim=16, index_topk=TOPK))


class LatentReads(TorchFunctionMode):
    """Counts the indices `index_select` takes from the given storage tensors (by identity)."""

    def __init__(self, watched: dict[str, list[torch.Tensor]]):
        super().__init__()
        self.watched, self.reads = watched, {name: [] for name in watched}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.index_select, torch.Tensor.index_select):
            for name, tensors in self.watched.items():
                if any(args[0] is t for t in tensors):
                    self.reads[name].append(args[2].numel())
        return func(*args, **kwargs)


def test_engine_greedy_equals_generate_with_prefix_sharing(v32, tok):
    """Six prompts of different lengths decoded together, then two that share a 24-token prefix with one of
    them (blocks served from the prefix cache hold both the latents and the keys): `Transformer.generate`'s
    greedy tokens every time, and nothing held afterwards."""
    engine = Engine(v32, tok, max_batch=6, block_size=4, max_model_len=96)
    assert engine.pool.bytes_per_token == cache_bytes_per_token(v32.cfg, torch.float32)  # latent + key, fp32
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ps, refs = unambiguous(v32, tok, (5, 30, 17, 1, 44, 9), 20)
    more, more_refs = unambiguous(v32, tok, (7, 13), 20, seed=1, prefix=ps[4][:24])
    for batch, want in ((ps, refs), (more, more_refs)):
        assert [o.outputs[0].token_ids for o in engine.generate(batch, params)] == want
    assert engine.pool.hit_tokens >= 2 * 24
    assert engine.pool.used_blocks == 0


def test_a_decoding_step_reads_k_latents_and_equals_the_full_forward(v32, tok):
    """Two ragged rows (31 and 18 cached tokens): a decoding step reads S keys and k = 8 latents per row and
    layer, and its logits equal the full forward's, eagerly and with rows and context padded (the compiled
    step's shapes); prefill reads every latent. Then a 3-token absorbed step (speculative verification's shape)
    also equals the full forward."""
    a, b = prompts(tok, (34, 21), seed=2)
    pool = BlockPool(v32.cache_specs(), num_blocks=32, block_size=4)
    tables = [pool.allocate(s, len(s)) for s in (a, b)]
    storages = [x for x in pool.layers]
    reads = LatentReads({"latent": [x.latent.flat for x in storages], "keys": [x.keys.flat for x in storages]})
    with torch.no_grad():
        full = [v32(torch.tensor([s]))[0] for s in (a, b)]  # (T, V) each
        pre = [s[:-3] for s in (a, b)]
        T = max(len(p) for p in pre)
        ids = torch.tensor([p + [0] * (T - len(p)) for p in pre])
        with reads:
            v32.hidden(ids, cache=PagedBatch(pool, tables, [len(p) for p in pre]), absorb=False)
        assert reads.reads["latent"] == [2 * T] * 2  # prefill: every position of the (padded) batch
        reads.reads = {"latent": [], "keys": []}
        step = torch.tensor([[a[-3]], [b[-3]]])
        saved = [(x.latent.values.clone(), x.keys.values.clone()) for x in storages]
        with reads:
            got = v32.decode_step(step, PagedBatch(pool, tables, 1))
        assert reads.reads["latent"] == [2 * TOPK] * 2  # k latents per row, per layer
        assert reads.reads["keys"] == [2 * (len(a) - 2)] * 2  # every key of the longer row's context
        for x, (lat, key) in zip(storages, saved):  # rewind, then the same step at fixed shapes
            x.latent.values.copy_(lat), x.keys.values.copy_(key)
        for t in tables:
            t.num_cached -= 1
        fixed = v32.decode_step(torch.cat([step, torch.zeros(2, 1, dtype=torch.long)]),
                                PagedBatch(pool, tables, 1, rows=4, length=64))[:2]
        for i, s in enumerate((a, b)):
            assert (got[i] - full[i][len(s) - 3]).abs().max() < TOL
            assert (fixed[i] - full[i][len(s) - 3]).abs().max() < TOL
        ver = v32(torch.tensor([a[-2:], b[-2:]]), cache=PagedBatch(pool, tables, 2), absorb=True)
        for i, s in enumerate((a, b)):
            assert (ver[i, :2] - full[i][len(s) - 2:]).abs().max() < TOL


def test_paged_equals_contiguous(v32, tok):
    """The same two equal-length prompts through the contiguous cache and the paged one, decoded 6 steps:
    the same logits every step (both read k latents; the contiguous one gathers them from its buffer)."""
    ps = prompts(tok, (23, 23), seed=3)
    steps = prompts(tok, (6, 6), seed=4)
    pool = BlockPool(v32.cache_specs(), num_blocks=32, block_size=4)
    tables = [pool.allocate(p, 30) for p in ps]
    cache = ContiguousCache(v32.cache_specs(), 2, 30)
    assert cache.num_bytes_per_token == pool.bytes_per_token
    with torch.no_grad():
        ids = torch.tensor(ps)
        assert (v32(ids, cache=cache)[:, -1] - v32(ids, cache=PagedBatch(pool, tables, 23))[:, -1]).abs().max() < TOL
        for t in range(6):
            tok_t = torch.tensor([[s[t]] for s in steps])
            contiguous = v32.decode_step(tok_t, cache)
            paged = v32.decode_step(tok_t, PagedBatch(pool, tables, 1))
            assert (contiguous - paged).abs().max() < TOL


@pytest.mark.slow
def test_compiled_decoding_equals_eager(v32, tok):
    """The compiled engine step (rows padded 3 -> 4, context gathered in multiples of 64, weights frozen in) and
    the compiled contiguous `generate` give the eager greedy tokens (contexts past the top-k)."""
    ps = prompts(tok, (5, 30, 17), seed=5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    eager = Engine(v32, tok, max_batch=4, block_size=4, max_model_len=96).generate(ps, params)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = Engine(v32, tok, max_batch=4, block_size=4, max_model_len=96, compile=True).generate(ps, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in compiled]
    ids = torch.tensor([ps[1][:20], ps[1][5:25]])
    assert torch.equal(v32.generate(ids, 12, compile=True), v32.generate(ids, 12))


def test_glm5_shared_layers_served(tok):
    """GLM-5 (`glm_moe_dsa`: interleaved indexer rotary, layer 1 reusing layer 0's top-k, so its `sparse_latent`
    cache holds no indexer key) in the paged engine: `Transformer.generate`'s greedy tokens for ragged prompts."""
    glm5 = perturbed(get_config("tiny", model_type="glm_moe_dsa", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                index_n_heads=16, index_head_dim=16, index_topk=TOPK, index_rope_interleave=True,
                                indexer_types=["full", "shared"]))
    assert [s.key_width for s in glm5.cache_specs()] == [16, 0]
    engine = Engine(glm5, tok, max_batch=4, block_size=4, max_model_len=96)
    ps, refs = unambiguous(glm5, tok, (5, 30, 17, 44), 16)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in engine.generate(ps, params)] == refs
    assert engine.pool.used_blocks == 0
