"""Fixtures for the inference tests: a BPE tokenizer trained on a few KB of text and a tiny model sized to it."""

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.model.transformer import Transformer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Hello world, héllo wörld, 你好 世界! ",
    "def add(a, b):\n    return a + b\n",
    "<think>reasoning goes here</think> and then the answer. ",
    "Continuous batching lets requests join and leave between steps. ",
] * 12


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=420)


@pytest.fixture(scope="session")
def model(tok):
    torch.manual_seed(0)
    return Transformer(get_config("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0)).eval()
