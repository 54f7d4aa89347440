"""MLA's kv_b_proj packed for the absorbed decoding path (`qiusuo.quant.latent.QuantLatent`) against the float
layer holding its dequantised weight: each absorbed product and the expanded path, every format, float32
activations (the same arithmetic up to summation order); the state dict in the stored layout; a model packed by
`quantize_model` decoding through the engine as through `generate`, and what `load_model` packs."""

import copy

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.hf import load_model, save_hf
from qiusuo.infer.engine import Engine
from qiusuo.infer.sampling import SamplingParams
from qiusuo.model.mla import LatentProjection
from qiusuo.model.transformer import Transformer
from qiusuo.quant.apply import pack_latents, parse_spec, quantize_model, set_activations
from qiusuo.quant.formats import parse
from qiusuo.quant.latent import QuantLatent
from greedy import unambiguous  # tests/greedy.py

R, H, N, V = 64, 3, 32, 64


def projection(seed: int = 0) -> LatentProjection:
    torch.manual_seed(seed)
    p = LatentProjection(R, H, N, V)
    torch.nn.init.normal_(p.weight, std=0.05)
    return p


@pytest.mark.parametrize("fmt", ["int8", "int4", "mxfp4", "fp8", "bf16"])
def test_packed_latent_equals_its_dequantised_twin(fmt):
    q = QuantLatent.from_projection(projection(), parse(fmt))
    q.act = "fp32"
    ref = LatentProjection(R, H, N, V)
    ref.weight.data = q.dequantized()
    assert (ref.weight - projection().weight).abs().max() < 0.05  # it is the weight, quantised
    g = torch.Generator().manual_seed(1)
    q_nope, o_lat, c = torch.randn(2, 3, H, N, generator=g), torch.randn(2, H, 3, R, generator=g), torch.randn(2, 5, R, generator=g)
    for got, want, k in [(q.absorb_query(q_nope), ref.absorb_query(q_nope), N),
                         (q.absorb_values(o_lat), ref.absorb_values(o_lat), R)]:
        # float32 sums of k terms in another order: within k u of the sum of magnitudes (~1e-6 here)
        assert got.shape == want.shape and (got - want).abs().max() <= k * 2 ** -23 * 4 * want.abs().max()
    assert torch.equal(q(c), ref(c))  # the expanded path: the same dequantised bands and GEMM
    q.kernel_rows = 0  # many rows: dequantised heads and a batched matmul
    assert (q.absorb_query(q_nope) - ref.absorb_query(q_nope)).abs().max() <= N * 2 ** -21 * ref.absorb_query(q_nope).abs().max()


def test_state_dict_is_the_stored_layout():
    q = QuantLatent.from_projection(projection(), parse("int8"))
    sd = q.state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], q.dequantized())
    again = QuantLatent(R, H, N, V, parse("int8"))
    again.load_state_dict(sd)
    assert (again.dequantized() - q.dequantized()).abs().max() <= 1e-6 * q.dequantized().abs().max()


def test_shapes_the_kernels_cannot_take_stay_in_float():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", num_nextn_predict_layers=0))  # qk_nope_head_dim 16: below a block of 32
    pack_latents(model, parse("int8"))
    assert type(model.layers[0].self_attn.kv_b_proj) is LatentProjection
    with pytest.raises(ValueError, match="multiples of 32"):
        QuantLatent(16, 2, 16, 16, parse("int8"))


@pytest.fixture(scope="module")
def model(perturbed):
    return perturbed(hidden_size=128, qk_nope_head_dim=32, kv_lora_rank=64, v_head_dim=32)


def test_packed_model_decodes_through_the_engine_as_generate(model, tok):
    packed = set_activations(quantize_model(copy.deepcopy(model), parse_spec("attention=int8")), "fp32")
    assert all(isinstance(layer.self_attn.kv_b_proj, QuantLatent) for layer in packed.layers)
    ps, refs = unambiguous(packed, tok, (5, 9), 6)
    eng = Engine(packed, tok, max_batch=2, block_size=4)
    assert [o.outputs[0].token_ids for o in eng.generate(ps, SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True))] == refs


def test_load_model_packs_latents_for_an_explicit_attention_format(model, tok, tmp_path):
    save_hf(model, tmp_path / "m", tokenizer=tok, progress=False)
    kinds = {spec: type(load_model(tmp_path / "m", dtype=torch.float32, quantize=spec, progress=False)
                        .layers[0].self_attn.kv_b_proj) for spec in ("int4", "native", None)}
    assert kinds == {"int4": QuantLatent, "native": LatentProjection, None: LatentProjection}


@pytest.mark.parametrize("name,dims", [("tiny", dict(hidden_size=128, qk_nope_head_dim=32, kv_lora_rank=64,
                                                    v_head_dim=32)),
                                       ("v4-tiny", dict(o_lora_rank=32))], ids=["v3-kv_b_proj", "v4-wo_a"])
def test_a_packed_model_saves_and_loads_back_the_same_function(name, dims, tmp_path):
    """kv_b_proj saves as its float weight (the stored layout), V4's grouped projection as its codes: loaded back
    (native) the model computes what it did."""
    torch.manual_seed(0)
    m = Transformer(get_config(name, vocab_size=256, num_nextn_predict_layers=0, **dims)).eval()
    m.reset_parameters(0)
    packed = set_activations(quantize_model(m, parse_spec("attention=int8")), "fp32")
    kinds = {type(x).__name__ for n, x in packed.named_modules() if n.endswith(("kv_b_proj", "o_a_proj"))}
    assert kinds == ({"QuantLatent"} if name == "tiny" else {"QuantGroupedLinear"})
    save_hf(packed, tmp_path / "m", progress=False)
    back = set_activations(load_model(tmp_path / "m", dtype=torch.float32, quantize="native", progress=False), "fp32")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(packed(ids), back(ids))
