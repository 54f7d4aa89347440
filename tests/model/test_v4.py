"""DeepSeek-V4 against transformers' `DeepseekV4ForCausalLM` (the reference), and its own paths against each other.

Parity cases cover every layer kind, hc_mult 1/2/4, 0-3 hash layers, each scoring function, an active SwiGLU
clamp, o_groups > 1, YaRN on the compressed layers, and 45-token sequences: 11 CSA entries (m = 4) against
index_topk = 3, 5 HCA entries (m' = 8), a window of 8. The indexer has 16 heads so its ReLU'd scores do not tie
(with 1-2 heads many are exactly 0 and two correct implementations may pick different entries).
"""

from __future__ import annotations

import pytest
import torch

from qiusuo.config import CSA, HCA, SLIDING, ModelConfig, get_config
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.compressor import topk_lowest_index
from qiusuo.model.count import cache_bytes_by_kind, cache_bytes_per_token, count_params
from qiusuo.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
import twins  # noqa: E402 (tests/model/twins.py)

TOL = 1e-4
CASES = {
    "hc1-nohash-softmax": dict(hc_mult=1, num_hash_layers=0, scoring_func="softmax", swiglu_limit=0.5, o_groups=1,
                               layer_types=[CSA, HCA, SLIDING]),
    "hc2-hash1-sigmoid": dict(hc_mult=2, num_hash_layers=1, scoring_func="sigmoid", swiglu_limit=10.0, o_groups=2,
                              layer_types=[SLIDING, CSA, HCA, CSA]),
    "hc4-hash3-sqrtsoftplus-yarn": dict(
        hc_mult=4, num_hash_layers=3, scoring_func="sqrtsoftplus", swiglu_limit=0.3, o_groups=4,
        layer_types=[HCA, CSA, SLIDING, CSA],
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fast": 32,
                      "beta_slow": 1}),
}


def hf_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
                qk_rope_head_dim=8, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1,
                o_lora_rank=16, index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=8,
                hc_sinkhorn_iters=5, compress_rates={CSA: 4, HCA: 8}, max_position_embeddings=512,
                num_nextn_predict_layers=0, routed_scaling_factor=1.5)
    base.update(kw)
    base["num_hidden_layers"] = len(base["layer_types"])
    return transformers.DeepseekV4Config(**base)


def randomise(model: Transformer, seed: int = 0) -> None:
    twins.randomise(model, 0.5, seed)


@pytest.fixture(autouse=True)
def softmax_scores(monkeypatch):
    """transformers 5.24's V4 router looks its scoring function up in ACT2FN, which has no softmax; DeepSeek's V4
    code has one (and leaves softmax weights unnormalised: `norm_topk_prob=False` here). Registered for the test."""
    import transformers.activations as act

    monkeypatch.setitem(act.ACT2FN, "softmax", (torch.nn.Softmax, {"dim": -1}))


