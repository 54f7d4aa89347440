"""Greedy references the engine and model tests compare against, drawn so that no greedy choice is a near-tie."""

import torch


def unambiguous(model, tok, lengths, n: int, seed: int = 0, margin: float = 1e-3,
                prefix: list[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, greedy continuations): random prompts of the given lengths (after `prefix`, when given), each
    with its greedy continuation of n tokens under the forward without a cache (the slow reference: `generate`
    proposes the tokens, one full forward over them confirms each is that forward's argmax), a prompt drawn again
    until every greedy choice wins by `margin` (top-1 minus top-2 logit of the full forward). Two correct paths that round differently (batched
    or one by one, paged or contiguous, another CPU's kernels: ~1e-6 apart) then pick the same tokens; a near-tie
    (2e-7 apart, seen on an AVX2-only EPYC) would otherwise fail a correct engine on one CPU and not another."""
    g = torch.Generator().manual_seed(seed)
    ps, refs = [], []
    for length in lengths:
        for _ in range(200):
            p = (prefix or []) + torch.randint(0, tok.vocab_size, (length,), generator=g).tolist()
            ids = model.generate(torch.tensor([p]), n)  # (1, len(p) + n)
            with torch.no_grad():
                top = model(ids)[0, len(p) - 1: len(p) - 1 + n].topk(2, dim=-1)  # (n, 2)
            if (top.values[:, 0] - top.values[:, 1]).min() >= margin:
                assert top.indices[:, 0].tolist() == ids[0, len(p):].tolist(), "generate left the full forward"
                break
        else:
            raise AssertionError(f"no prompt of length {length} with greedy margins >= {margin} in 200 draws")
        ps.append(p)
        refs.append(ids[0, len(p):].tolist())
    return ps, refs
