"""DeepSeek-V3.2 (sparse MLA under the lightning indexer) against transformers' `DeepseekV32ForCausalLM`, against
dense MLA when the top-k covers everything, and its cached paths against its full forward."""

import pytest
import torch

from qiusuo.config import ModelConfig, get_config
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
import twins  # noqa: E402 (tests/model/twins.py)
TOL = 1e-4


def hf_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.5, index_n_heads=16,
                index_head_dim=16, index_topk=8, max_position_embeddings=256)
    base.update(kw)
    return transformers.DeepseekV32Config(**base)


def pair(**kw):
    return twins.twin_pair(hf_config(**kw), transformers.DeepseekV32ForCausalLM, 0.3)


def test_config_and_published_count():
    cfg = get_config("deepseek-v3.2")
    from qiusuo.model.count import count_params

    assert round(count_params(cfg)["total"] / 1e9, 2) == 671.88  # transformers builds 671.88B
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg.replace(num_key_value_heads=cfg.num_attention_heads)
    via = ModelConfig.from_hf(transformers.DeepseekV32Config(**cfg.to_hf()).to_dict())
    assert via.first_k_dense_replace == 3 and via.index_topk == 2048 and via.is_v32
    with pytest.raises(ValueError, match="index_topk"):
        get_config("deepseek-v3.2", index_topk=0)


def test_logits_match_transformers_both_ways():
    """40 tokens, top-8: every query past the 8th drops tokens; 16 indexer heads, so the selections do not tie."""
    ours, theirs = pair()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids).logits
        assert (ours(ids) - ref).abs().max() < TOL
        back = Transformer(ours.cfg).eval()
        back.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items() if "inv_freq" not in k})
        assert (back(ids) - ref).abs().max() < TOL
        wider = Transformer(ours.cfg.replace(index_topk=64)).eval()  # the selection matters: dense differs
        wider.load_state_dict(ours.state_dict())
        assert (wider(ids) - ref).abs().max() > 1e-2


def test_dense_when_the_top_k_covers_everything():
    ours, _ = pair(index_topk=64)
    dense = Transformer(ours.cfg.replace(model_type="deepseek_v3")).eval()
    dense.load_state_dict({k: v for k, v in ours.state_dict().items() if ".indexer." not in k})
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - dense(ids)).abs().max() < 1e-5


def test_cached_decoding_and_absorbed_path_equal_the_full_forward():
    ours, _ = pair()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
    assert (twins.stepwise(ours, ids, 11, 48) - full).abs().max() < TOL
    assert ours.cache_specs()[0].width == 16 + 8 + 16  # the latent, then the indexer key


def test_served_exported_and_loaded(tmp_path):
    """The paged engine serves V3.2 (its cache is MLA's latent kind, widened by the indexer key) with the same greedy
    tokens as the model's own decoding; bf16 and FP8 (ue8m0) exports load back and in transformers' V3.2."""
    from qiusuo.data.tokenizer import Tokenizer
    from qiusuo.hf import load_model, save_hf
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams
    from greedy import unambiguous  # tests/greedy.py
    from safetensors import safe_open

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 4] * 8, vocab_size=300)
    ours, _ = pair(vocab_size=300)
    ps, refs = unambiguous(ours, tok, (5, 30, 17), 12)
    outs = Engine(ours, tok, max_batch=3).generate(ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    save_hf(ours, tmp_path / "bf16", progress=False)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "bf16", progress=False)(ids), ours(ids))
        theirs = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "bf16").eval()
        assert (theirs(ids).logits - ours(ids)).abs().max() < TOL
    save_hf(ours, tmp_path / "fp8", fp8=True, scale_fmt="ue8m0", progress=False)
    with safe_open(str(next((tmp_path / "fp8").glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.indexer.wq_b.weight_scale_inv" in names
    assert "model.layers.0.self_attn.indexer.weights_proj.weight_scale_inv" not in names
    back = load_model(tmp_path / "fp8", progress=False).state_dict()
    for name, t in ours.state_dict().items():
        if name.endswith(("indexer.wq_b.weight", "indexer.wk.weight")):  # FP8: within e4m3's bound of its block max
            assert not torch.equal(back[name], t) and (back[name] - t).abs().max() <= 2**-4 * t.abs().max() * 1.01
        elif name.endswith("indexer.weights_proj.weight"):
            assert torch.equal(back[name], t)


def test_openai_client_against_a_v32_server():
    """Greedy, streaming equal to plain, n=2 with seeds: the official client against `qiusuo serve` on V3.2."""
    import openai

    from qiusuo.data.tokenizer import Tokenizer
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.server import create_app, serve_in_thread

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 4] * 8, vocab_size=300)
    ours, _ = pair(vocab_size=300)
    engine = Engine(ours, tok, max_batch=4, max_model_len=96)
    srv, url = serve_in_thread(create_app(engine, "qiusuo-v32", api_key=None, max_concurrency=8, max_queue=8))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model="qiusuo-v32", prompt="the quick brown fox", max_tokens=16, extra_body={"ignore_eos": True})
        plain = client.completions.create(temperature=0, **kw).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(temperature=0, stream=True, **kw)
                           if c.choices)
        assert plain and streamed == plain
        a, b = (client.completions.create(temperature=1.0, n=2, seed=5, **kw) for _ in range(2))
        assert len(a.choices) == 2 and [c.text for c in a.choices] == [c.text for c in b.choices]
    finally:
        srv.should_exit = True
        engine.shutdown()


