"""Tokenizer: exact round trip, determinism, specials, chat template, Hugging Face folders both ways."""

import json

import pytest

from qiusuo.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

TRICKY = [
    "",
    "plain ascii",
    "  leading and trailing  ",
    "tabs\t\tand\tmore\t",
    "windows\r\nlines\r\n\r\n",
    "\n\n\n   \n",
    "naïve café — “quotes” ½",
    "中文字符和日本語のテキスト",
    "emoji 🎉👩‍👩‍👧 flags 🇯🇵",
    "def f(x):\n    return x  # comment\n\n\tpass\n",
    "zero\u200bwidth and \u00a0nbsp and \ufeffbom",
    "special-looking <|end|> <think>text</think>",
]

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Thing:\n    def __init__(self):\n        self.x = 1\n",
    "print('hello world')\n" * 3,
    "import os\nimport sys\n\nfor i in range(10):\n\tprint(i)\n",
    "文本 and text, 世界 world\r\n",
] * 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, parse_special=False)) == text


def test_special_tokens(tok):
    assert [tok.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS] == list(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert tok.special_ids == set(range(len(DEFAULT_SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert 265 < tok.vocab_size <= 400  # a tiny corpus runs out of pairs to merge before 400
    ids = tok.encode("a<|end|>b")
    assert tok.token_to_id("<|end|>") in ids
    assert tok.token_to_id("<|end|>") not in tok.encode("a<|end|>b", parse_special=False)
    assert tok.encode("x", add_bos=True)[0] == tok.bos_id
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_vocab_too_small():
    with pytest.raises(ValueError, match=r"at least 265"):
        Tokenizer.train(CORPUS, vocab_size=264)


def test_training_is_deterministic(tok):
    again = Tokenizer.train(CORPUS, vocab_size=400)
    assert again.to_json() == tok.to_json() and again.sha256 == tok.sha256


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>"
    assert tok.apply_chat_template(messages[:2]).endswith("<|user|>Hi<|end|><|assistant|>")
    with pytest.raises(Exception, match="unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_save_and_from_dir(tok, tmp_path):
    tok.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    assert back.to_json() == tok.to_json()
    assert (back.bos_id, back.eos_id, back.pad_id, back.special_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.special_ids)
    assert back.apply_chat_template([{"role": "user", "content": "q"}]) == "<|user|>q<|end|><|assistant|>"


def test_from_dir_hf_style_config(tok, tmp_path):
    """Dict-form special tokens, added_tokens_decoder and a template using bos_token and raise_exception, as
    in DeepSeek's hub folders."""
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('bad role') }}{% endif %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    config = {
        "bos_token": {"content": "<|begin_of_text|>", "special": True},
        "eos_token": "<|end|>",
        "added_tokens_decoder": {"7": {"content": "<think>", "special": True}},
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_dir(tmp_path)
    assert t.bos_id == 0 and t.eos_id == tok.token_to_id("<|end|>") and t.pad_id == t.eos_id
    assert 7 in t.special_ids
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>user: hi<|end|>"
    with pytest.raises(Exception, match="bad role"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_transformers_loads_saved_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TRICKY:
        assert hf(text, add_special_tokens=True)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.bos_id and hf.pad_token_id == tok.pad_id
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == tok.apply_chat_template(messages, add_generation_prompt=False)
