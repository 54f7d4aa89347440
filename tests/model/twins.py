"""A model of ours and transformers' twin with the same random weights: what the parity tests compare."""

import torch

from qiusuo.config import ModelConfig
from qiusuo.model.transformer import Transformer


@torch.no_grad()
def randomise(model: Transformer, scale: float, seed: int = 0) -> None:
    """Every tensor random (sinks, position biases, mHC bases and routing biases included, so none is inert); hash
    tables K distinct experts per token; norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("tid2eid"):
            t.copy_(torch.rand(t.shape[0], model.cfg.n_routed_experts, generator=gen).argsort(-1)[:, : t.shape[1]])
        elif name.endswith("norm.weight"):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
        else:
            t.copy_(scale * torch.randn(t.shape, generator=gen))


def twin_pair(hf_config, hf_class, scale: float) -> tuple[Transformer, torch.nn.Module]:
    """(ours, theirs): ours built from `hf_config`, randomised, and its weights loaded into `hf_class(hf_config)`."""
    ours = Transformer(ModelConfig.from_hf(hf_config.to_dict())).eval()
    randomise(ours, scale)
    theirs = hf_class(hf_config).eval()
    sd = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    return ours, theirs


@torch.no_grad()
def stepwise(model: Transformer, ids: torch.Tensor, prefill: int, max_len: int) -> torch.Tensor:
    """Logits of ids (B, T) through a contiguous cache: the first `prefill` tokens in one forward, then one token
    at a time (the cached paths a full forward is held against)."""
    from qiusuo.cache.contiguous import ContiguousCache

    cache = ContiguousCache(model.cache_specs(), ids.shape[0], max_len)
    parts = [model(ids[:, :prefill], cache=cache)]
    parts += [model(ids[:, t: t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(parts, 1)
