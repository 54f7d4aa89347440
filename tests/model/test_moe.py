"""DeepSeekMoE: grouped experts and the router against naive references (per token, per expert); balancing;
compiled MoE training in one graph."""

import pytest
import torch
import torch.nn.functional as F

from qiusuo.config import get_config
from qiusuo.model import moe as moe_module
from qiusuo.model.moe import MoE, route, sequence_balance_loss, swiglu, update_balance_bias
from qiusuo.model.transformer import Transformer


def naive_route(scores, bias, cfg):
    """One token at a time, written from the papers' definitions."""
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    all_w, all_i = [], []
    for s in scores:
        choice = s + bias if cfg.topk_method == "noaux_tc" else s.clone()
        allowed = list(range(E))
        if cfg.topk_method != "greedy" and G > 1:
            size = E // G
            gscore = []
            for g in range(G):
                grp = choice[g * size:(g + 1) * size]
                gscore.append(sorted(grp.tolist(), reverse=True)[:2] if cfg.topk_method == "noaux_tc" else [grp.max().item()])
            ranked = sorted(range(G), key=lambda g: -sum(gscore[g]))[: cfg.topk_group]
            allowed = [e for e in range(E) if e // size in ranked]
        picked = sorted(allowed, key=lambda e: -choice[e].item())[:K]
        w = s[picked]
        if cfg.norm_topk_prob and K > 1:
            w = w / w.sum()
        all_w.append(w * cfg.routed_scaling_factor)
        all_i.append(picked)
    return torch.stack(all_w), torch.tensor(all_i)


@pytest.mark.parametrize("kw", [
    dict(model_type="deepseek_v3"),  # sigmoid, noaux_tc with bias
    dict(model_type="deepseek_v3", norm_topk_prob=False, routed_scaling_factor=2.5),
    dict(model_type="deepseek_v2", topk_method="greedy"),  # softmax
    dict(model_type="deepseek_v2", topk_method="group_limited_greedy", norm_topk_prob=False),
    dict(model_type="deepseek_v2", topk_method="group_limited_greedy", n_group=8, topk_group=3,
         num_experts_per_tok=3),
])
def test_router_matches_naive_reference(kw):
    torch.manual_seed(0)
    cfg = get_config("bench", **kw)
    logits = torch.randn(64, cfg.n_routed_experts)
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    bias = torch.randn(cfg.n_routed_experts) * 0.3
    w, i = route(scores, bias if cfg.topk_method == "noaux_tc" else None, cfg)
    rw, ri = naive_route(scores, bias, cfg)
    order = i.argsort(-1)
    rorder = ri.argsort(-1)
    assert torch.equal(i.gather(1, order), ri.gather(1, rorder))
    assert torch.allclose(w.gather(1, order), rw.gather(1, rorder), atol=1e-6)


def test_bias_changes_selection_not_weights():
    cfg = get_config("bench")
    scores = torch.rand(32, cfg.n_routed_experts)
    bias = torch.zeros(cfg.n_routed_experts)
    bias[3] = 10.0  # expert 3 always selected
    w, i = route(scores, bias, cfg)
    assert (i == 3).any(-1).all()
    w0 = scores.gather(1, i)
    assert torch.allclose(w, w0 / w0.sum(-1, keepdim=True) * cfg.routed_scaling_factor)


def per_token_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The slow twin of the grouped experts: every token, every chosen expert, one at a time."""
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    weights, routing = moe.gate(flat)
    idx = routing.idx
    out = []
    for n in range(flat.shape[0]):
        acc = torch.zeros(D)
        for k in range(idx.shape[1]):
            e = idx[n, k]
            g, u = (moe.experts.gate_up_proj[e] @ flat[n]).chunk(2)
            acc = acc + weights[n, k] * (moe.experts.down_proj[e] @ (F.silu(g) * u))
        out.append(acc)
    out = torch.stack(out).view(B, T, D)
    return out + moe.shared_experts(x)


@pytest.mark.parametrize("T,gathered", [(12, False), (1, False), (2, True)])  # sorted loop; the compiled path
def test_grouped_experts_match_per_token_loop_outputs_and_grads(T, gathered, monkeypatch):
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = Transformer(cfg)
    moe = model.layers[1].mlp
    assert isinstance(moe, MoE)
    if gathered:  # the path `torch.compile` takes for N*K <= E, run eagerly here
        monkeypatch.setattr(moe.experts, "forward", moe.experts._gathered)
    x = torch.randn(2, T, cfg.hidden_size, requires_grad=True)
    fast, _ = moe(x)
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight])
    slow = per_token_moe(moe, x)
    grads_slow = torch.autograd.grad(slow.pow(2).sum(), [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight])
    assert (fast - slow).abs().max() < 1e-5
    for a, b in zip(grads_fast, grads_slow):
        assert (a - b).abs().max() < 1e-5


def expert_loop(xs, counts, w_gu, w_d, limit=None):
    """The slow twin of `Experts.grouped`: the experts that received rows, one after another, each a plain
    `F.linear` pair through autograd."""
    outs = [F.linear(swiglu(*F.linear(x_e, w_gu_e).chunk(2, dim=-1), limit), w_d_e)
            for x_e, w_gu_e, w_d_e, c in zip(xs.split(counts.tolist()), w_gu.unbind(0), w_d.unbind(0), counts.tolist())
            if c]
    return torch.cat(outs) if outs else xs.new_zeros(0, w_d.shape[1])


@pytest.mark.parametrize("dims,counts", [
    ((32, 16), [5, 0, 9, 3]),  # 16-byte rows: torch._grouped_mm where this torch runs it on a CPU
    ((12, 6), [5, 0, 9, 3]),  # odd widths: the per-expert loop inside the op
    ((32, 16), [0, 0, 0, 0]),  # no rows at all
])
@pytest.mark.parametrize("limit", [None, 7.0])  # V4's SwiGLU clamp: it clips some of these hidden values
def test_fused_and_grouped_experts_match_the_expert_loop_outputs_and_grads(dims, counts, limit):
    """`expert_swiglu` (fused per expert, hand-written backward) and two `grouped_matmul`s (the adapters' path)
    against the plain loop through autograd."""
    torch.manual_seed(0)
    (D, I), counts = dims, torch.tensor(counts)
    xs = torch.randn(int(counts.sum()), D, requires_grad=True)
    w_gu = torch.randn(len(counts), 2 * I, D, requires_grad=True)
    w_d = torch.randn(len(counts), D, I, requires_grad=True)
    target = torch.randn(xs.shape[0], D)
    results = []
    for run in (lambda: moe_module.expert_swiglu(xs, counts, w_gu, w_d, limit),
                lambda: moe_module.grouped_matmul(
                    swiglu(*moe_module.grouped_matmul(xs, counts, w_gu).chunk(2, dim=-1), limit), counts, w_d),
                lambda: expert_loop(xs, counts, w_gu, w_d, limit)):
        y = run()
        loss = (y * target).sum() + 0 * sum(p.sum() for p in (xs, w_gu, w_d))  # a graph even without rows
        results.append([y, *torch.autograd.grad(loss, [xs, w_gu, w_d])])
    for fused, grouped, slow in zip(*results):
        assert fused.shape == grouped.shape == slow.shape
        assert torch.allclose(fused, slow, rtol=1e-5, atol=1e-4) and torch.allclose(grouped, slow, rtol=1e-5, atol=1e-4)
    assert results[0][2][1].abs().max() == 0  # expert 1 got no rows: no gradient


def test_compiled_moe_training_is_one_graph_and_matches_eager():
    """fullgraph=True fails on any graph break: input checks, routing, dispatch, the experts' custom op (static
    shapes) and the loads trace whole; the aot_eager backend traces forward and backward as inductor would,
    without its code generation."""
    torch.manual_seed(0)
    cfg = get_config("tiny", num_hidden_layers=2, num_nextn_predict_layers=0)  # a dense layer and a MoE layer
    model = Transformer(cfg).train()
    model.reset_parameters(0)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        out = forward(x, labels=x, mtp_weight=0.0)
        results.append([out.loss, out.load, *torch.autograd.grad(out.loss, list(model.parameters()))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_experts_that_get_no_tokens_are_fine():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    moe = Transformer(cfg).layers[1].mlp
    moe.gate.e_score_correction_bias[:] = -100.0
    moe.gate.e_score_correction_bias[:2] = 100.0  # only experts 0 and 1 get tokens
    x = torch.randn(1, 5, cfg.hidden_size)
    assert torch.allclose(moe(x)[0], per_token_moe(moe, x), atol=1e-5)


def test_bias_update_balances_a_skewed_load_and_not_in_eval():
    torch.manual_seed(0)
    cfg = get_config("tiny", num_hidden_layers=2, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    router = model.layers[1].mlp.gate
    router.e_score_correction_bias[:2] = 0.5  # skew: experts 0 and 1 picked by every token
    x = torch.randint(0, cfg.vocab_size, (8, 32))
    model.eval()
    with torch.no_grad():
        logits = model(x)  # inference: logits only, nothing counted anywhere
    assert torch.is_tensor(logits)
    assert update_balance_bias(model, None, gamma=0.01)["load"] == []  # no loads handed over: no update
    assert router.e_score_correction_bias[:2].tolist() == [0.5, 0.5]  # and no update
    model.train()
    vios = []
    for _ in range(60):
        with torch.no_grad():
            load = model(x, labels=x).load
        vios.append(update_balance_bias(model, load, gamma=0.01)["max_vio"][0])
    assert vios[0] > 2.0  # skewed at the start
    assert max(vios[-5:]) < 0.25 * vios[0]
    assert router.e_score_correction_bias[:2].max() < 0.5


def test_load_counts_each_routers_choices_in_module_order():
    """`LossOutput.load` is what balancing reads: per router (main layers, then MTP), tokens per expert."""
    torch.manual_seed(0)
    cfg = get_config("tiny", num_hidden_layers=3, num_nextn_predict_layers=1)
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    seen = []
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: seen.append(out[1].idx))
             for m in model.modules() if isinstance(m, MoE)]
    out = model(x, labels=x, mtp_weight=0.3)
    for h in hooks:
        h.remove()
    assert out.load.shape == (3, cfg.n_routed_experts)  # layers 1, 2 and the MTP block
    for row, idx in zip(out.load, seen):
        assert torch.equal(row, torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).float())
    assert out.load[-1].sum() == 2 * 11 * cfg.num_experts_per_tok  # MTP depth 1 sees T - 1 positions
    assert model(x, labels=x, mtp_weight=0.0).load[-1].sum() == 0  # MTP off: its router did not run


def test_sequence_balance_loss_is_reported_and_has_gradient():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).train()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    out = model(x, labels=x, balance_alpha=0.01)
    assert out.balance > 0
    out.loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    assert model(x, labels=x, balance_alpha=0.0).balance == 0


def test_sequence_balance_loss_formula():
    """Perfectly uniform routing gives alpha * K / E * E / K * ... = alpha (f_i = 1, sum_i P_i = 1)."""
    cfg = get_config("tiny")
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    T = E // K
    idx = torch.arange(E).view(1, T, K)  # each expert exactly once
    scores = torch.rand(1, T, E)
    assert torch.allclose(0.5 * sequence_balance_loss(scores, idx), torch.tensor(0.5))
