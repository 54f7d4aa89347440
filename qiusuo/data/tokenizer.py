"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, and the project's public tokenizer object.

Why byte-level BPE with these settings:
- Every string is representable (256 byte symbols are in the initial alphabet), so there is no unknown token.
- `ByteLevel(add_prefix_space=False, use_regex=True)` + the ByteLevel decoder round-trips exactly:
  `decode(encode(s)) == s` for any text, including CJK, emoji, tabs, `\\r\\n` and runs of spaces. No normalizer
  and no post-processor, so nothing is added or stripped (a post-processor would only move offsets, never ids).
- The same `tokenizer.json` loads in `transformers` (`tokenizer_class: PreTrainedTokenizerFast`), which gives
  the same ids because there is no post-processor template to disagree about.

`Tokenizer` also reads any Hugging Face tokenizer folder (e.g. DeepSeek-V3's), with its chat template rendered
the way `transformers` does: a sandboxed Jinja environment with `trim_blocks`/`lstrip_blocks`, `loopcontrols`,
`raise_exception`, `strftime_now` and the special tokens as variables.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from qiusuo.io import write_atomic

DEFAULT_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
)

# Our chat format: one role token, the content, <|end|>. No BOS: pretraining documents are only separated by
# <|end_of_text|>, so a BOS at the start of a chat would be a token the base model never saw.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>"
    "{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as `{"content": ...}` dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A Hugging Face fast tokenizer plus the special tokens and chat template around it.

    Build one with `Tokenizer.train(texts, vocab_size)` or `Tokenizer.from_dir(path)`.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_special_tokens: Iterable[str] = (),
    ):
        self._hf = hf
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        specials |= {t for t in (bos_token, eos_token, pad_token, *extra_special_tokens) if t}
        self.special_ids = {i for i in (hf.token_to_id(t) for t in specials) if i is not None}
        self._template = None  # compiled on first use: most users never render a chat
        self._plain = None  # built on first use by _plain_hf

    # ---- construction ----

    @classmethod
    def train(
        cls,
        texts: Sequence[str],
        vocab_size: int,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Train byte-level BPE on `texts`. Deterministic: the caller passes texts in a fixed order and the
        trainer breaks count ties by the pair itself (checked by the tests: same input -> identical json).
        A small corpus may run out of pairs seen `min_frequency` times, so `vocab_size` is an upper bound:
        size the model from `tokenizer.vocab_size`, not from the request."""
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte symbols and {len(special_tokens)} special tokens need at least {minimum}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer, length=len(texts))
        names = set(special_tokens)
        pick = lambda t: t if t in names else None  # noqa: E731
        return cls(
            hf,
            bos_token=pick("<|begin_of_text|>"),
            eos_token=pick("<|end_of_text|>"),
            pad_token=pick("<|pad|>"),
            chat_template=CHAT_TEMPLATE if {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= names else None,
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a Hugging Face tokenizer folder: `tokenizer.json`, and optionally `tokenizer_config.json` and
        `chat_template.jinja` (where transformers >= 4.47 saves the template)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found; a tokenizer folder needs a tokenizer.json (fast tokenizer)")
        hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # older form: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        decoder = config.get("added_tokens_decoder", {})
        bos, eos, pad = (_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        vocab = hf.get_vocab()
        if not config:  # a bare tokenizer.json: fall back to our own names where present
            bos = "<|begin_of_text|>" if "<|begin_of_text|>" in vocab else None
            eos = "<|end_of_text|>" if "<|end_of_text|>" in vocab else None
            pad = "<|pad|>" if "<|pad|>" in vocab else None
        return cls(
            hf,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            chat_template=template,
            extra_special_tokens=[t["content"] for t in decoder.values() if t.get("special")],
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` that both `from_dir` and
        `transformers.AutoTokenizer.from_pretrained` load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / "tokenizer.json", self.to_json().encode("utf-8"))
        added = self._hf.get_added_tokens_decoder()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(added.items())
            },
            "chat_template": self.chat_template,
        }
        write_atomic(path / "tokenizer_config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def to_json(self) -> str:
        return self._hf.to_str(pretty=True)

    @property
    def sha256(self) -> str:
        """Identifies the tokenizer in shard manifests, so shards are never read with the wrong vocabulary."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    # ---- ids ----

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)

    @property
    def bos_id(self) -> int | None:
        return self._hf.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self._hf.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        """The pad token, else EOS (padding positions are masked anyway)."""
        return self._hf.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    # ---- text ----

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids. `parse_special=False` treats text like `<|end|>` as plain characters: corpus text must
        not be able to inject control tokens into training data."""
        return self.encode_batch([text], add_bos=add_bos, parse_special=parse_special)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, parse_special: bool = True) -> list[list[int]]:
        """Many texts at once; `tokenizers` spreads the batch over threads (~N cores faster than a loop)."""
        hf = self._hf if parse_special else self._plain_hf()
        encodings = hf.encode_batch_fast(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [prefix + e.ids for e in encodings]

    def _plain_hf(self) -> HFTokenizer:
        """A copy that encodes special-token text as ordinary characters. A copy rather than toggling
        `encode_special_tokens` on the shared object, so concurrent callers (the server) never race."""
        if self._plain is None:
            self._plain = HFTokenizer.from_str(self.to_json())
            self._plain.encode_special_tokens = True
        return self._plain

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat rendered to a string (encode it with `encode`, which turns the markers into special ids)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; add one to tokenizer_config.json")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )


def _compile_template(source: str):
    """Jinja as transformers sets it up, so hub templates (DeepSeek's included) render identically."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
