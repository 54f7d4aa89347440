"""Models and prompts the engine tests share: every tensor random, so no path is trivially zero."""

import torch

from qiusuo.model.transformer import Transformer


def perturbed(cfg, scale: float = 0.05) -> Transformer:
    """A fresh model of `cfg` (seed 0) with `scale`-sized noise on every floating tensor but the norms'
    weights: sinks, position biases and mHC bases then matter."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("norm.weight"):
                t.add_(scale * torch.randn_like(t))
    return model


def prompts(tok, lengths, seed=0) -> list[list[int]]:
    """Random prompts of the given lengths over the tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in lengths]


def abort_midway(engine, prompt: list[int], steps: int = 2) -> list:
    """Submit `prompt`, run `steps` engine steps, abort it, drain the engine; what its sink received."""
    from qiusuo.infer.sampling import SamplingParams

    got: list = []
    rid = engine.submit(prompt, SamplingParams(max_tokens=40, ignore_eos=True), got.append)
    for _ in range(steps):
        engine.step()
    engine.abort(rid)
    while engine.has_work():
        engine.step()
    return got
