"""Packed weights in and out of checkpoints (`qiusuo.hf.packed`, `load_model(quantize=...)`, `save_hf`): DeepSeek's
FP8 and FP4 tensors load straight into fp8 / mxfp4 layers ("native") with exactly the values the float load gives;
any checkpoint re-quantises into int4 / int8 with the same bytes as quantising the float model; int4 / int8 models
are written as compressed-tensors pack-quantized and read back bit for bit (Kimi-K2.5's experts' format); bad
compressed-tensors configs and tensors are refused with one line each."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qiusuo.cli import main as cli
from qiusuo.config import get_config
from qiusuo.hf import CheckpointError, load_model, save_hf
from qiusuo.hf.packed import unpack_int
from qiusuo.model.transformer import Transformer
from qiusuo.quant.apply import formats_of, parse_spec, quantize_model, set_activations
from qiusuo.quant.modules import QuantExperts, QuantLinear

V3 = dict(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
          n_routed_experts=4, num_experts_per_tok=2, num_nextn_predict_layers=1, tie_word_embeddings=False)
V4 = dict(vocab_size=256, num_nextn_predict_layers=0)


def model_of(preset: str, **kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(get_config(preset, **kw)).eval()
    m.reset_parameters(0)
    with torch.no_grad():  # weights of a few sizes, so every format's scales differ between rows and groups
        for name, t in m.state_dict().items():
            if t.is_floating_point() and t.dim() >= 2:
                t.mul_(1 + torch.rand(t.shape[:-1] + (1,)) * 3)
    return m


def logits(model, ids) -> torch.Tensor:
    """The model's logits with float32 activations in its packed layers (the stored weights' exact arithmetic; q8,
    the decoding default, is held to its own reference in test_formats / test_kernels)."""
    with torch.no_grad():
        return set_activations(model, "fp32")(ids)


def assert_same_arithmetic(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two models with identical weight values, one reading them packed: equal up to summation order."""
    assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_fp8_checkpoint_loads_native_into_fp8_layers_with_the_float_values(tmp_path):
    save_hf(model_of("tiny", **V3), tmp_path / "fp8", fp8=True, progress=False)
    native = load_model(tmp_path / "fp8", dtype=torch.float32, quantize="native", progress=False)
    floats = load_model(tmp_path / "fp8", dtype=torch.float32, progress=False)
    fmts = formats_of(native)
    assert fmts["experts"] == "fp8" and fmts["attention"] == "fp8" and fmts["dense"] == "fp8"
    assert fmts["head"] == "float32"  # DeepSeek keeps the head in the model dtype
    for path, m in native.named_modules():
        if isinstance(m, QuantLinear):  # the same values, read from the same bytes
            assert torch.equal(m.dequantized(), floats.get_submodule(path).weight)
    assert_same_arithmetic(logits(native, IDS), logits(floats, IDS))


def test_v4_fp8_fp4_checkpoint_loads_native_without_a_float_copy(tmp_path):
    save_hf(model_of("v4-tiny", **V4), tmp_path / "v4", fp8=True, fp4_experts=True, progress=False)
    native = load_model(tmp_path / "v4", dtype=torch.float32, quantize="native", progress=False)
    floats = load_model(tmp_path / "v4", dtype=torch.float32, progress=False)
    assert formats_of(native)["experts"] == "mxfp4" and "fp8" in formats_of(native)["attention"]
    experts = [m for m in native.modules() if isinstance(m, QuantExperts)]
    assert experts and all(m.gate_up_proj.dtype == torch.uint8 for m in experts)
    for path, m in native.named_modules():
        if isinstance(m, QuantExperts):
            gu, d = m.dequantized()
            ref = floats.get_submodule(path)
            assert torch.equal(gu, ref.gate_up_proj) and torch.equal(d, ref.down_proj)
    assert_same_arithmetic(logits(native, IDS), logits(floats, IDS))
    # saved again packed, the bytes are the file's own
    save_hf(native, tmp_path / "again", progress=False)
    a, b = load_file(tmp_path / "v4/model.safetensors"), load_file(tmp_path / "again/model.safetensors")
    for name in a:
        if ".experts." in name:
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("spec", ["int4", "int4:128", "int8", "experts=int4:64,attention=int8,head=int8"])
@pytest.mark.parametrize("source", ["float", "fp8"])
def test_requantising_on_load_equals_quantising_the_float_model(tmp_path, spec, source):
    """From a float checkpoint: the same bytes as quantising the model in memory. From an FP8 one: the same as
    quantising its dequantised values."""
    model = model_of("tiny", **V3)
    save_hf(model, tmp_path / "m", fp8=source == "fp8", progress=False)
    loaded = load_model(tmp_path / "m", dtype=torch.float32, quantize=spec, progress=False)
    ref = quantize_model(load_model(tmp_path / "m", dtype=torch.float32, progress=False), parse_spec(spec))
    sa, sb = loaded.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].dtype != torch.float32 else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype != torch.float32 else sb[k]), k


