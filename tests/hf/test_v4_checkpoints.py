"""DeepSeek-V4 checkpoints in and out: the hub's names (what deepseek-ai/DeepSeek-V4-Flash ships), transformers'
spellings, FP8 blocks and FP4 experts, MTP modules, bad input, peak memory.

One tiny V4 shape serves every test: 4 layers (sliding window, CSA, HCA, CSA) with compress rates 4 and 8, two
hash-routed layers, one MTP module. The indexer has 16 heads and keeps 3 of the 10 compressed entries a 40-token
sequence has, so its top-k is exercised and (random weights, many heads) has no ties, on which implementations
may legitimately differ. Matrices are 128 wide or multiples of 128, as transformers 5.24's FP8 dequantiser needs
(it derives the block as rows // scale rows, test_fp8_interop.py), and FP4 rows a multiple of 32 inputs.
"""

import json
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qiusuo
from qiusuo.cli import main as cli
from qiusuo.config import ModelConfig
from qiusuo.hf import CheckpointError, load_model, save_hf
from qiusuo.hf.load import plan
from qiusuo.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 loader needs it

T, TOL = 40, 1e-4
KW = dict(vocab_size=512, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
          head_dim=64, qk_rope_head_dim=16, q_lora_rank=128, num_experts_per_tok=2, n_routed_experts=8,
          n_shared_experts=1, o_groups=2, o_lora_rank=128, index_n_heads=16, index_head_dim=32, index_topk=3,
          sliding_window=8, hc_mult=2, hc_sinkhorn_iters=5, num_hash_layers=2, max_position_embeddings=512,
          layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                       "compressed_sparse_attention"],
          compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
          num_nextn_predict_layers=1, swiglu_limit=0.5,
          rope_scaling={"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "beta_fast": 32,
                        "beta_slow": 1})

# The 82 distinct tensor-name patterns of DeepSeek-V4-Flash's model.safetensors.index.json (digits -> 0), as SGLang's
# V4 loader tests quote them (`_V4_KEY_PATTERNS`, `pattern`): an FP8 + FP4-experts export must spell the same.
FLASH_PATTERNS = {
    "embed.weight", "hc_head_base", "hc_head_fn", "hc_head_scale", "head.weight", "norm.weight",
    *[f"{p}.{n}" for p in ("layers.0", "mtp.0") for n in (
        "attn.attn_sink", "attn.kv_norm.weight", "attn.q_norm.weight", "attn_norm.weight", "ffn_norm.weight",
        *[f"attn.{w}.{s}" for w in ("wkv", "wo_a", "wo_b", "wq_a", "wq_b") for s in ("scale", "weight")],
        "ffn.experts.0.w0.scale", "ffn.experts.0.w0.weight", "ffn.gate.bias", "ffn.gate.weight",
        "ffn.shared_experts.w0.scale", "ffn.shared_experts.w0.weight",
        *[f"hc_{site}_{x}" for site in ("attn", "ffn") for x in ("base", "fn", "scale")])],
    *[f"layers.0.attn.{c}.{n}" for c in ("compressor", "indexer.compressor")
      for n in ("ape", "norm.weight", "wgate.weight", "wkv.weight")],
    "layers.0.attn.indexer.weights_proj.weight", "layers.0.attn.indexer.wq_b.scale",
    "layers.0.attn.indexer.wq_b.weight", "layers.0.ffn.gate.tid2eid",
    *[f"mtp.0.{n}" for n in ("e_proj.scale", "e_proj.weight", "h_proj.scale", "h_proj.weight", "enorm.weight",
                             "hnorm.weight", "norm.weight", "hc_head_base", "hc_head_fn", "hc_head_scale")],
}


def pattern(name: str) -> str:
    """`layers.12.ffn.experts.7.w3.weight` -> `layers.0.ffn.experts.0.w0.weight`, as FLASH_PATTERNS are written."""
    return re.sub(r"(?<=\.)(w?)\d+(?=\.)", r"\g<1>0", name)


def hf_config(**over):
    return transformers.DeepseekV4Config(**{**KW, **over})


