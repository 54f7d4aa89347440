"""The sampling filters against their definitions, and greedy / top-k 1 sampling against argmax."""

import torch

from qiusuo.infer import SamplingParams, sample
from qiusuo.infer.sampling import filter_probs


def test_filters_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    probs, ids = filter_probs(logits, torch.tensor([1.0, 0.5, 1.0]), torch.tensor([5, 0, 0]),
                              torch.tensor([1.0, 0.6, 1.0]), torch.tensor([0.0, 0.0, 0.3]))
    kept = [set(ids[r][probs[r] > 0].tolist()) for r in range(3)]
    assert kept[0] == set(logits[0].topk(5).indices.tolist())
    p1 = torch.softmax(logits[1] / 0.5, -1)
    order = p1.argsort(descending=True)
    n = int((p1[order].cumsum(0) < 0.6).sum()) + 1  # smallest prefix reaching 0.6
    assert kept[1] == set(order[:n].tolist())
    p2 = torch.softmax(logits[2], -1)
    assert kept[2] == set((p2 >= 0.3 * p2.max()).nonzero()[:, 0].tolist())
    greedy = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert greedy.tokens == logits.argmax(-1).tolist()
    topk1 = sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 3, [torch.Generator().manual_seed(i) for i in range(3)])
    assert topk1.tokens == greedy.tokens
