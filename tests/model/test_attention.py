"""MLA: causality, absorbed decoding against the expanded full-sequence forward, cache size."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.model.block import layer_cache_specs
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.count import cache_bytes_per_token
from qiusuo.model.transformer import Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = get_config("tiny", **kw)
    model = Transformer(cfg).eval()
    # non-zero routing bias so "bias for selection only" is exercised everywhere
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def test_causality():
    model = make()
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)  # the change is visible after it


@pytest.mark.parametrize("kw", [
    dict(),
    dict(q_lora_rank=None),
    dict(rope_scaling=YARN),
    dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.0}, q_lora_rank=None),  # cos/sin attention factor != 1
    dict(rope_interleave=False, model_type="deepseek_v2", topk_method="group_limited_greedy"),
])
def test_absorbed_decoding_matches_expanded(kw):
    model = make(**kw)
    T = 40
    x = torch.randint(0, model.cfg.vocab_size, (3, T))
    with torch.no_grad():
        full = model(x)  # expanded, causal, no cache
        cache = ContiguousCache(model.cache_specs(), 3, T)
        steps = torch.cat([model(x[:, t:t + 1], cache=cache, absorb=True) for t in range(T)], dim=1)
    assert (steps - full).abs().max() <= 1e-4


def test_prefill_then_absorbed_decode_matches_expanded():
    model = make(rope_scaling=YARN)
    x = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = ContiguousCache(model.cache_specs(), 2, 30)
        pre = model(x[:, :20], cache=cache)  # expanded prefill into the cache
        rest = torch.cat([model(x[:, t:t + 1], cache=cache) for t in range(20, 30)], dim=1)  # absorbed by default
        # an expanded step over the cache gives the same too
    assert (pre - full[:, :20]).abs().max() <= 1e-4
    assert (rest - full[:, 20:]).abs().max() <= 1e-4


def test_absorbed_multi_token_chunk_matches_expanded():
    """Absorption is exact for any number of new tokens (chunked prefill), not only T == 1."""
    model = make()
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = ContiguousCache(model.cache_specs(), 2, 24)
        a = model(x[:, :10], cache=cache, absorb=True)
        b = model(x[:, 10:], cache=cache, absorb=True)
    assert (torch.cat([a, b], 1) - full).abs().max() <= 1e-4


def test_cache_holds_exactly_the_latent():
    cfg = get_config("tiny")
    cache = ContiguousCache(layer_cache_specs(cfg), batch_size=1, max_len=8)
    assert cache.pool.layers[0].latent.width == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.num_bytes_per_token == cache_bytes_per_token(cfg, torch.float32)
    bf16 = ContiguousCache(layer_cache_specs(cfg), 1, 8, dtype=torch.bfloat16)
    assert bf16.num_bytes_per_token == cache_bytes_per_token(cfg, "bf16")


def test_generate_greedy_equals_full_recompute():
    model = make()
    x = torch.randint(0, model.cfg.vocab_size, (2, 6))
    out = model.generate(x, max_new_tokens=10)
    ref = x
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_bad_inputs_raise():
    model = make()
    V = model.cfg.vocab_size
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, model.cfg.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(4, dtype=torch.long))


@pytest.mark.slow
def test_compiled_decoding_equals_eager():
    model = make()
    x = torch.randint(0, model.cfg.vocab_size, (2, 5))
    assert torch.equal(model.generate(x, 6, compile=True), model.generate(x, 6))


def test_cache_overflow_is_a_clear_error():
    model = make()
    cache = ContiguousCache(model.cache_specs(), 1, 4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