def test_convert_quantize_writes_compressed_tensors_that_load_back_bit_for_bit(tmp_path):
    model = model_of("tiny", **V3)
    save_hf(model, tmp_path / "src", progress=False)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "q"), "--quantize", "experts=int4,shared=int8",
                "--group", "64", "--no-progress"]) == 0
    config = json.loads((tmp_path / "q/config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    groups = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in qc["config_groups"].values()}
    assert groups == {(4, 64), (8, None)}
    t = load_file(tmp_path / "q/model.safetensors")
    packed = t["model.layers.1.mlp.experts.2.up_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (128, 128 * 4 // 32)
    assert t["model.layers.1.mlp.experts.2.up_proj.weight_scale"].shape == (128, 2)
    assert t["model.layers.1.mlp.experts.2.up_proj.weight_shape"].tolist() == [128, 128]
    # compressed-tensors' own unpacking (value i of a word at bits 4i, stored as q + 8), done plainly here
    words = packed.view(torch.int32)
    plain = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], -1).view(128, 128) - 8
    assert torch.equal(unpack_int(packed, 4).long(), plain.long())
    back = load_model(tmp_path / "q", dtype=torch.float32, quantize="native", progress=False)
    assert formats_of(back)["experts"] == "int4:64" and formats_of(back)["shared"] == "int8"
    direct = quantize_model(model_of("tiny", **V3), parse_spec("experts=int4:64,shared=int8"))
    sa, sb = back.state_dict(), direct.state_dict()
    for k in sb:
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].dtype != torch.float32 else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype != torch.float32 else sb[k]), k
    floats = load_model(tmp_path / "q", dtype=torch.float32, progress=False)  # dequantised on load
    assert_same_arithmetic(logits(back, IDS), logits(floats, IDS))


def _ct_folder(tmp_path, **weights_cfg):
    model = model_of("tiny", **V3)
    save_hf(model, tmp_path / "src", progress=False)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "q"), "--quantize", "experts=int4",
                "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "q/config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["weights"].update(weights_cfg)
    (tmp_path / "q/config.json").write_text(json.dumps(cfg))
    return tmp_path / "q"


@pytest.mark.parametrize("change, message", [
    ({"symmetric": False}, "symmetric not supported"),
    ({"num_bits": 2}, "num_bits not supported"),
    ({"type": "float"}, "type not supported"),
])
def test_unsupported_compressed_tensors_configs_are_refused(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(_ct_folder(tmp_path, **change), progress=False)


def test_bad_compressed_tensors_tensors_are_refused(tmp_path):
    folder = _ct_folder(tmp_path)
    t = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_scale"
    good = t[name]
    t[name] = good[:, :3].contiguous()  # groups of 128/3 inputs
    save_file(t, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="weight_scale has shape"):
        load_model(folder, progress=False)
    t[name] = good
    t["model.layers.1.mlp.experts.0.gate_proj.weight_zero_point"] = torch.zeros(128, 4, dtype=torch.int32)
    save_file(t, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="asymmetric"):
        load_model(folder, progress=False)


def test_mixing_fp8_and_int_layers_cannot_be_saved_as_one_checkpoint(tmp_path):
    model = quantize_model(model_of("tiny", **V3), parse_spec("experts=int4,attention=fp8"))
    with pytest.raises(ValueError, match="cannot be written as one checkpoint"):
        save_hf(model, tmp_path / "x", progress=False)
