"""The full model: loss API, MTP, tied embeddings, a training step; and the CUDA path where a GPU exists."""

import pytest
import torch
import torch.nn.functional as F

from qiusuo.config import get_config
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.rope import RopeAt
from qiusuo.model.transformer import IGNORE_INDEX, Transformer


def test_loss_parts_and_mtp_backprop():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", num_nextn_predict_layers=2)).train()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    labels = torch.roll(x, -1, dims=1)
    out = model(x, labels=labels, mtp_weight=0.5)
    assert torch.isfinite(out.mtp) and out.mtp > 0
    logits = model(x)
    ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    assert torch.allclose(out.ce, ce, atol=1e-5)
    assert torch.allclose(out.loss, out.ce + 0.5 * out.mtp + out.balance, atol=1e-5)
    out.loss.backward()
    for k, module in enumerate(model.mtp):
        for name, p in module.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                continue  # experts a depth's tokens did not pick have no gradient
            assert p.grad is not None and p.grad.abs().sum() > 0, f"mtp.{k}.{name} got no gradient"


def test_mtp_targets_are_k_steps_ahead():
    """Depth-1 loss equals the cross entropy of the MTP head's logits against labels shifted by one."""
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 10))
    labels = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        out = model(x, labels=labels)
        h = model.hidden(x)
        rope = RopeAt(model.rotaries, torch.arange(9))
        h1 = model.mtp[0](h[:, :9], model.embed_tokens(x[:, 1:]), rope)[0]
        ref = F.cross_entropy(model.lm_head(model.mtp[0].norm(h1)).flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(out.mtp, ref, atol=1e-6)


def test_ignore_index_and_no_mtp():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", num_nextn_predict_layers=0))
    x = torch.randint(0, model.cfg.vocab_size, (1, 8))
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, 3] = 5
    out = model(x, labels=labels)
    logits = model(x)
    assert torch.allclose(out.ce, F.cross_entropy(logits[0, 3:4], torch.tensor([5])), atol=1e-5)
    assert out.mtp == 0


def test_tied_embeddings_share_storage():
    model = Transformer(get_config("tiny", tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_a_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, model.cfg.vocab_size, (4, 32))
    labels = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(5):
        out = model(x, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce.item())
    assert losses[-1] < losses[0]


def test_bf16_autocast_forward_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
def test_cuda_grouped_mm_matches_cpu_loop():
    torch.manual_seed(0)
    cfg = get_config("bench")
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    ref = model(x, labels=x).loss
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.cuda(), labels=x.cuda()).loss  # grouped_mm in bf16
    out.backward()
    assert abs(out.item() - ref.item()) < 0.05
    assert model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0


@cuda
@pytest.mark.cuda
def test_cuda_absorbed_decoding_bf16():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        full = model(x).float()
        cache = ContiguousCache(model.cache_specs(), 2, 16, device="cuda", dtype=torch.bfloat16)
        steps = torch.cat([model(x[:, t:t + 1], cache=cache) for t in range(16)], 1).float()
    assert (steps - full).abs().max() < 0.05 * full.abs().max()
