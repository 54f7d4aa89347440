"""Muon (qiusuo.train.muon): the batched Newton-Schulz on 3D expert weights is torch's per expert, one step is the
hand-written update, parameters go to the right optimizer, and the combined state round-trips."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

from qiusuo.config import get_config
from qiusuo.model.moe import Experts
from qiusuo.model.transformer import Transformer
from qiusuo.train.config import OptimSection
from qiusuo.train.muon import (NS_COEFFICIENTS, ExpertMuon, MuonAdamW, orthogonalise, split_params,
                               zeropower_batched)
from qiusuo.train.optim import build_optimizer


@pytest.mark.parametrize("shape", [(8, 64, 32), (8, 32, 64), (4, 48, 48), (1, 5, 3)])
def test_batched_newton_schulz_equals_torch_per_expert(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    loop = torch.stack([_zeropower_via_newtonschulz(x, NS_COEFFICIENTS, 5, 1e-7) for x in g])
    assert torch.equal(zeropower_batched(g), loop)  # bit for bit


def test_one_call_per_shape_equals_each_stack_alone():
    """`orthogonalise` batches stacks of one shape, tall and wide alike (a (64, 32) stack is orthogonalised as
    its (32, 64) transpose): the same values as `zeropower_batched` on each stack, in fp32 and bf16."""
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(s, generator=gen) for s in ((8, 64, 32), (1, 32, 64), (3, 64, 32), (2, 48, 48), (1, 5, 3))]
    for dtype in (torch.float32, torch.bfloat16):
        got = orthogonalise(mats, ns_steps=4, dtype=dtype)
        for m, x in zip(mats, got):
            assert x.shape == m.shape
            torch.testing.assert_close(x, zeropower_batched(m, ns_steps=4, dtype=dtype), rtol=0,
                                       atol=1e-6 if dtype == torch.float32 else 0)


def test_row_blocks_orthogonalise_each_block_alone():
    """A (E, 2I, D) weight with `row_blocks` 2 steps as its 2E (I, D) matrices would one by one: separate
    orthogonalisation and Moonlight's lr match on (I, D)."""
    gen = torch.Generator().manual_seed(4)
    w, grads = torch.randn(3, 2 * 16, 24, generator=gen), [torch.randn(3, 2 * 16, 24, generator=gen) for _ in range(2)]
    fused = nn.Parameter(w.clone())
    parts = nn.Parameter(w.view(6, 16, 24).clone())  # expert 0's gate, expert 0's up, expert 1's gate, ...
    a = ExpertMuon([fused], lr=0.02, weight_decay=0.1, dtype=torch.float32, row_blocks={fused: 2})
    b = ExpertMuon([parts], lr=0.02, weight_decay=0.1, dtype=torch.float32)
    for g in grads:
        fused.grad, parts.grad = g.clone(), g.view(6, 16, 24).clone()
        a.step()
        b.step()
    torch.testing.assert_close(fused.detach().view(6, 16, 24), parts.detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot stack 5"):
        ExpertMuon([fused], row_blocks={fused: 5})


def test_expert_muon_on_one_matrix_equals_torch_muon():
    gen = torch.Generator().manual_seed(1)
    w, grads = torch.randn(24, 40, generator=gen), [torch.randn(24, 40, generator=gen) for _ in range(3)]
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone()[None])
    ref = torch.optim.Muon([a], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = ExpertMuon([b], lr=0.02, weight_decay=0.1)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()[None]
        ref.step()
        ours.step()
    assert torch.equal(a.detach(), b.detach()[0])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = get_config("tiny")
        self.embed_tokens = nn.Embedding(16, cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, 48, bias=True)
        self.experts = Experts(cfg)
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, 16, bias=False)


