"""FP4 quantisation-aware training (qiusuo.train.qat): the fake quantisation is the export format's
quantise-dequantise bit for bit, gradients pass straight through, and only the routed experts' forward changes."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.quant.fp4 import dequantize_fp4, quantize_fp4
from qiusuo.model.moe import Experts
from qiusuo.train.qat import fake_fp4, fake_fp4_values, set_fp4_qat


def weights(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-30, 4, shape[-2], base=2)[:, None]  # scales 2^-30..2^4
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = -0.0
    w[2, :32] = torch.tensor([6.0, 3.5, 1.25, -0.25, 5.0, 2.5, 0.75, -1.75] * 4)  # ties and boundaries
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_fp4_is_quantise_dequantise_of_the_export_bit_for_bit(dtype):
    w = weights(96, 128).to(dtype)
    want = dequantize_fp4(*quantize_fp4(w), dtype=dtype)
    got = fake_fp4_values(w)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # signs of zeros too
    stacked = torch.stack([weights(64, 64, seed=s) for s in range(3)])  # (E, R, C): per expert, per row
    assert torch.equal(fake_fp4_values(stacked), torch.stack([dequantize_fp4(*quantize_fp4(x)) for x in stacked]))


def test_gradients_pass_straight_through():
    w = weights(8, 64).requires_grad_()
    c = torch.randn(8, 64)
    (fake_fp4(w) * c).sum().backward()
    assert torch.equal(w.grad, c)


def test_qat_changes_only_the_expert_weights_read_in_the_forward():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(20, cfg.hidden_size)
    idx = torch.randint(0, cfg.n_routed_experts, (20, cfg.num_experts_per_tok))
    wts = torch.rand(20, cfg.num_experts_per_tok)
    plain = experts(x, wts, idx)
    assert set_fp4_qat(experts, True) == 1
    quant = experts(x, wts, idx)
    ref = Experts(cfg)
    with torch.no_grad():
        for a, b in zip(ref.parameters(), experts.parameters()):
            a.copy_(torch.stack([dequantize_fp4(*quantize_fp4(m)) for m in b]))
    assert torch.equal(quant, ref(x, wts, idx)) and not torch.equal(quant, plain)
    set_fp4_qat(experts, False)
    assert torch.equal(experts(x, wts, idx), plain)