def pair(case: str):
    return twins.twin_pair(hf_config(**CASES[case]), transformers.DeepseekV4ForCausalLM, 0.5)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_both_ways(case):
    ours, theirs = pair(case)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids).logits
        assert (ours(ids) - ref).abs().max() < TOL
        # and theirs -> ours: their (randomised) weights loaded into a fresh model of ours
        back = Transformer(ours.cfg).eval()
        back.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()
                              if "inv_freq" not in k})
        assert (back(ids) - ref).abs().max() < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_equals_full_forward(case):
    """Prefill 13, a chunk of 7, then one token at a time: the contiguous V4 cache (window ring, compressor tails
    and pools) reproduces the full forward; and transformers' own cached decoding agrees."""
    ours, theirs = pair(case)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        cache = ContiguousCache(ours.cache_specs(), 2, 64)
        parts = [ours(ids[:, :13], cache=cache), ours(ids[:, 13:20], cache=cache)]
        parts += [ours(ids[:, t: t + 1], cache=cache) for t in range(20, 45)]
        assert (torch.cat(parts, 1) - full).abs().max() < TOL
        out = theirs(ids[:, :13], use_cache=True)
        steps = [out.logits]
        for t in range(13, 45):
            out = theirs(ids[:, t: t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        assert (torch.cat(steps, 1) - full).abs().max() < TOL


def test_indexer_selection_and_features_matter():
    """The cases above would pass on a model that ignored a feature; each one moves the logits here."""
    ours, _ = pair("hc2-hash1-sigmoid")
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = ours(ids)
        for change in ("index_topk", "sinks", "position_bias", "hash"):
            model = Transformer(ours.cfg.replace(index_topk=100) if change == "index_topk" else ours.cfg).eval()
            model.load_state_dict(ours.state_dict())
            if change == "sinks":
                model.layers[1].self_attn.sinks.zero_()
            elif change == "position_bias":
                model.layers[2].self_attn.compressor.position_bias.zero_()
            elif change == "hash":
                model.layers[0].mlp.gate.tid2eid.copy_(model.layers[0].mlp.gate.tid2eid.roll(1, 0))
            assert (model(ids) - base).abs().max() > 1e-2, change


def test_causal_no_future_entry():
    """Changing token t changes nothing before t: no window key and no compressed entry reaches past a query."""
    ours, _ = pair("hc4-hash3-sqrtsoftplus-yarn")
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = ours(ids)
        for t in (3, 4, 7, 8, 31):  # window edges of m = 4 and m' = 8
            other = ids.clone()
            other[0, t] = (other[0, t] + 1) % 256
            diff = (ours(other) - base).abs().amax(-1)[0]
            # (not exactly 0 before t: the experts see different token counts, so matmul rounding moves ~1e-6)
            assert diff[:t].max() < 1e-5 and diff[t] > 1e-2, (t, diff[:t].max(), diff[t])


def test_topk_ties_break_to_the_lower_index():
    s = torch.tensor([[0.0, 1.0, -0.0, 1.0, 0.0, float("-inf")]])
    assert topk_lowest_index(s, 3).sort().values.tolist() == [[0, 1, 3]]
    assert topk_lowest_index(s, 4).sort().values.tolist() == [[0, 1, 2, 3]]
    x = torch.randn(4, 50)
    assert torch.equal(topk_lowest_index(x, 7).sort().values, x.topk(7).indices.sort().values)


def test_ties_are_broken_identically_on_every_path():
    """With 1 indexer head most scores are exactly 0 (ReLU): full forward, chunked prefill and decoding still
    agree because every path breaks the ties the same way."""
    cfg = ModelConfig.from_hf(hf_config(index_n_heads=1, **CASES["hc2-hash1-sigmoid"]).to_dict())
    model = Transformer(cfg).eval()
    randomise(model, seed=5)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
    assert (twins.stepwise(model, ids, 9, 64) - full).abs().max() < TOL


def test_training_reaches_every_parameter_and_the_indexer_has_its_own_loss():
    cfg = get_config("v4-tiny")
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    out = model(ids, labels=ids.roll(-1, 1))
    assert out.indexer > 0 and out.mtp > 0
    out.loss.backward()
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue  # experts no token picked get no gradient
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the indexer is trained by its own loss alone: the language-model loss leaves it without a gradient
    model.zero_grad()
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_bad_v4_configs_name_the_field():
    good = hf_config(**CASES["hc1-nohash-softmax"]).to_dict()
    cases = {
        "layer_types": dict(layer_types=[CSA, HCA]),
        "mlp_layer_types": dict(mlp_layer_types=["moe", "bogus", "moe"]),
        "index_topk": dict(index_topk=0),
        "compress_rates": dict(compress_rates={CSA: 0, HCA: 8}),
        "o_groups": dict(o_groups=3),
        "scoring_func": dict(scoring_func="relu"),
    }
    for field, change in cases.items():
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_hf({**good, **change})
    with pytest.raises(ValueError, match="compress_ratios"):
        ModelConfig.from_hf({**{k: v for k, v in good.items() if k != "layer_types"}, "compress_ratios": [0, 4]})
    with pytest.raises(ValueError, match="compress_ratios"):
        ModelConfig.from_hf({**{k: v for k, v in good.items() if k != "layer_types"}, "compress_ratios": [0, 4, 16]})


def test_published_config_spellings():
    """V4-Flash's hub config (compress_ratios with the MTP entry, num_hash_layers, rope_scaling + compress_rope_theta,
    top-level expert_dtype) and transformers' own to_dict() give the same model config."""
    hub = {"model_type": "deepseek_v4", "num_hidden_layers": 5, "num_nextn_predict_layers": 1, "head_dim": 64,
           "qk_rope_head_dim": 16, "hidden_size": 64, "num_attention_heads": 4, "q_lora_rank": 32,
           "compress_ratios": [0, 0, 4, 128, 4, 0], "num_hash_layers": 3, "compress_rope_theta": 160000,
           "rope_theta": 10000, "expert_dtype": "fp4", "compress_rate_csa": 4, "compress_rate_hca": 128,
           "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                            "beta_fast": 32, "beta_slow": 1}, "index_head_dim": 32, "o_groups": 2}
    ours = ModelConfig.from_hf(hub)
    assert ours.layer_types == [SLIDING, SLIDING, CSA, HCA, CSA]
    assert ours.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * 2
    assert ours.compress_rope_theta == 160000 and ours.yarn["factor"] == 16
    via_transformers = ModelConfig.from_hf(transformers.DeepseekV4Config(**hub).to_dict())
    assert via_transformers == ours
    assert ModelConfig.from_hf(ours.to_hf()) == ours


def test_published_v4_counts_match_transformers_on_meta():
    """V4-Flash: 284.33B without MTP, as transformers builds it (counted here on the meta device too); V4-Pro:
    1.57T without MTP (1.6T with it, the published figure) and 49.8B active (published: 49B)."""
    flash = get_config("deepseek-v4-flash")
    ours = count_params(flash)
    with torch.device("meta"):
        theirs = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**flash.to_hf()))
    assert ours["total"] == sum(p.numel() for p in theirs.parameters()) == 284_332_230_231
    assert round(ours["active"] / 1e9, 1) == 13.8
    pro = get_config("deepseek-v4-pro")
    assert round(count_params(pro)["total"] / 1e12, 2) == 1.57
    assert round(count_params(pro, include_mtp=True)["total"] / 1e12, 2) == 1.6
    assert round(count_params(pro)["active"] / 1e9, 1) == 49.8


def test_cache_bytes_per_layer_kind():
    """A V4 layer's cache per token at context L: its window (W slots) and the compressors' tails amortised over
    L, plus head_dim / m per compressed entry (and the indexer's index_head_dim / m for CSA)."""
    flash = get_config("deepseek-v4-flash")
    kinds = cache_bytes_by_kind(flash, "bf16", 1 << 20)
    assert kinds[CSA]["layers"] == 21 and kinds[HCA]["layers"] == 20 and kinds[SLIDING]["layers"] == 2
    L = 1 << 20
    assert kinds[SLIDING]["bytes_per_token"] == 128 * 512 * 2 / L
    assert kinds[HCA]["bytes_per_token"] == (128 * 512 + 2 * 128 * 512 + (L // 128) * 512) * 2 / L
    csa_fixed = 128 * 512 + 2 * 8 * 1024 + 2 * 8 * 256
    assert kinds[CSA]["bytes_per_token"] == (csa_fixed + (L // 4) * (512 + 128)) * 2 / L
    total = cache_bytes_per_token(flash, "bf16", L)
    assert total == sum(k["layers"] * k["bytes_per_token"] for k in kinds.values())
    assert total / cache_bytes_per_token(get_config("deepseek-v3"), "bf16") < 0.1  # under a tenth of V3's at 1M
    with pytest.raises(ValueError, match="context"):
        cache_bytes_per_token(flash, "bf16")


@pytest.mark.slow
def test_compiled_generate_equals_eager():
    """`generate` runs on the engine's cache kinds, so V4's compiles too: the same greedy tokens as eager, past
    the window (16) and several compressed windows. Two layers (CSA, HCA: the window kind with both pool kinds)
    keep the compilation short."""
    torch.manual_seed(0)
    model = Transformer(get_config("v4-tiny", num_nextn_predict_layers=0, num_hidden_layers=2, layer_types=[CSA, HCA],
                                   mlp_layer_types=["hash_moe", "moe"])).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert torch.equal(model.generate(x, 10, compile=True), model.generate(x, 10))


@pytest.mark.parametrize("case", list(CASES))
def test_banded_fast_path_equals_dense_reference(case):
    """The fast path (each query against its window in chunks, CSA entries gathered per query) against the slow
    reference (every key under one position-built mask): logits, cached steps and the indexer loss agree."""
    ours, _ = pair(case)
    ref = Transformer(ours.cfg).eval()
    ref.load_state_dict(ours.state_dict())
    for m in ref.modules():
        if hasattr(m, "dense_reference"):
            m.dense_reference = True
    ids = torch.randint(0, 256, (2, 51), generator=torch.Generator().manual_seed(6))  # 51: not a multiple of W
    with torch.no_grad():
        assert (ours(ids) - ref(ids)).abs().max() < TOL
        caches = [ContiguousCache(m.cache_specs(), 2, 64) for m in (ours, ref)]
        for sl in (slice(0, 19), slice(19, 20), slice(20, 30)):
            a, b = (m(ids[:, sl], cache=c) for m, c in zip((ours, ref), caches))
            assert (a - b).abs().max() < TOL
    fast, slow = (m(ids, labels=ids.roll(-1, 1)) for m in (ours, ref))
    assert fast.indexer > 0 and abs(fast.indexer - slow.indexer) < 1e-5


@pytest.mark.parametrize("case", ["hc2-hash1-sigmoid", "hc4-hash3-sqrtsoftplus-yarn"])
def test_norm_topk_prob_false_still_normalises_like_deepseek(case):
    """Issue 26: DeepSeek-V4's own Gate (inference/model.py) normalises sigmoid and sqrtsoftplus weights whatever a
    config says (its ModelArgs has no norm_topk_prob), as transformers' V4 router does; qiusuo left them
    unnormalised when `norm_topk_prob` was false (logits up to 0.3 off)."""
    ours, theirs = twins.twin_pair(hf_config(**CASES[case], norm_topk_prob=False), transformers.DeepseekV4ForCausalLM,
                                   0.5)
    assert not ours.cfg.norm_topk_prob
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < TOL
