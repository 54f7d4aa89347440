"""Adapter layers against hand computations: base + scale * B A x for every target kind (linear projections, MLA's
kv_b_proj in both attention paths, routed experts per expert, float and packed), per-row adapters in one batch
against each alone, merging, and the experts' split matmuls against their fused twin."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.lora.apply import add_lora, freeze_base, merge_lora, target_modules
from qiusuo.lora.layers import GATHER_ROWS, LoraExperts, LoraLatent, LoraLinear, adapter_rows, lora_layers
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.moe import Experts, swiglu
from qiusuo.model.transformer import Transformer
from qiusuo.quant.apply import parse_spec, quantize_model, set_activations
from qiusuo.quant.formats import parse
from qiusuo.quant.modules import QuantExperts, QuantLinear


def model_of(preset="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(get_config(preset, num_nextn_predict_layers=0, **kw)).eval()
    m.reset_parameters(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.add_(0.05 * torch.randn_like(p))
    return m


def randomise(model, seed=1, std=0.2):
    """Nonzero B (fresh adapters start at B = 0, where every check passes trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            for _, A, B, _ in m.pairs():
                A.copy_(torch.randn(A.shape, generator=g) * std)
                B.copy_(torch.randn(B.shape, generator=g) * std)


def test_targets_are_the_tensor_families():
    m = model_of()
    t = target_modules(m)
    assert t["layers.0.self_attn.kv_b_proj"] == "attention"  # quantisation leaves it out; adapters fold into it
    assert t["layers.0.mlp.gate_proj"] == "dense"
    assert t["layers.1.mlp.experts"] == "experts"
    assert t["layers.1.mlp.shared_experts.down_proj"] == "shared"
    assert {f for f in t.values()} == {"attention", "dense", "experts", "shared"}
    assert not any(p.startswith("mtp.") or p == "lm_head" for p in t)
    v4 = target_modules(model_of("v4-tiny"))
    assert "layers.0.self_attn.kv_proj" in v4 and not any(p.endswith("o_a_proj") for p in v4)  # grouped output: no
    with pytest.raises(ValueError, match="unknown 'head'"):
        add_lora(m, 4, 8, "attention,head")


@pytest.mark.parametrize("preset", ["tiny", "v4-tiny"])  # MLA's projections; V4 attention's (and its compressor's)
def test_linear_kinds_equal_base_plus_BAx(preset):
    m = model_of(preset)
    add_lora(m, rank=4, alpha=8, targets="attention,dense,shared")
    randomise(m)
    n = 0
    for layer in lora_layers(m):
        assert isinstance(layer, LoraLinear)
        xin = torch.randn(3, 5, layer.in_features)
        A, B, s = layer.lora_A[0], layer.lora_B[0], float(layer.lora_scale[0])
        assert s == 2.0
        want = layer.base_layer(xin) + s * (xin @ A.T) @ B.T
        torch.testing.assert_close(layer(xin), want, rtol=1e-5, atol=1e-6)
        n += 1
    if preset == "tiny":
        assert n == 2 * 5 + 3 + 3  # q_a, q_b, kv_a, kv_b, o in 2 layers; the dense MLP; the shared experts
    x = torch.randint(0, m.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_latent_projection_absorbed_equals_merged_weight():
    """kv_b_proj's absorbed forms (queries folded, values unfolded) with an adapter equal a plain LatentProjection
    whose weight is W + s B A: the factorised term is exact."""
    m = model_of()
    add_lora(m, rank=4, alpha=4, targets="attention")
    randomise(m)
    layer = m.layers[0].self_attn.kv_b_proj
    assert isinstance(layer, LoraLatent)
    merged = type(layer.base_layer)(16, 4, 16, 16)
    with torch.no_grad():
        merged.weight.copy_(layer.base_layer.weight + layer.lora_scale[0] * layer.lora_B[0] @ layer.lora_A[0])
    q = torch.randn(2, 3, 4, 16)
    o = torch.randn(2, 4, 3, 16)
    torch.testing.assert_close(layer.absorb_query(q), merged.absorb_query(q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.absorb_values(o), merged.absorb_values(o), rtol=1e-5, atol=1e-5)


def test_model_with_adapters_decodes_as_its_full_forward():
    """Absorbed decoding (kv_b_proj's adapter folded) token by token equals the expanded full forward."""
    m = model_of()
    add_lora(m, rank=4, alpha=8)
    randomise(m, std=0.3)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = m(x)
        cache = ContiguousCache(m.cache_specs(), 2, 12)
        first = m.logits(m.hidden(x[:, :6], cache))
        steps = [m.decode_step(x[:, t:t + 1], cache) for t in range(6, 12)]
    torch.testing.assert_close(first, full[:, :6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:], rtol=1e-4, atol=1e-4)


def experts_by_hand(bank, merged_gu, merged_d, x, weights, idx):
    """Token by token, expert by expert, with the merged weights W + s B A of each expert."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            g, u = (merged_gu[e] @ x[n]).chunk(2)
            out[n] += weights[n, k] * (merged_d[e] @ swiglu(g, u, bank.limit))
    return out


def merged_expert_weights(layer, index=0):
    base = layer.base_layer
    gu, d = base.dequantized() if isinstance(base, QuantExperts) else (base.gate_up_proj, base.down_proj)
    return (gu + layer.gate_up_scale[index] * layer.gate_up_B[index] @ layer.gate_up_A[index],
            d + layer.down_scale[index] * layer.down_B[index] @ layer.down_A[index])


@pytest.mark.parametrize("tokens", [5, 40])  # 10 sorted rows (gathered per row) and 80 (the sorted loop)
@pytest.mark.parametrize("fmt", [None, "int4", "fp8", "mxfp4", "int8"])
def test_experts_equal_base_plus_BAx_per_expert(tokens, fmt):
    torch.manual_seed(0)
    cfg = get_config("tiny", hidden_size=128, moe_intermediate_size=128)
    bank = Experts(cfg)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.05), bank.down_proj.normal_(0, 0.05)
    if fmt:
        bank = set_activations(QuantExperts.from_experts(bank, parse(fmt)), "fp32")  # the stored weights, exactly
    layer = LoraExperts(bank, 1, 8, 4)
    with torch.no_grad():
        for _, A, B, s in layer.pairs():
            A.normal_(0, 0.2), B.normal_(0, 0.2), s.fill_(1.5)
    x = torch.randn(tokens, 128)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2)
    assert (tokens * 2 <= GATHER_ROWS) == (tokens == 5)
    with torch.no_grad():
        got = layer(x, weights, idx)
        want = experts_by_hand(bank, *merged_expert_weights(layer), x, weights, idx)
    tol = dict(rtol=1e-4, atol=1e-4) if fmt is None else dict(rtol=2e-3, atol=2e-3)  # packed kernels: rounding
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_split_expert_matmuls_equal_the_fused_path(fmt):
    """`gate_up` then `down` (what an adapter composes) against `grouped`: bitwise for float experts, and the packed
    bank's decode path stays its two kernel calls."""
    torch.manual_seed(0)
    cfg = get_config("tiny")
    bank = Experts(cfg)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.1), bank.down_proj.normal_(0, 0.1)
    if fmt:
        bank = QuantExperts.from_experts(bank, parse(fmt))
    for rows in (6, 300):
        counts = torch.bincount(torch.randint(0, cfg.n_routed_experts, (rows,)), minlength=cfg.n_routed_experts)
        xs = torch.randn(rows, cfg.hidden_size)
        g, u = bank.gate_up(xs, counts).chunk(2, dim=-1)
        split = bank.down(swiglu(g, u, bank.limit), counts).to(xs.dtype)
        assert torch.equal(split, bank.grouped(xs, counts)), rows


def test_packed_decode_step_is_two_kernel_calls_without_adapters(monkeypatch):
    from qiusuo.quant import kernels

    torch.manual_seed(0)
    bank = QuantExperts.from_experts(Experts(get_config("tiny")), parse("int4"))
    calls = []
    real = kernels.Bound.__call__  # an eager decoding call goes through the bank's binding
    monkeypatch.setattr(kernels.Bound, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    idx = torch.tensor([[0, 3], [5, 3]])
    bank(torch.randn(2, 64), torch.rand(2, 2), idx)
    assert len(calls) == 2


@pytest.mark.parametrize("tokens", [3, 50])  # per-row gather, and each adapter over its own sorted rows
def test_rows_of_one_batch_equal_each_adapter_alone(tokens):
    """A bank of two adapters: rows running adapter 0, adapter 1 and none in one forward equal each run alone."""
    m = model_of()
    add_lora(m, rank=4, alpha=8)
    layers = lora_layers(m)
    for layer in layers:  # a second adapter: grow every bank to n = 2 with different values
        for _, A, B, s in layer.pairs():
            A.data = torch.cat([A.data, torch.randn_like(A.data)])
            B.data = torch.cat([B.data, torch.randn_like(B.data) * 0.2])
            s.data = torch.tensor([2.0, 0.5])
    randomise(m, std=0.2)
    x = torch.randint(0, 512, (3, tokens))
    with torch.no_grad():
        with adapter_rows(layers, torch.tensor([0, 1, -1])):
            mixed = m(x)
        alone = []
        for i, rows in enumerate((0, 1, -1)):
            with adapter_rows(layers, rows):
                alone.append(m(x[i:i + 1])[0])
    for i in range(3):
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        with adapter_rows(layers, -1):
            base = m(x)
    assert not torch.allclose(base[0], mixed[0], atol=1e-3) and not torch.allclose(base[1], mixed[1], atol=1e-3)


def test_merged_float_model_equals_adapter_forward():
    m = model_of()
    add_lora(m, rank=4, alpha=8)
    randomise(m, std=0.05)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        want = m(x)
        merged = merge_lora(m)(x)
    assert not lora_layers(m)
    assert "layers.0.self_attn.q_a_proj.weight" in m.state_dict()  # the plain names again
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["int8", "experts=int4,shared=int8,dense=int8,attention=int8"])
def test_merging_into_a_packed_base_costs_one_more_rounding(spec):
    """W + s B A quantised again into the base's format: the merged model is as far from the adapter's forward as
    the packed base is from the float one (measured: 0.059 vs 0.055, 0.13 vs 0.15 in the logits)."""
    f = model_of(hidden_size=128, moe_intermediate_size=64, intermediate_size=256)
    q = quantize_model(model_of(hidden_size=128, moe_intermediate_size=64, intermediate_size=256), parse_spec(spec))
    for m in (f, q):
        add_lora(m, rank=4, alpha=8)
        randomise(m, std=0.05)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        exact, adapter = f(x), q(x)
        merged = merge_lora(q)(x)
    assert isinstance(q.layers[1].mlp.experts, QuantExperts) and not lora_layers(q)
    assert (merged - adapter).abs().max() <= 1.5 * (adapter - exact).abs().max()


def test_freeze_base_trains_only_adapters_and_what_is_asked():
    m = model_of()
    quantize_model(m, parse_spec("experts=int4"))
    add_lora(m, rank=2, alpha=2, targets="attention,experts")
    names = freeze_base(m)
    assert names and all("lora_" in n or n.endswith(("gate_up_A", "gate_up_B", "down_A", "down_B")) for n in names)
    both = freeze_base(m, router=True, norms=True)
    assert "layers.1.mlp.gate.weight" in both and "layers.0.input_layernorm.weight" in both
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in both)
    assert isinstance(m.layers[1].mlp.experts.base_layer, QuantExperts)
    assert isinstance(m.layers[0].self_attn.q_a_proj.base_layer, torch.nn.Linear)
    assert not isinstance(m.layers[0].self_attn.q_a_proj.base_layer, QuantLinear)


@pytest.mark.parametrize("spec", ["int4", "experts=fp8,attention=fp8,shared=int8,dense=int8"])
def test_qlora_equals_the_adapter_over_the_dequantised_base(spec):
    """Forward and adapter gradients over a packed base equal those over a float model holding the dequantised
    weights: the packed layers' gradient path (bands dequantised again in the backward) is exact, at any row count
    (experts receiving few rows included)."""
    kw = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256)
    q = quantize_model(model_of(**kw), parse_spec(spec))
    f = model_of(**kw)
    with torch.no_grad():
        for path, m in q.named_modules():
            if isinstance(m, QuantLinear):
                f.get_submodule(path).weight.copy_(m.dequantized())
            elif isinstance(m, QuantExperts):
                gu, d = m.dequantized()
                f.get_submodule(path).gate_up_proj.copy_(gu), f.get_submodule(path).down_proj.copy_(d)
    grads = []
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    for m in (q, f):
        add_lora(m, rank=4, alpha=8)
        randomise(m, std=0.1)
        freeze_base(m)
        m.train()
        out = m(x, labels=torch.roll(x, -1, 1))
        out.loss.backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert isinstance(q.layers[1].mlp.experts.base_layer, QuantExperts)
    assert all(g is not None and g.abs().max() > 0 for g in grads[0])  # every adapter gets a gradient
    for gq, gf in zip(*grads):
        torch.testing.assert_close(gq, gf, rtol=1e-4, atol=1e-5)
