"""DeepSeek-V4's recipe on a V3-style (MLA) model, one switch at a time: mHC streams (`use_mhc`), per-layer MLP
kinds with hash-routed layers (`mlp_layer_types`), the SwiGLU clamp (`swiglu_limit`), with MTP. Each switch
changes the model; the model trains, decodes over both caches like its full forward, and round-trips."""

import pytest
import torch

from qiusuo.config import ModelConfig, get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.hf import load_model, save_hf
from qiusuo.infer.engine import Engine
from qiusuo.infer.sampling import SamplingParams
from qiusuo.model.moe import HashRouter
from qiusuo.model.transformer import Transformer
import twins  # noqa: E402 (tests/model/twins.py)
from greedy import unambiguous  # noqa: E402 (tests/greedy.py)

RECIPE = dict(use_mhc=True, hc_mult=2, hc_sinkhorn_iters=5, mlp_layer_types=["dense", "hash_moe"], swiglu_limit=5.0)


def recipe_model(**over):
    torch.manual_seed(0)
    return Transformer(get_config("tiny", **{**RECIPE, **over})).eval()


def test_each_switch_changes_the_model():
    base = Transformer(get_config("tiny"))
    on = recipe_model()
    names = set(on.state_dict())
    assert "layers.0.attn_hc.fn" in names and "hc_head.hc_fn" in names and "mtp.0.e_proj.weight" in names
    assert isinstance(on.layers[1].mlp.gate, HashRouter) and not hasattr(on.layers[0].mlp, "gate")
    assert not any("attn_hc" in n or "tid2eid" in n for n in base.state_dict())


def test_trains_and_decodes_like_its_full_forward():
    model = recipe_model().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    out = model(ids, labels=ids.roll(-1, 1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.mtp > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if "attn_hc" in n or "hc_head" in n)
    model.eval()
    with torch.no_grad():
        full = model(ids)
    assert (twins.stepwise(model, ids, 7, 32) - full).abs().max() < 1e-4


def test_served_by_the_engine_and_round_trips(tmp_path):
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 4] * 8, vocab_size=300)
    model = recipe_model(vocab_size=tok.vocab_size)
    ps, refs = unambiguous(model, tok, (5, 19), 10)
    outs = Engine(model, tok, max_batch=2).generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    save_hf(model, tmp_path / "m", progress=False)
    back = load_model(tmp_path / "m", progress=False)
    assert back.cfg == model.cfg.replace(num_key_value_heads=model.cfg.num_attention_heads)  # to_hf fills it in
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_bad_recipe_configs_name_the_field():
    with pytest.raises(ValueError, match="mlp_layer_types"):
        get_config("tiny", mlp_layer_types=["moe"])
    with pytest.raises(ValueError, match="mlp_layer_types"):
        get_config("tiny", n_routed_experts=None, mlp_layer_types=["dense", "hash_moe"])
    with pytest.raises(ValueError, match="hc_mult"):
        get_config("tiny", use_mhc=True, hc_mult=0)
    with pytest.raises(ValueError, match="use_mhc"):
        ModelConfig(**{**get_config("v4-tiny").__dict__, "use_mhc": False})
