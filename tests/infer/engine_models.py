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


def in_threads(fn, args: list, timeout: float = 120) -> list:
    """fn(a) for every a of `args`, each in its own thread, all at once (concurrent clients) -> results in order."""
    import threading

    out: list = [None] * len(args)

    def run(i: int) -> None:
        out[i] = fn(args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


def wait_until_idle(engine) -> None:
    """Blocks are freed by the engine's thread; wait (bounded) until it has no work and holds no block."""
    import time

    for _ in range(500):
        if not engine.has_work() and engine.pool.used_blocks == 0:
            return
        time.sleep(0.01)


class HookedTokenizer:
    """`inner` with `hook(text)` run before each `encode` (a tokenizer that is slow, or broken, on some texts)."""

    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, *a, **kw):
        self.hook(text)
        return self.inner.encode(text, *a, **kw)