def randomize_(sd: dict, seed: int) -> None:
    """Every tensor random, nothing left at its init (zero sinks, biases and position biases, all-zero tid2eid):
    norms near 1, hash tables K distinct experts per token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("tid2eid"):
                v.copy_(torch.rand(v.shape[0], KW["n_routed_experts"], generator=gen).argsort(-1)[:, :v.shape[1]])
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=gen) * 0.1 + (1.0 if k.endswith("norm.weight") else 0.0))


def ours_model(seed=0, **over) -> Transformer:
    model = Transformer(ModelConfig.from_hf(hf_config(**over).to_dict())).eval()
    randomize_(model.state_dict(), seed)
    return model


def tf_load(path, **kw):
    model, info = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tensors_of(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def no_alloc(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("parameters were allocated before the checkpoint was validated")
    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)


def broken(exports, tmp_path, kind, edit=None, config=None):
    """A copy of export `kind` with its tensors (`edit(dict)`) or config.json (`config(dict)`) changed."""
    d = tmp_path / kind
    shutil.copytree(exports[1] / kind, d)
    if edit:
        t = load_file(str(d / "model.safetensors"))
        edit(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config:
        conf = json.loads((d / "config.json").read_text())
        config(conf)
        (d / "config.json").write_text(json.dumps(conf))
    return d


def expect(folder, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_model(folder, progress=False)
    for frag in fragments:
        assert str(frag) in str(err.value), f"{frag!r} not in: {err.value}"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, KW["vocab_size"], (2, T), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(hf_config()).eval()
    randomize_(model.state_dict(), 1)
    path = tmp_path_factory.mktemp("tf") / "m"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One random model of ours (MTP included) and its exports: plain fp32, FP8 with float / ue8m0 scales, and FP8
    with FP4 experts (ue8m0, V4-Flash's format, and float32 scales)."""
    model = ours_model()
    root = tmp_path_factory.mktemp("exports")
    kinds = {"plain": {}, "fp8-float": dict(fp8=True, scale_fmt="float"), "fp8-ue8m0": dict(fp8=True),
             "fp4-ue8m0": dict(fp8=True, fp4_experts=True), "fp4-float": dict(fp8=True, fp4_experts=True,
                                                                               scale_fmt="float")}
    for kind, kw in kinds.items():
        save_hf(model, root / kind, progress=False, **kw)
    return model, root


# ---------------------------------------------------------------- (a), (b): names and logits both ways
def test_loads_what_transformers_save_pretrained_writes(saved_by_transformers, ids):
    theirs, path = saved_by_transformers
    names = set(tensors_of(path))
    # what transformers 5.24's save_pretrained writes: its conversion mapping reversed, `model.` kept, the
    # anchored renames left undone (names_v4.SAVED)
    for n in ("model.embed_tokens.weight", "head.weight", "model.norm.weight", "model.hc_head.hc_fn",
              "model.layers.0.attn.wq_a.weight", "model.layers.0.attn.norm.weight", "model.layers.0.hc_attn_fn",
              "model.layers.1.attn.indexer.compressor.wkv.weight", "model.layers.0.ffn.experts.7.w3.weight",
              "model.layers.0.ffn.gate.tid2eid", "model.layers.2.ffn.gate.bias"):
        assert n in names, n
    assert not any(n.startswith("mtp.") for n in names)  # transformers builds no MTP
    assert plan(path).form == "transformers save_pretrained"
    ours = load_model(path, progress=False)
    assert ours.cfg.num_nextn_predict_layers == 0  # config.json declares one, the folder has none
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids)).abs().max().item()
    assert diff <= TOL, diff


def test_loads_transformers_module_names(saved_by_transformers, tmp_path, ids):
    theirs, path = saved_by_transformers
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert plan(tmp_path).form == "transformers module names"
    with torch.no_grad():
        assert (theirs(ids).logits - load_model(tmp_path, progress=False)(ids)).abs().max().item() <= TOL


def test_save_hf_writes_hub_names_that_transformers_reads(exports, ids):
    model, root = exports
    names = tensors_of(root / "plain")
    assert {pattern(n) for n in names} == {p for p in FLASH_PATTERNS if not p.endswith(".scale")}
    assert plan(root / "plain").form == "hub"
    assert names["layers.0.ffn.gate.tid2eid"].dtype == torch.int32  # as DeepSeek stores it
    assert torch.equal(names["layers.1.ffn.experts.5.w3.weight"],
                       model.layers[1].mlp.experts.gate_up_proj[5, KW["moe_intermediate_size"]:])
    theirs = tf_load(root / "plain")
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= TOL


