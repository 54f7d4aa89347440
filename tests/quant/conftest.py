"""What the packed-model tests share: a small tokenizer and a tiny model whose weights are perturbed away from
their initialisation, so greedy decoding has no near-ties and layers differ."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.model.transformer import Transformer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 4] * 8, vocab_size=300)


@pytest.fixture(scope="module")
def perturbed(tok):
    """make(**config overrides) -> a tiny model in eval mode, seed 0, every matrix plus 0.05 N(0, 1)."""
    def make(**overrides) -> Transformer:
        torch.manual_seed(0)
        model = Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                       **overrides)).eval()
        model.reset_parameters(0)
        with torch.no_grad():
            for t in model.parameters():
                if t.dim() >= 2:
                    t.add_(0.05 * torch.randn_like(t))
        return model
    return make
