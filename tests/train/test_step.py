"""The one optimizer step (`TrainStep`) that pretraining, SFT, GRPO and the training benchmark share: gradient
accumulation equals one big batch, balancing reads the loads the forwards returned (summed over micro-batches),
and a non-finite loss leaves the weights untouched."""

import copy

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.model.moe import moe_routers
from qiusuo.model.transformer import Transformer
from qiusuo.train.step import TrainingDiverged, TrainStep


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Transformer(get_config("tiny", num_nextn_predict_layers=0))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _loss(model):
    return lambda b: model(b, labels=b, mtp_weight=0.0)


def test_two_micro_batches_equal_one_batch_of_both():
    """(SGD: Adam would turn fp32 rounding in near-zero gradients into sign-sized update differences.)"""
    a, _ = _setup()
    b = copy.deepcopy(a)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x = torch.randint(0, a.cfg.vocab_size, (4, 16))
    ma = TrainStep(a, opt_a, grad_clip=1.0, gamma=1e-3)([x[:2], x[2:]], _loss(a), lr=1e-3)
    mb = TrainStep(b, opt_b, grad_clip=1.0, gamma=1e-3)([x], _loss(b), lr=1e-3)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)
    assert ma["load"] == mb["load"]  # the balancing update saw the loads of both micro-batches
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-7), n
    for ra, rb in zip(moe_routers(a), moe_routers(b)):
        assert torch.equal(ra.e_score_correction_bias, rb.e_score_correction_bias)
        assert ra.e_score_correction_bias.abs().sum() > 0  # and it did move


def test_bias_moves_only_with_gamma_and_loads():
    model, opt = _setup()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    TrainStep(model, opt, gamma=0.0)([x], _loss(model), lr=1e-3)  # RL's setting: the bias stays
    assert all(r.e_score_correction_bias.abs().sum() == 0 for r in moe_routers(model))


def test_non_finite_loss_applies_nothing_and_says_why():
    model, opt = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))

    def bad(b):
        out = model(b, labels=b, mtp_weight=0.0)
        out.loss = out.loss * float("inf")
        return out

    step = TrainStep(model, opt, on_diverged=lambda: "; lower the lr")
    with pytest.raises(TrainingDiverged, match="loss is (inf|nan) at step 1; .*nothing from that step was applied; lower the lr"):
        step([x], bad, lr=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert step.steps == 0 and not opt.state