def reference_ns(m: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz, written out for one matrix: in `dtype` (torch's: bf16),
    Frobenius-normalised, the wide orientation, x <- a x + (b A + c A^2) x with A = x x^T (fused multiply-adds, as
    torch associates them)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.to(dtype)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(5):
        A = x @ x.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        x = torch.addmm(x, B, x, beta=a)  # a x + B x
    return (x.T if tall else x).float()


@pytest.mark.parametrize("ns", ["bf16", "fp32"])
def test_one_muon_step_equals_the_hand_computation(ns):
    """bf16: torch's Muon for the matrices (and our batched experts, the same rounding); fp32 (`optim.ns_dtype`,
    the CPU default): the same update with the iteration in fp32, to fp32 accuracy."""
    torch.manual_seed(0)
    model = Tiny()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
        p.grad = torch.randn_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    lr, wd, mu, eps = 0.01, 0.1, 0.95, 1e-8
    opt = build_optimizer(model, OptimSection(name="muon", lr=lr, weight_decay=wd, momentum=mu, eps=eps, ns_dtype=ns))
    assert isinstance(opt, MuonAdamW)
    assert isinstance(opt.parts[0], torch.optim.Muon if ns == "bf16" else ExpertMuon)
    dtype = torch.bfloat16 if ns == "bf16" else torch.float32
    opt.step()
    for n, p in model.named_parameters():
        w, g = before[n], grads[n]
        if n in ("proj.weight", "experts.gate_up_proj", "experts.down_proj"):  # Muon
            nesterov = g + mu * ((1 - mu) * g - g)  # buffer (1 - mu) g after one step; g.lerp(buffer, mu)
            mats = nesterov if nesterov.dim() == 3 else nesterov[None]
            if n == "experts.gate_up_proj":  # each expert's gate and up: two matrices
                mats = mats.reshape(-1, mats.size(1) // 2, mats.size(2))  # (2E, I, D): gate rows, then up rows
            ortho = torch.stack([reference_ns(m, dtype) for m in mats]).view_as(w)
            adjusted = lr * 0.2 * math.sqrt(max(mats.shape[-2:]))  # Moonlight's RMS match, per matrix
            want = w * (1 - lr * wd) - adjusted * ortho
            # the momentum here rounds differently from torch's lerp in the last fp32 bit, which can flip a bf16
            # rounding inside Newton-Schulz: agreement to a few bf16 ulps of the update
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=(2e-2 if ns == "bf16" else 1e-5) * adjusted)
            continue
        # AdamW after one step: m_hat = g, v_hat = g^2
        decay = wd if n == "lm_head.weight" else 0.0  # embeddings, norms and biases do not decay
        want = w * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)


def test_parameters_go_to_muon_expert_muon_or_adamw():
    model = Transformer(get_config("v4-tiny"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, expert, adamw = ({names[id(p)] for p in ps} for ps in split_params(model))
    assert "layers.0.self_attn.q_a_proj.weight" in muon and "layers.0.mlp.shared_experts.down_proj.weight" in muon
    assert "layers.1.self_attn.compressor.kv_proj.weight" in muon  # V4's compressor/indexer: hidden matrices
    assert all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in expert) and expert
    for n in ("embed_tokens.weight", "lm_head.weight", "layers.0.mlp.gate.weight", "layers.0.attn_hc.fn",
              "layers.0.attn_hc.base", "hc_head.hc_fn", "layers.0.self_attn.sinks", "norm.weight",
              "layers.1.self_attn.compressor.position_bias"):
        assert n in adamw, n
    assert len(muon) + len(expert) + len(adamw) == len(names)


def test_combined_state_dict_resumes_exactly_and_numbers_params_in_group_order():
    torch.manual_seed(0)
    make = lambda: Transformer(get_config("tiny"))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 512, (2, 12))

    def step(model, opt):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    cfg = OptimSection(name="muon", lr=1e-2)
    opt_a = build_optimizer(a, cfg)
    for _ in range(2):
        step(a, opt_a)
    sd = opt_a.state_dict()
    params = [p for g in opt_a.param_groups for p in g["params"]]
    assert sorted(sd["state"]) == [i for i, p in enumerate(params) if p in opt_a.state]
    assert [i for g in sd["param_groups"] for i in g["params"]] == list(range(len(params)))
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg)
    opt_b.load_state_dict(copy.deepcopy(sd))  # as from disk: state tensors not shared with opt_a
    step(a, opt_a)
    step(b, opt_b)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    with pytest.raises(ValueError, match="optim.name"):  # an AdamW checkpoint into a Muon run
        opt_b.load_state_dict(build_optimizer(make(), OptimSection()).state_dict())
