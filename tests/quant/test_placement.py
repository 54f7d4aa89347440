"""Experts placed apart from the rest of the model (`qiusuo.quant.placement`): with the cold bank and the hot
experts on one device (all this machine has) the output is bit for bit the unplaced model's, for float and packed
experts, with and without hot experts; rows crossing to the cold bank are counted; hot experts follow the
calibration counts; the loader allocates experts on their own device."""

import copy

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.hf import load_model, save_hf
from qiusuo.model.moe import MoE
from qiusuo.model.transformer import Transformer
from qiusuo.quant.apply import parse_spec, quantize_model
from qiusuo.quant.placement import PlacedExperts, bus_bytes, place_experts, routing_counts


def tiny(spec: str | None, vocab: int = 256) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", vocab_size=vocab, hidden_size=128, moe_intermediate_size=64,
                               n_routed_experts=8, num_experts_per_tok=2, num_nextn_predict_layers=0)).eval()
    m.reset_parameters(0)
    return quantize_model(m, parse_spec(spec)) if spec else m


@pytest.mark.parametrize("spec", [None, "experts=int4"])
@pytest.mark.parametrize("hot", [0, 3])
def test_placed_experts_equal_the_unplaced_model(spec, hot):
    model = tiny(spec)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
        counts = routing_counts(model, ids)
    placed = place_experts(copy.deepcopy(model), "cpu", gpu_experts=hot, counts=counts)
    layers = [m.experts for m in placed.modules() if isinstance(m, MoE)]
    assert layers and all(isinstance(e, PlacedExperts) for e in layers)
    if hot:  # the hot experts are each layer's most used, by the calibration counts
        for e, c in zip(layers, counts):
            assert (e.hot_slot >= 0).sum() == hot
            assert c[e.hot_slot >= 0].min() >= c[e.hot_slot < 0].max()
    with torch.no_grad():
        got = placed(ids)
    assert torch.equal(got, ref)
    crossed = sum(e.crossed_rows for e in layers)
    total = 2 * 10 * 2 * len(layers)  # (B*T tokens) x K rows per layer
    assert (crossed == total) if not hot else (0 < crossed < total)
    assert bus_bytes(placed) == 2 * crossed * 128 * 4


def test_loader_puts_experts_on_their_device(tmp_path):
    model = tiny(None)
    save_hf(model, tmp_path / "m", progress=False)
    loaded = load_model(tmp_path / "m", dtype=torch.float32, device="cpu", experts_device="cpu",
                        quantize="experts=int4", progress=False)
    banks = [m.experts for m in loaded.modules() if isinstance(m, MoE)]
    assert all(isinstance(b, PlacedExperts) and b.device.type == "cpu" for b in banks)
    ids = torch.randint(0, 256, (1, 7))
    ref = quantize_model(tiny(None), parse_spec("experts=int4"))
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref(ids))


def test_load_engine_with_experts_apart_decodes_as_without(tmp_path):
    from qiusuo.data.tokenizer import Tokenizer
    from qiusuo.infer.load import load_engine
    from qiusuo.infer.sampling import SamplingParams

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 4] * 8, vocab_size=300)
    save_hf(tiny(None, tok.vocab_size), tmp_path / "m", tokenizer=tok, progress=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = tok.encode("the lazy fox")
    plain = load_engine(str(tmp_path / "m"), device="cpu", threads=1, quantize="experts=int4")
    apart = load_engine(str(tmp_path / "m"), device="cpu", threads=1, quantize="experts=int4", experts_device="cpu",
                        gpu_experts=2)
    assert all((m.experts.hot_slot >= 0).sum() == 2 for m in apart.model.modules() if isinstance(m, MoE))
    a = plain.generate([prompt], params)[0].outputs[0].token_ids
    b = apart.generate([prompt], params)[0].outputs[0].token_ids
    assert a == b
    with pytest.raises(ValueError, match="give --experts-device"):
        load_engine(str(tmp_path / "m"), device="cpu", gpu_experts=2)
