"""The chunked, fused head + cross-entropy (`qiusuo.model.head_loss`) against `F.cross_entropy` over full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from qiusuo.config import get_config
from qiusuo.model.head_loss import IGNORE_INDEX, linear_cross_entropy, tile_rows
from qiusuo.model.transformer import Transformer


def _inputs(n=37, d=24, v=101, ignore=(3, 4, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[list(ignore)] = IGNORE_INDEX
    return h, w, y


def _reference(h, w, y):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows", [1, 5, 16, 37, 1000])
def test_loss_and_gradients_equal_full_logits(rows):
    h, w, y = _inputs()
    ref_loss, ref_gh, ref_gw = _reference(h, w, y)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(h1, w1, y, rows=rows)
    (3.0 * loss).backward()  # backward scales the gradient computed in forward by the incoming one
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1.grad, 3 * ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, 3 * ref_gw, rtol=1e-5, atol=1e-6)
    assert h1.grad[[3, 4, 30]].abs().max() == 0  # ignored rows get nothing


def test_frozen_weight_and_no_grad():
    h, w, y = _inputs()
    ref_loss, ref_gh, _ = _reference(h, w, y)
    h1 = h.clone().requires_grad_()
    linear_cross_entropy(h1, w, y, rows=8).backward()
    torch.testing.assert_close(h1.grad, ref_gh, rtol=1e-5, atol=1e-6)
    assert w.grad is None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y), ref_loss, rtol=1e-6, atol=1e-6)


def test_all_ignored_is_nan_like_cross_entropy():
    h, w, _ = _inputs()
    y = torch.full((h.shape[0],), IGNORE_INDEX)
    assert math.isnan(F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX).item())
    assert math.isnan(linear_cross_entropy(h, w, y).item())


def test_bf16_autocast_matches_full_logits_under_autocast():
    """Under autocast the head's matmuls run in bf16, as autocast's full-logits path does: loss and gradients
    agree to bf16 precision, and gradients come back in the parameters' dtype (fp32)."""
    h, w, y = _inputs(n=64, d=32, v=257)
    grads = []
    for fused in (False, True):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (linear_cross_entropy(h1, w1, y, rows=16) if fused
                    else F.cross_entropy((h1 @ w1.T).float(), y, ignore_index=IGNORE_INDEX))
        loss.backward()
        grads.append((loss.detach(), h1.grad, w1.grad))
    (ref, ref_gh, ref_gw), (mine, gh, gw) = grads
    assert gh.dtype == gw.dtype == torch.float32
    assert abs(mine.item() - ref.item()) < 1e-2 * ref.item()
    torch.testing.assert_close(gh, ref_gh, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=0.05, atol=2e-3)
    h32 = _reference(h, w, y)[1]
    assert (gh - h32).abs().max() > 0  # bf16 was in fact used


def test_shape_mismatch_is_refused():
    h, w, y = _inputs()
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:-1])


def test_tile_rows_keeps_cpu_tiles_cache_sized():
    cpu = torch.device("cpu")
    assert tile_rows(8192, cpu) == 128 and tile_rows(129280, cpu) == 16 and tile_rows(512, cpu) == 2048


def test_model_loss_and_gradients_equal_the_full_logits_path():
    """The model's training loss (main head and MTP, tied head included) through the fused path equals CE over
    `model(ids)`'s logits, and so do the gradients of every parameter."""
    torch.manual_seed(0)
    cfg = get_config("tiny", tie_word_embeddings=True, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = IGNORE_INDEX
    out = model(x, labels=y, mtp_weight=0.0)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(x)
    ref = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(out.ce, ref.detach(), rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
