"""`qiusuo convert BASE DST --merge-lora ADAPTER`: the merged checkpoint computes what base + adapter computes (a
router trained in full included), and with `--quantize` it is the merged weights quantised once."""

import json

import pytest
import torch

import qiusuo
from qiusuo.cli import main
from qiusuo.config import get_config
from qiusuo.hf.save import save_hf
from qiusuo.lora.apply import add_lora, extra_trainable, freeze_base
from qiusuo.lora.layers import lora_layers
from qiusuo.lora.peft import save_adapter
from qiusuo.quant.apply import parse_spec, quantize_model, set_activations
from qiusuo.train.trainer import random_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base folder, a model with a random adapter (and a router trained in full) over it, and its peft folder."""
    root = tmp_path_factory.mktemp("merge")
    save_hf(random_model(get_config("tiny", num_nextn_predict_layers=0), 0), root / "base", progress=False)
    model = qiusuo.load_model(root / "base", progress=False)
    add_lora(model, rank=4, alpha=8)
    freeze_base(model, router=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model):
            for _, A, B, _ in m.pairs():
                B.copy_(torch.randn(B.shape, generator=g) * 0.05)
        for p in extra_trainable(model, router=True, norms=False).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.layers[1].mlp.gate.e_score_correction_bias.add_(0.1)  # moved by balancing while the router trained
    save_adapter(model, root / "adapter", extras=extra_trainable(model, router=True, norms=False))
    return root, model.eval()


def test_merged_checkpoint_equals_base_plus_adapter(trained):
    root, model = trained
    assert main(["convert", str(root / "base"), str(root / "merged"), "--merge-lora", str(root / "adapter"),
                 "--no-progress"]) == 0
    merged = qiusuo.load_model(root / "merged", progress=False)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)


def test_merged_and_requantised_is_the_merged_weights_quantised_once(trained):
    root, _ = trained
    assert main(["convert", str(root / "base"), str(root / "merged8"), "--merge-lora", str(root / "adapter"),
                 "--quantize", "int8", "--no-progress"]) == 0
    assert "quantization_config" in json.loads((root / "merged8" / "config.json").read_text())
    want = quantize_model(qiusuo.load_model(root / "merged", progress=False), parse_spec("int8"))
    got = qiusuo.load_model(root / "merged8", progress=False, quantize="native")
    for m in (want, got):
        set_activations(m, "fp32")
    assert torch.equal(got.layers[1].mlp.experts.gate_up_proj, want.layers[1].mlp.experts.gate_up_proj)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(got(x), want(x), rtol=1e-6, atol=1e-6)


def test_an_adapter_that_does_not_fit_is_refused_naming_the_tensor(trained, tmp_path, capsys):
    root, _ = trained
    save_hf(random_model(get_config("tiny", num_nextn_predict_layers=0, hidden_size=48), 0), tmp_path / "other",
            progress=False)
    assert main(["convert", str(tmp_path / "other"), str(tmp_path / "out"), "--merge-lora", str(root / "adapter"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tensor 'base_model.model.model.layers." in err and "another base" in err and not (tmp_path / "out").exists()