def test_a_decoding_step_reads_only_the_top_k_latents():
    ours, _ = pair()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5))
    seen = []
    attn = ours.layers[1].self_attn
    real = attn.select
    attn.select = lambda *a: (lambda r: seen.append(r[0].shape) or r)(real(*a))
    with torch.no_grad():
        cache = ContiguousCache(ours.cache_specs(), 2, 40)
        ours(ids, cache=cache)
        ours(ids[:, :1], cache=cache)
    assert seen[-1] == (2, 8, 16 + 8)  # top-8 of 31 cached latents


def test_indexer_objective_dense_warmup_then_sparse():
    """Both stages train the indexer alone from its own KL loss: dense attention in the warm-up (the model's output
    ignores the indexer), top-k after; the language-model loss never reaches the indexer."""
    ours, _ = pair()
    ours.train()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    dense = Transformer(ours.cfg.replace(model_type="deepseek_v3")).train()
    dense.load_state_dict({k: v for k, v in ours.state_dict().items() if ".indexer." not in k})
    for warm in (True, False):
        for m in ours.modules():
            if hasattr(m, "dense_warmup"):
                m.dense_warmup = warm
        ours.zero_grad()
        out = ours(ids, labels=ids.roll(-1, 1), mtp_weight=0.0)
        assert out.indexer > 0
        if warm:  # dense attention: the same CE as the V3 model with these weights
            assert abs(out.ce - dense(ids, labels=ids.roll(-1, 1), mtp_weight=0.0).ce) < 1e-5
        out.loss.backward()
        g = ours.layers[1].self_attn.indexer.wq_b.weight.grad
        assert g is not None and g.abs().sum() > 0
    ours.zero_grad()
    torch.nn.functional.cross_entropy(ours(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in ours.named_parameters() if ".indexer." in n)


def test_prefill_mask_picks_what_the_decoding_indices_pick():
    """`topk_mask_lowest_index` (prefill's mask) and `topk_lowest_index` (decoding's indices) choose the same
    entries on scores full of ties: exact zeros (-0.0 too), repeated values, -inf past the visible tokens."""
    from qiusuo.model.compressor import topk_lowest_index
    from qiusuo.model.dsa import topk_mask_lowest_index

    g = torch.Generator().manual_seed(7)
    scores = torch.randint(-3, 4, (3, 50, 64), generator=g).float()
    scores[scores == -3] = -0.0
    scores = scores.masked_fill(torch.ones(50, 64, dtype=torch.bool).tril(14).logical_not(), float("-inf"))
    for k in (1, 8, 40, 64):
        want = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, topk_lowest_index(scores, k), True)
        assert torch.equal(topk_mask_lowest_index(scores, k), want)
