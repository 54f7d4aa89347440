"""Weight formats (`qiusuo.quant.formats`) and the packed layers (`qiusuo.quant.modules`, `apply`): each format's
error bound and fixed point, each packed layer against the float layer holding its dequantised weights (the same
arithmetic up to summation order), on the kernel path (few rows) and the GEMM path (many rows); with q8 activations
(the decoding default for int8, int4, mxfp4) against the float layer given x as the kernels quantise it."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.model.compressed_attention import GroupedLinear
from qiusuo.model.moe import Experts, swiglu
from qiusuo.quant import kernels
from qiusuo.model.transformer import Transformer
from qiusuo.quant.apply import families, formats_of, parse_spec, quantize_model, set_activations
from qiusuo.quant.formats import Format, parse
from qiusuo.quant.modules import QuantExperts, QuantGroupedLinear, QuantLinear

FORMATS = ["bf16", "int8", "int4", "int4:64", "int4:128", "mxfp4", "fp8"]


def q8(x: torch.Tensor) -> torch.Tensor:
    """x as the q8 kernels see it: Q8_0 codes times their block scales (exact in float32)."""
    codes, d = kernels.quantize_q8(x.reshape(-1, x.shape[-1]))
    return (codes.float().reshape(d.shape[0], -1, 32) * d[..., None]).reshape(x.shape)


def close(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """a, b: two fp32 sums of K products of x and w in different orders; each partial sum rounds at most
    K * 2^-24 relative to the sum of magnitudes, so 4 K ulps of max|x| max|w| K bounds their gap."""
    K = x.shape[-1]
    bound = 4 * K * 2.0**-24 * x.abs().max() * w.abs().max() * K
    assert (a - b).abs().max() <= bound, ((a - b).abs().max(), bound)


@pytest.mark.parametrize("spec", FORMATS)
def test_quantise_dequantise_error_and_fixed_point(spec):
    fmt = parse(spec)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different scales
    q, s = fmt.quantize(w)
    (qs, qd), sc = fmt.shapes(*w.shape)
    assert q.shape == qs and q.dtype == qd and (s is None) == (sc is None)
    d = fmt.dequantize(q, s)
    err = (d - w).abs()
    if fmt.name == "int8":
        assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()
    elif fmt.name == "int4":
        # the grid is -8d..7d with -8d the group's extreme: half a step inside it, and for weights of the other
        # sign beyond 7|d| (Q4_0's asymmetry) one step plus 8 times the bf16 rounding of d (2^-8 relative): 1.04
        step = s.float().abs().repeat_interleave(fmt.group, 1)
        inside = (w / -s.float().repeat_interleave(fmt.group, 1)).abs() <= 7
        assert (err[inside] <= step[inside] / 2 * 1.01).all() and (err <= step * 1.04).all()
    elif fmt.name == "bf16":
        assert torch.equal(d, w.bfloat16().float())
    else:  # fp8 / mxfp4: qiusuo.quant.fp8 / fp4 hold their own bounds; here relative to the row's size
        assert (err.amax(1) <= 0.25 * w.abs().amax(1)).all()
    q2, s2 = fmt.quantize(d)  # re-quantising the dequantised weight gives back the same bytes
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    if s is not None:
        assert torch.equal(s2.view(torch.uint8), s.view(torch.uint8))


@pytest.mark.parametrize("act", ["fp32", "q8"])
@pytest.mark.parametrize("spec", FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_quant_linear_equals_the_float_layer_with_its_dequantised_weight(spec, rows, act):
    fmt = parse(spec)
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 200, bias=True)
    q = QuantLinear.from_linear(lin, fmt)
    assert q.act == ("q8" if fmt.name in ("int8", "int4", "mxfp4") else "fp32")  # the decoding default
    q.act = kernels.default_act(fmt.name, fmt.group) if act == "q8" else "fp32"
    ref = torch.nn.Linear(256, 200, bias=True)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized())
        ref.bias.copy_(lin.bias)
    x = torch.randn(rows, 256)
    seen = q8(x) if q.act == "q8" and rows <= q.kernel_rows else x  # many rows: dequantised bands, float x
    close(q(x), ref(seen), x, ref.weight)
    y = q(x.view(1, rows, 256))
    assert y.shape == (1, rows, 200)


@pytest.mark.parametrize("act", ["fp32", "q8"])
@pytest.mark.parametrize("spec", ["int8", "int4", "mxfp4", "fp8", "bf16"])
@pytest.mark.parametrize("rows", [1, 40])
def test_quant_grouped_linear_equals_the_float_layer_with_its_dequantised_weight(spec, rows, act):
    """V4's grouped output projection: each group's rows are one expert of the grouped kernel (few rows), or go
    through dequantised bands (many); against `GroupedLinear` holding the dequantised weight."""
    fmt = parse(spec)
    torch.manual_seed(0)
    lin = GroupedLinear(256, 2 * 128, 2)
    q = QuantGroupedLinear.from_linear(lin, fmt)
    q.act = kernels.default_act(fmt.name, fmt.group) if act == "q8" else "fp32"
    ref = GroupedLinear(256, 2 * 128, 2)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized())
    x = torch.randn(rows, 3, 2, 256)
    seen = q8(x) if q.act == "q8" and 3 * rows <= q.kernel_rows else x
    y = q(x)
    assert y.shape == (rows, 3, 2, 128)
    close(y, ref(seen), x, ref.weight)
    with pytest.raises(ValueError, match="whole groups"):
        QuantGroupedLinear(256, 200, 3, fmt)


@pytest.mark.parametrize("act", ["fp32", "q8"])
@pytest.mark.parametrize("spec", ["int8", "int4", "mxfp4", "fp8", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_quant_experts_equal_float_experts_with_dequantised_weights(spec, tokens, act):
    fmt = parse(spec)
    cfg = get_config("tiny", n_routed_experts=8, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=128)
    torch.manual_seed(0)
    experts = Experts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    q = QuantExperts.from_experts(experts, fmt)
    set_activations(q, act)
    ref = Experts(cfg)
    gu, d = q.dequantized()
    with torch.no_grad():
        ref.gate_up_proj.copy_(gu)
        ref.down_proj.copy_(d)
    x = torch.randn(tokens, 128)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(tokens)])
    idx[0] = torch.tensor([3, 5])
    w = torch.rand(tokens, 2)
    with torch.no_grad():
        if q.act == "fp32" or not q._few(x, torch.ones(1)):
            close(q(x, w, idx), ref(x, w, idx), x, gu)
        else:  # each token's expert in turn, x and the SwiGLU output quantised as the kernels do
            want = torch.zeros(tokens, 128)
            for t in range(tokens):
                for k in range(2):
                    e = int(idx[t, k])
                    g, u = (q8(x[t:t + 1]) @ gu[e].T).chunk(2, -1)
                    want[t] += w[t, k] * (q8(swiglu(g, u, None)) @ d[e].T)[0]
            close(q(x, w, idx), want, x, gu)


def test_families_and_quantize_model_forward_equals_the_dequantised_twin():
    cfg = get_config("tiny", num_nextn_predict_layers=1, hidden_size=128, moe_intermediate_size=64,
                     intermediate_size=256, vocab_size=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.reset_parameters(0)
    fams = families(model)
    kinds = set(fams.values())
    assert kinds == {"experts", "shared", "dense", "attention", "head"}
    assert not any(p.endswith("kv_b_proj") for p in fams)  # packed in its own layout (test_latent.py)
    twin = Transformer(cfg).eval()
    twin.load_state_dict(model.state_dict())
    spec = parse_spec("experts=int4,shared=int8,dense=fp8,attention=int8,head=int8")
    set_activations(quantize_model(model, spec), "fp32")  # the stored weights' exact arithmetic
    assert formats_of(model) == {"experts": "int4", "shared": "int8", "dense": "fp8", "attention": "int8",
                                 "head": "int8"}
    sd = twin.state_dict()
    with torch.no_grad():  # the twin takes the dequantised weights
        for path, fam in families(model).items():
            m = model.get_submodule(path)
            if isinstance(m, QuantExperts):
                gu, d = m.dequantized()
                sd[f"{path}.gate_up_proj"].copy_(gu)
                sd[f"{path}.down_proj"].copy_(d)
            else:
                sd[f"{path}.weight"].copy_(m.dequantized())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        a, b = model(ids), twin(ids)
    assert (a - b).abs().max() < 1e-4, (a - b).abs().max()


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        parse("int3")
    with pytest.raises(ValueError, match="int4 group '48'"):
        parse("int4:48")
    with pytest.raises(ValueError, match="unknown tensor family 'expert'"):
        parse_spec("expert=int4")
    with pytest.raises(ValueError, match="must look like family=format"):
        parse_spec("experts=int4,int8")
    with pytest.raises(ValueError, match="not a multiple of int4:64's group of 64"):
        QuantLinear(96, 8, parse("int4:64"))
    assert parse_spec("native") == "native" and parse_spec(None) is None
    assert parse_spec("int8") == {f: Format("int8") for f in ("experts", "shared", "dense", "attention", "head")}