def test_bf16_export_keeps_what_the_hub_keeps_in_float32(exports, tmp_path):
    model, _ = exports
    save_hf(model, tmp_path / "bf16", dtype="bfloat16", progress=False)
    t = tensors_of(tmp_path / "bf16")
    f32 = {n for n, v in t.items() if v.dtype == torch.float32}
    assert {pattern(n) for n in f32} == {
        "hc_head_base", "hc_head_fn", "hc_head_scale", "layers.0.attn.attn_sink", "layers.0.attn.compressor.ape",
        "layers.0.attn.indexer.compressor.ape", "layers.0.ffn.gate.bias", "mtp.0.attn.attn_sink",
        "mtp.0.ffn.gate.bias", "mtp.0.hc_head_base", "mtp.0.hc_head_fn", "mtp.0.hc_head_scale",
        *[f"{p}.hc_{s}_{x}" for p in ("layers.0", "mtp.0") for s in ("attn", "ffn") for x in ("base", "fn", "scale")]}
    assert t["embed.weight"].dtype == torch.bfloat16 and t["layers.0.ffn.gate.tid2eid"].dtype == torch.int32


# ---------------------------------------------------------------- (d): MTP
def test_mtp_round_trips(exports, ids, tmp_path):
    model, root = exports
    loaded = load_model(root / "plain", progress=False)
    assert loaded.cfg.num_nextn_predict_layers == 1
    assert_same_state(model, loaded)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    a, b = model(ids, labels=labels), loaded(ids, labels=labels)
    assert a.mtp > 0 and torch.equal(a.mtp, b.mtp) and torch.equal(a.loss, b.loss)
    without = load_model(root / "plain", load_mtp=False, progress=False)
    assert len(without.mtp) == 0 and torch.equal(without(ids), model(ids))
    save_hf(without, tmp_path / "m", progress=False)
    assert not any(n.startswith("mtp.") for n in tensors_of(tmp_path / "m"))


