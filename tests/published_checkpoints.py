"""Helpers the tests of published checkpoints share (tests/ is on sys.path through tests/conftest.py): the fixture
folders (tests/fixtures/*, each with its PROVENANCE.md), a DeepSeek-style tokenizer.json (its role, think and tool
markers non-special added tokens, as DeepSeek ships them) and a synthetic `tiktoken.model` of Moonshot's format and
size, for the files no public mirror here holds."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

DS_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
# DeepSeek-V3/R1's control markers that tokenizer.json stores with "special": false
DS_MARKERS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
              "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
              "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
CORPUS = ["The quick brown fox jumps over the lazy dog. ", "get_weather city Paris sunny rainy degrees ",
          '{"city": "Paris"} {"weather": "sunny"} It is sunny in Paris. ', "Hello world, 你好 世界 def f(x): return x\n",
          "```json\n{}\n``` function tools call ## Tools Description Parameters "] * 20


def deepseek_style_folder(path: Path, chat_template: str | None = None) -> Path:
    """A tokenizer folder in DeepSeek's layout: a byte-level BPE tokenizer.json whose BOS/EOS are special added tokens
    and whose role/think/tool markers are non-special ones, with DeepSeek-V3's real tokenizer_config.json
    (add_bos_token, the special tokens as dicts, its chat template, or `chat_template` instead)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=DS_SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in DS_MARKERS])
    path.mkdir(parents=True, exist_ok=True)
    hf.save(str(path / "tokenizer.json"))
    config = json.loads((FIXTURES / "deepseek-v3" / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def synthetic_tiktoken_model(path: Path, ranks: int = 163_584) -> Path:
    """A `tiktoken.model` of Moonshot's format (`base64(bytes) rank` per line) with as many ranks as Kimi-K2's and
    Moonlight's (163,584, so their tokenizer_config.json ids 163584.. are the special ids): the 256 bytes, then
    deterministic 2- and 3-byte tokens of the BPE alphabet's printable part."""
    printable = [bytes([b]) for b in range(32, 127)]
    tokens = [bytes([b]) for b in range(256)]
    for n in (2, 3):
        for combo in itertools.product(printable, repeat=n):
            if len(tokens) == ranks:
                break
            tokens.append(b"".join(combo))
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens[:ranks])))
    return path


def kimi_folder(path: Path, config: str = "kimi-k2") -> Path:
    """A config-and-tokenizer folder of a Moonshot checkpoint: the fixture's files plus a synthetic tiktoken.model."""
    path.mkdir(parents=True, exist_ok=True)
    for f in (FIXTURES / config).glob("*.json"):
        shutil.copy(f, path / f.name)
    for f in ("tokenizer_config.json", "generation_config.json"):
        if not (path / f).exists():
            shutil.copy(FIXTURES / "kimi-k2" / f, path / f)
    synthetic_tiktoken_model(path / "tiktoken.model")
    return path