# ---------------------------------------------------------------- (c): FP8 and FP4
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def reference_dequant(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Each element times its own block's (FP8: 128x128) or group's (FP4: 1x32) scale, looked up one by one."""
    s = s.view(torch.uint8).view(torch.float8_e8m0fnu).float() if s.dtype == torch.uint8 else s.float()
    if w.dtype == torch.int8:  # column 2j in the low nibble of byte j, 2j+1 in the high one
        u = w.view(torch.uint8).long()
        w = torch.stack([E2M1[u & 15], E2M1[u >> 4]], -1).flatten(-2)
        rows, cols = torch.arange(w.shape[0])[:, None], torch.arange(w.shape[1])[None, :] // 32
    else:
        rows, cols = torch.arange(w.shape[0])[:, None] // 128, torch.arange(w.shape[1])[None, :] // 128
    return w.float() * s[rows, cols]


@pytest.mark.parametrize("kind", ["fp8-float", "fp8-ue8m0", "fp4-ue8m0", "fp4-float"])
def test_quantised_exports_round_trip_bit_exactly(exports, kind, tmp_path, ids):
    model, root = exports
    fp4, fmt = kind.startswith("fp4"), kind.split("-")[1]
    stored = tensors_of(root / kind)
    quantised = {n.removesuffix(".scale") + ".weight" for n in stored if n.endswith(".scale")}
    experts = {n for n in quantised if ".ffn.experts." in n}
    # exactly what V4-Flash quantises (plus its routed experts, FP4 or FP8), nothing else
    assert {pattern(n) for n in stored} == FLASH_PATTERNS
    assert len(experts) == 5 * 3 * KW["n_routed_experts"]  # 4 layers + the MTP block
    for n in quantised:
        q, s = stored[n], stored[n.removesuffix(".weight") + ".scale"]
        want = torch.int8 if fp4 and n in experts else torch.float8_e4m3fn
        assert q.dtype == want, n
        assert s.dtype == (torch.float8_e8m0fnu if fmt == "ue8m0" else torch.float32), n
    w1 = "layers.2.ffn.experts.3.w1.weight"  # (I, D) = (128, 128)
    assert stored[w1].shape == ((128, 64) if fp4 else (128, 128))
    assert stored[w1.replace("weight", "scale")].shape == ((128, 4) if fp4 else (1, 1))
    conf = json.loads((root / kind / "config.json").read_text())
    assert conf["quantization_config"]["scale_fmt"] == fmt and conf["quantization_config"]["quant_method"] == "fp8"
    assert conf.get("expert_dtype") == ("fp4" if fp4 else None)

    loaded = load_model(root / kind, dtype=torch.float32, progress=False)
    hub = qiusuo.hf.to_hf_state_dict(loaded)
    for n in quantised:  # the loaded values are the stored format's values, exactly
        assert torch.equal(hub[n], reference_dequant(stored[n], stored[n.removesuffix(".weight") + ".scale"])), n
    for n, t in stored.items():  # and everything else is what was written
        if n not in quantised and not n.endswith(".scale"):
            assert torch.equal(hub[n], t.to(hub[n].dtype)), n
    assert not torch.equal(hub[w1], qiusuo.hf.to_hf_state_dict(model)[w1])  # it was quantised, not passed through

    save_hf(loaded, tmp_path / "again", fp8=True, fp4_experts=fp4, scale_fmt=fmt, progress=False)
    again = tensors_of(tmp_path / "again")
    assert again.keys() == stored.keys()
    for n, t in stored.items():
        assert again[n].dtype == t.dtype and torch.equal(again[n].view(torch.uint8), t.view(torch.uint8)), n

    # transformers 5.24 reads all four on CPU, dequantising to the requested dtype (FineGrainedFP8Config with
    # dequantize=True; without one it does the same after a warning that FP8 needs a GPU)
    qc = transformers.FineGrainedFP8Config(dequantize=True, scale_fmt=fmt, expert_dtype="fp4" if fp4 else "fp8")
    theirs = tf_load(root / kind, quantization_config=qc)
    with torch.no_grad():
        assert (theirs(ids).logits - loaded(ids)).abs().max().item() <= TOL


def test_ue8m0_round_trip_is_exact_through_bf16(exports, tmp_path):
    """Powers of two times e4m3 / e2m1 values are exact in bf16: a V4-Flash-style folder survives a bf16 load."""
    _, root = exports
    loaded = load_model(root / "fp4-ue8m0", dtype=torch.bfloat16, progress=False)
    save_hf(loaded, tmp_path / "again", fp8=True, fp4_experts=True, progress=False)
    a, b = tensors_of(root / "fp4-ue8m0"), tensors_of(tmp_path / "again")
    for n in a:
        if n.endswith(".scale") or n.removesuffix(".weight") + ".scale" in a:
            assert torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)), n


def test_convert_and_inspect_on_the_command_line(exports, tmp_path, capsys):
    _, root = exports
    out, again = tmp_path / "fp4", tmp_path / "again"
    assert cli(["convert", str(root / "plain"), str(out), "--fp8", "--fp4-experts", "--no-progress"]) == 0
    assert cli(["convert", str(out), str(again), "--fp8", "--fp4-experts", "--max-shard-gb", str(2**20 / 2**30),
                "--no-progress"]) == 0
    a, b = tensors_of(out), tensors_of(again)
    assert a.keys() == b.keys() and len(list(again.glob("*.safetensors"))) > 1
    assert all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    capsys.readouterr()
    assert cli(["inspect", str(again), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "DeepseekV4ForCausalLM" and d["layer_types"] == KW["layer_types"]
    assert d["layer_kinds"] == {"sliding_attention": 1, "compressed_sparse_attention": 2,
                                "heavily_compressed_attention": 1}
    assert d["hash_layers"] == [0, 1] and d["mtp_layers"] == [0] and d["params_mtp"] > 0
    assert d["fp8"] and d["fp4_experts"] == 5 * 3 * KW["n_routed_experts"] and d["scale_fmt"] == ["ue8m0"]
    assert d["config_quantization"]["expert_dtype"] == "fp4"
    assert cli(["inspect", str(again)]) == 0
    text = capsys.readouterr().out
    for frag in ("attention     SCHC  (S sliding_attention x1", "hash routing  layers 0, 1", "modules mtp.0",
                 "ue8m0 scales", "FP4 experts   yes"):
        assert frag in text, (frag, text)
    assert cli(["inspect", str(root / "plain")]) == 0
    assert "FP8           no" in capsys.readouterr().out


def test_deepseek_config_spelling(exports, tmp_path):
    """The same weights under a config.json in DeepSeek's own spelling (per-layer `compress_ratios` with the MTP
    block's entry, `num_hash_layers`, a top-level `expert_dtype`) load to the same model."""
    def deepseek(conf):
        for k in ("layer_types", "compress_rates", "mlp_layer_types"):
            del conf[k]
        del conf["quantization_config"]["expert_dtype"]
        conf.update(compress_ratios=[0, 4, 8, 4, 0], compress_rate_csa=4, compress_rate_hca=8, num_hash_layers=2)

    d = broken(exports, tmp_path, "fp4-ue8m0", config=deepseek)
    assert_same_state(load_model(d, progress=False), load_model(exports[1] / "fp4-ue8m0", progress=False))


def test_fp4_experts_are_a_v4_format(tmp_path):
    with pytest.raises(ValueError, match="fp8=True"):
        save_hf(ours_model(), tmp_path / "m", fp4_experts=True, progress=False)
    with pytest.raises(ValueError, match="deepseek_v4") as e:
        save_hf(Transformer(qiusuo.get_config("tiny")), tmp_path / "m", fp8=True, fp4_experts=True, progress=False)
    assert "fp8=True" not in str(e.value)  # it was passed: the V3 model is what is wrong
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_convert_fp4_experts_speaks_in_flags(tmp_path, capsys):
    """`qiusuo convert` names its own flags, not save_hf's arguments: --fp4-experts on a V3 model says to drop it
    (--fp8 was given), on a V4 model without --fp8 that it needs --fp8; both before anything is written."""
    save_hf(Transformer(qiusuo.get_config("tiny")), tmp_path / "v3", progress=False)
    save_hf(ours_model(), tmp_path / "v4", progress=False)
    assert cli(["convert", str(tmp_path / "v3"), str(tmp_path / "out"), "--fp8", "--fp4-experts", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--fp4-experts is for DeepSeek-V4 checkpoints (this one is deepseek_v3); drop it" in err
    assert "fp8=True" not in err
    assert cli(["convert", str(tmp_path / "v4"), str(tmp_path / "out"), "--fp4-experts", "--no-progress"]) == 2
    assert "--fp4-experts needs --fp8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (e): bad input, refused before allocating
def test_missing_tid2eid(exports, tmp_path, no_alloc):
    d = broken(exports, tmp_path, "plain", lambda t: t.pop("layers.1.ffn.gate.tid2eid"))
    expect(d, "'layers.1.ffn.gate.tid2eid' is missing", "mlp_layer_types[1] is 'hash_moe'")


def test_tid2eid_of_the_wrong_dtype_or_range(exports, tmp_path):
    d = broken(exports, tmp_path, "plain", lambda t: t.update({"layers.0.ffn.gate.tid2eid": t[
        "layers.0.ffn.gate.tid2eid"].float()}))
    expect(d, "layers.0.ffn.gate.tid2eid", "integer")
    shutil.rmtree(d)
    d = broken(exports, tmp_path, "plain", lambda t: t["layers.0.ffn.gate.tid2eid"].__setitem__((5, 1), 8))
    expect(d, "layers.0.ffn.gate.tid2eid", "[0, 8]", "8 experts")


def test_compressor_tensor_of_the_wrong_shape(exports, tmp_path, no_alloc):
    name = "layers.1.attn.compressor.wkv.weight"  # CSA, overlapping windows: (2 * head_dim, hidden)
    d = broken(exports, tmp_path, "plain", lambda t: t.update({name: t[name][:64].contiguous()}))
    expect(d, name, "[64, 128]", "[128, 128]")
    shutil.rmtree(d)
    name = "layers.2.attn.compressor.ape"  # HCA: (m' = 8, head_dim)
    d = broken(exports, tmp_path, "plain", lambda t: t.update({name: torch.zeros(4, 64)}))
    expect(d, name, "[4, 64]", "[8, 64]")


def test_fp4_tensor_without_its_scale(exports, tmp_path, no_alloc):
    name = "layers.3.ffn.experts.6.w2.weight"
    d = broken(exports, tmp_path, "fp4-ue8m0", lambda t: t.pop(name.replace("weight", "scale")))
    expect(d, name, "packed FP4", "layers.3.ffn.experts.6.w2.scale", "missing")


def test_fp4_scale_of_the_wrong_shape(exports, tmp_path, no_alloc):
    scale = "layers.3.ffn.experts.6.w2.scale"
    d = broken(exports, tmp_path, "fp4-ue8m0", lambda t: t.update({scale: t[scale][:, :2].contiguous()}))
    expect(d, scale, "[128, 2]", "[128, 4]", "groups of 32")


def test_fp8_scale_of_the_wrong_shape(exports, tmp_path, no_alloc):
    scale = "layers.0.attn.wq_b.scale"  # wq_b (heads * head_dim, q_lora_rank) = (256, 128): 2 x 1 blocks
    d = broken(exports, tmp_path, "fp8-ue8m0", lambda t: t.update({scale: t[scale][:1].contiguous()}))
    expect(d, scale, "[1, 1]", "[2, 1]", "128x128")


def test_fp8_weight_without_its_scale(exports, tmp_path, no_alloc):
    d = broken(exports, tmp_path, "fp8-float", lambda t: t.pop("mtp.0.e_proj.scale"))
    expect(d, "'mtp.0.e_proj.weight' is FP8", "mtp.0.e_proj.scale", "missing")


def deepseek_spelling(conf: dict) -> None:
    """DeepSeek's own config.json spelling of the layer kinds, one entry short."""
    del conf["layer_types"], conf["compress_rates"]
    conf.update(compress_ratios=[0, 4, 8], compress_rate_csa=4, compress_rate_hca=8)


@pytest.mark.parametrize("field,edit", [
    ("layer_types", lambda c: c.update(layer_types=c["layer_types"][:3])),
    ("mlp_layer_types", lambda c: c.update(mlp_layer_types=["hash_moe"] * 5)),
    ("compress_ratios", deepseek_spelling),
])
def test_layer_lists_of_the_wrong_length(exports, tmp_path, no_alloc, field, edit):
    d = broken(exports, tmp_path, "plain", config=edit)
    expect(d, d / "config.json", field)


def test_hash_layer_count_disagreeing_with_the_weights(exports, tmp_path, no_alloc):
    d = broken(exports, tmp_path, "plain", config=lambda c: c.update(mlp_layer_types=["hash_moe"] * 3 + ["moe"]))
    expect(d, "layers.2.ffn.gate.bias", "unexpected")


# ---------------------------------------------------------------- (f): peak memory
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc/self")
@pytest.mark.parametrize("quant", [{}, dict(fp8=True, fp4_experts=True)], ids=["bf16", "fp8+fp4"])
def test_peak_memory_of_a_v4_load(tmp_path, quant):
    """tests/hf/test_memory.py's measurement (a fresh process, peak RSS after the load minus RSS before it, against
    the loaded model's bytes) on a ~70 MB bf16 V4 model, stored in bf16 or as V4-Flash ships (FP8 + FP4 experts)."""
    from test_memory import measure_load

    def save(folder, **over):
        save_hf(Transformer(ModelConfig.from_hf(hf_config(**over).to_dict())), tmp_path / folder, dtype="bfloat16",
                progress=False, **quant)

    save("big", hidden_size=512, moe_intermediate_size=256, n_routed_experts=16, vocab_size=4096,
         num_attention_heads=8, head_dim=128)
    save("small", hidden_size=64, moe_intermediate_size=32, q_lora_rank=32, o_lora_rank=32, head_dim=32,
         qk_rope_head_dim=8, index_head_dim=16)  # the warm-up: small, so its freed heap hardly offsets the figure
    r = measure_load(tmp_path / "big", tmp_path / "small", "bfloat16")
    print(f"V4 load, {quant or 'bf16'}: peak RSS {r['peak_over_model']:.3f}x of the {r['model_mib']:.1f} MiB model")
    assert r["peak_over_model"] < 1.3


def test_config_json_names_the_hash_layers_as_deepseek_does():
    """`num_hash_layers` beside `mlp_layer_types` when the hash layers come first (DeepSeek's spelling, what
    llama.cpp's converter reads); left out when they do not, and read back the same either way."""
    from qiusuo.config import ModelConfig

    cfg = qiusuo.get_config("v4-tiny")
    d = cfg.to_hf()
    assert d["num_hash_layers"] == cfg.mlp_layer_types.count("hash_moe") >= 1
    assert ModelConfig.from_hf(d) == cfg
    odd = cfg.replace(mlp_layer_types=["moe", "hash_moe"] + ["moe"] * (cfg.num_hidden_layers - 2))
    assert "num_hash_layers" not in odd.to_hf() and ModelConfig.from_hf(odd.to_hf()) == odd
