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
`raise_exception`, `strftime_now` and the special tokens as variables. `TiktokenTokenizer` reads the folders Moonshot
ships for Kimi-K2 and Moonlight (`tiktoken.model`, no tokenizer.json) behind the same interface (`ChatTokenizer`).

A folder with no chat template whose config.json is DeepSeek-V3.2 or V4 (families whose model repositories ship
Python encoders instead: `qiusuo.families` row `chat`) renders chats with `qiusuo.data.deepseek_encoding`, behind the
same `apply_chat_template` / `encode_chat`.

Control tokens (every special token, and the added tokens written as tags, `<...>` or `[...]`, which DeepSeek stores as
*non-special* added tokens: `<｜User｜>`, `<think>`, the tool-call markers) are never produced from text a caller
marks as plain (`parse_special=False`), and `encode_chat` treats every string inside the messages that way: only the
template's own markers become control ids. `decode(skip_special_tokens=True)` drops every control token.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from qiusuo.families import FAMILIES
from qiusuo.io import write_atomic

log = logging.getLogger("qiusuo.tokenizer")

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


_TAG = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")  # an added token written as a tag is a control marker


def _read_config(path: Path) -> dict:
    """tokenizer_config.json (or {}), its chat template taken from chat_template.jinja when present (where
    transformers >= 4.47 saves it) and from the older list form ([{"name": "default", "template": ...}])."""
    config = {}
    if (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return {**config, "chat_template": template}


def _family_encoding(path: Path) -> str | None:
    """The chat encoding the model family in the folder's config.json prescribes when it ships no chat template
    (DeepSeek-V3.2, V4: `qiusuo.families`), or None (no config.json, another family, unreadable)."""
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return fam.chat if fam else None


class Trusted(str):
    """A string whose control-token text is meant (markup a caller writes, such as a tool block for the system
    prompt), assembled from `parts`, (text, trusted) pairs: `encode_chat` keeps the markers of the trusted parts and
    treats the others as user text."""

    def __new__(cls, parts: Sequence[tuple[str, bool]]):
        s = super().__new__(cls, "".join(p for p, _ in parts))
        s.parts = tuple(parts)
        return s


def _map_strings(x: Any, fn) -> Any:
    """`x` with `fn` applied to every string inside it (dict values and list items, recursively)."""
    if isinstance(x, str):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_strings(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_map_strings(v, fn) for v in x]
    return x


class ChatTokenizer:
    """What the engine, the server and the commands need of a tokenizer, whatever its backend (`Tokenizer`: Hugging
    Face `tokenizers`; `TiktokenTokenizer`): ids, text, the chat template rendered as transformers renders it, the
    control tokens text from users must never produce, and the ids that end a reply. Backends implement
    `encode_batch`, `_decode`, `vocab_size`, `token_to_id`, `id_to_token`, `save`.

    control: text -> id of every control token (module docstring). add_bos_token: tokenizer_config.json's flag, the
    default of `encode(add_bos=None)`, as transformers' `tokenizer(text)` adds BOS for DeepSeek's folders."""

    def __init__(self, *, bos_token=None, eos_token=None, pad_token=None, chat_template=None,
                 control: dict[str, int] | None = None, special_ids: Iterable[int] = (), add_bos_token: bool = False,
                 chat_encoding: str | None = None):
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        # DeepSeek's Python encoding (`deepseek_encoding.ENCODINGS`) for a folder that ships no template
        self.chat_encoding = chat_encoding if chat_template is None else None
        self.add_bos_token = bool(add_bos_token)
        self.special_ids = set(special_ids)
        self.control = dict(control or {})
        self.control_ids = frozenset(self.control.values()) | self.special_ids
        by_length = sorted(self.control, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._template = None  # compiled on first use: most users never render a chat

    @property
    def has_chat_format(self) -> bool:
        """Whether chats can be rendered: a chat template, or DeepSeek's encoding for its V3.2 / V4 folders."""
        return self.chat_template is not None or self.chat_encoding is not None

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        """The pad token, else EOS (padding positions are masked anyway)."""
        return self.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids. `parse_special=False` treats control-token text (`<|end|>`, `<｜User｜>`, `<think>`) as plain
        characters: corpus and user text must not be able to inject control tokens. add_bos: None follows
        tokenizer_config.json's `add_bos_token` (transformers' `tokenizer(text)`)."""
        return self.encode_batch([text], add_bos=add_bos, parse_special=parse_special)[0]

    def _bos(self, add_bos: bool | None) -> list[int]:
        add = self.add_bos_token if add_bos is None else add_bos
        return [self.bos_id] if add and self.bos_id is not None else []

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.control_ids]
        return self._decode(ids)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat rendered to a string, as transformers' `apply_chat_template(tokenize=False)` renders it, except
        that `add_generation_prompt` defaults to True (every caller here renders a prompt to reply to; transformers
        defaults to False). kwargs become template variables (`tools`, `thinking`, ...) and may override
        `bos_token`/`eos_token`/`pad_token`. Encoding the string parses every marker in it, the messages' included:
        to feed text from users to a model, use `encode_chat`.

        With DeepSeek's encoding instead of a template (`chat_encoding`): kwargs `tools`, `thinking` (or
        `enable_thinking`: the reply opens in thinking mode, else chat mode) and `reasoning_effort` ("high", "max";
        other values mean the default, as vLLM treats them) are read, and a user turn always ends by opening the
        assistant's reply, as DeepSeek's encoder writes it (`add_generation_prompt` does not apply)."""
        if self.chat_template is None and self.chat_encoding is not None:
            from qiusuo.data.deepseek_encoding import encode

            effort = kwargs.get("reasoning_effort")  # DeepSeek's encoder knows "high" and "max"; others: default
            return encode(self.chat_encoding, list(messages), tools=kwargs.get("tools"),
                          thinking=bool(kwargs.get("thinking") or kwargs.get("enable_thinking")),
                          reasoning_effort=effort if effort in ("high", "max") else None)
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; add one to tokenizer_config.json")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", **kwargs}
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, tools: list | None = None,
                    **kwargs) -> list[int]:
        """Ids of the rendered chat in which only the template's own markers are control tokens: every control-token
        text inside the messages and tools (user text, tool arguments and results) is swapped for a placeholder
        before rendering and encoded as plain characters where the placeholder lands. So a user who types
        `<｜Assistant｜>` cannot forge a turn, whether or not the tokenizer marks that token special (`Trusted`
        strings keep the markers of their trusted parts). No BOS is added (templates write their own, as
        transformers' `apply_chat_template(tokenize=True)`)."""
        nonce, hidden = secrets.token_hex(4), []

        def hide(s: str) -> str:
            def one(m):
                hidden.append(m.group(0))
                return f"\ue000{nonce}:{len(hidden) - 1}\ue001"
            if isinstance(s, Trusted):
                return "".join(p if trusted else hide(p) for p, trusted in s.parts)
            return self._control_re.sub(one, s) if self._control_re else s

        if tools is not None:
            kwargs["tools"] = _map_strings(tools, hide)
        text = self.apply_chat_template(_map_strings(list(messages), hide), add_generation_prompt, **kwargs)
        ids: list[int] = []
        for i, piece in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", text)):
            if i % 2:
                ids += self.encode(hidden[int(piece)], add_bos=False, parse_special=False)
            elif piece:
                ids += self.encode(piece, add_bos=False, parse_special=True)
        return ids

    @functools.cached_property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a reply: EOS, and the control token the chat template writes right after an assistant
        message's text (DeepSeek's `<｜end▁of▁sentence｜>`, Kimi's `<|im_end|>`, our `<|end|>`), found by rendering a
        probe conversation rather than from a fixed list of names."""
        ids = {self.eos_id} - {None}
        if self.has_chat_format and self._control_re:
            probe = f"\ue000{secrets.token_hex(4)}\ue001"
            try:
                text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": probe}], add_generation_prompt=False)
            except Exception as e:  # a template that needs more than a plain exchange: EOS alone
                log.info("chat template did not render a probe turn (%s); stopping on EOS only", e)
                text = ""
            after = text.partition(probe)[2].lstrip()
            m = self._control_re.match(after)
            if probe in text and m:
                ids.add(self.control[m.group(0)])
        return frozenset(ids)


class Tokenizer(ChatTokenizer):
    """A Hugging Face fast tokenizer plus the special tokens and chat template around it.

    Build one with `Tokenizer.train(texts, vocab_size)` or `Tokenizer.from_dir(path)` (which returns a
    `TiktokenTokenizer` for a folder with `tiktoken.model` and no tokenizer.json).
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
        add_bos_token: bool = False,
        chat_encoding: str | None = None,
    ):
        self._hf = hf
        added = hf.get_added_tokens_decoder()
        specials = {t.content for t in added.values() if t.special}
        specials |= {t for t in (bos_token, eos_token, pad_token, *extra_special_tokens) if t}
        special_ids = {i for i in (hf.token_to_id(t) for t in specials) if i is not None}
        control = {t.content: i for i, t in added.items() if i in special_ids or _TAG.fullmatch(t.content)}
        control |= {t: hf.token_to_id(t) for t in specials if hf.token_to_id(t) is not None}
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, chat_template=chat_template,
                         control=control, special_ids=special_ids, add_bos_token=add_bos_token,
                         chat_encoding=chat_encoding)
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
    def from_dir(cls, path: str | os.PathLike) -> ChatTokenizer:
        """Read a Hugging Face tokenizer folder: `tokenizer.json`, and optionally `tokenizer_config.json` and
        `chat_template.jinja`; a folder with `tiktoken.model` instead (Kimi-K2, Moonlight) gives a
        `TiktokenTokenizer`. Without a chat template, the folder's config.json family may bring DeepSeek's
        encoding (`_family_encoding`)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            if (path / "tiktoken.model").is_file():
                return TiktokenTokenizer.from_dir(path)
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found; a tokenizer folder needs a tokenizer.json "
                                    "(fast tokenizer) or a tiktoken.model")
        hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_config(path)
        decoder = config.get("added_tokens_decoder", {})
        bos, eos, pad = (_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        vocab = hf.get_vocab()
        if not (path / "tokenizer_config.json").is_file():  # a bare tokenizer.json: our own names where present
            bos = "<|begin_of_text|>" if "<|begin_of_text|>" in vocab else None
            eos = "<|end_of_text|>" if "<|end_of_text|>" in vocab else None
            pad = "<|pad|>" if "<|pad|>" in vocab else None
        return cls(
            hf,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            chat_template=config["chat_template"],
            extra_special_tokens=[t["content"] for t in decoder.values() if t.get("special")],
            add_bos_token=config.get("add_bos_token", False),
            chat_encoding=_family_encoding(path) if config["chat_template"] is None else None,
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
            "add_bos_token": self.add_bos_token,
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

    # ---- text ----

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     parse_special: bool = True) -> list[list[int]]:
        """Many texts at once; `tokenizers` spreads the batch over threads (~N cores faster than a loop)."""
        hf = self._hf if parse_special else self._plain_hf()
        encodings = hf.encode_batch_fast(list(texts), add_special_tokens=False)
        prefix = self._bos(add_bos)
        return [prefix + e.ids for e in encodings]

    def _plain_hf(self) -> HFTokenizer:
        """A copy that encodes control-token text as ordinary characters. `encode_special_tokens` only skips added
        tokens marked special, and DeepSeek's role, think and tool markers are not, so the copy marks every control
        token special first. A copy rather than toggling the shared object, so concurrent callers never race."""
        if self._plain is None:
            spec = json.loads(self.to_json())
            for t in spec.get("added_tokens", []):
                if t["id"] in self.control_ids:
                    t["special"] = True
            self._plain = HFTokenizer.from_str(json.dumps(spec))
            self._plain.encode_special_tokens = True
        return self._plain

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)


# Moonshot's pre-tokenizer pattern (`pat_str` of Kimi-K2's tokenization_kimi.py; the folders' own .py is read first)
MOONSHOT_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
MOONSHOT_RESERVED = 256  # `num_reserved_special_tokens`: special ids after the ranks


def read_tiktoken_model(path: Path) -> dict[bytes, int]:
    """`tiktoken.model`: one `base64(token bytes) rank` line per token (tiktoken's `load_tiktoken_bpe` format, read
    here without its download cache). Ranks must be 0..n-1, each once."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a tiktoken BPE line ('<base64 token> <rank>')") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once (duplicate tokens or gaps)")
    return ranks


def _class_constants(path: Path) -> dict[str, Any]:
    """`pat_str` and `num_reserved_special_tokens` assigned in the classes of a folder's `tokenization_*.py`, read
    with `ast` (the file is never imported or run). `pat_str` may be a string or `"|".join([...strings])`."""
    found: dict[str, Any] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, v = node.targets[0].id, node.value
            if name not in ("pat_str", "num_reserved_special_tokens"):
                continue
            if (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "join"
                    and isinstance(v.func.value, ast.Constant) and len(v.args) == 1):
                found[name] = v.func.value.value.join(ast.literal_eval(v.args[0]))
            else:
                found[name] = ast.literal_eval(v)
    return found


class TiktokenTokenizer(ChatTokenizer):
    """A tiktoken BPE with the checkpoint's pre-tokenizer pattern and special tokens, as Moonshot ships Kimi-K2 and
    Moonlight (`tiktoken.model` + `tokenization_kimi.py` / `tokenization_moonshot.py`, no tokenizer.json). Ids are
    the ranks, then `num_reserved_special_tokens` special ids, named by tokenizer_config.json's added_tokens_decoder
    and `<|reserved_token_{i}|>` where it names none: the rules of Moonshot's TikTokenTokenizer, whose pattern and
    count are read (never run) from the folder's `tokenization_*.py`, else Moonshot's published values. Every
    special token is a control token."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, specials: dict[str, int], *, bos_token=None,
                 eos_token=None, pad_token=None, chat_template=None, add_bos_token: bool = False):
        import tiktoken

        self._ranks, self._pattern = ranks, pattern
        self._enc = tiktoken.Encoding(name="checkpoint", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self._specials, self._names = dict(specials), {i: t for t, i in specials.items()}
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, chat_template=chat_template,
                         control=specials, special_ids=specials.values(), add_bos_token=add_bos_token)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> TiktokenTokenizer:
        path = Path(path)
        ranks = read_tiktoken_model(path / "tiktoken.model")
        config = _read_config(path)
        consts: dict[str, Any] = {}
        for py in sorted(path.glob("tokenization_*.py")):
            consts |= _class_constants(py)
        if "pat_str" not in consts:
            log.info("%s: no tokenization_*.py with a pat_str; using Moonshot's published pattern", path)
        reserved = int(consts.get("num_reserved_special_tokens", MOONSHOT_RESERVED))
        named = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
        base = len(ranks)
        outside = sorted(set(named) - set(range(base, base + reserved)))
        if outside:
            raise ValueError(f"{path / 'tokenizer_config.json'}: added token id {outside[0]} ({named[outside[0]]!r}) "
                             f"is not one of the {reserved} special ids after tiktoken.model's {base} ranks "
                             f"({base}..{base + reserved - 1}): the wrong tiktoken.model for this config?")
        specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + reserved)}
        bos, eos, pad = (_token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        for key, tok in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
            if tok is not None and tok not in specials:
                raise ValueError(f"{path / 'tokenizer_config.json'}: {key} {tok!r} is not one of its special tokens")
        return cls(ranks, consts.get("pat_str", MOONSHOT_PATTERN), specials, bos_token=bos, eos_token=eos,
                   pad_token=pad, chat_template=config["chat_template"],
                   add_bos_token=config.get("add_bos_token", False))

    def save(self, path: str | os.PathLike) -> None:
        """`tiktoken.model` and a tokenizer_config.json `from_dir` reads back (transformers needs the checkpoint's own
        tokenization_*.py besides, which is code and not written here)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lines = sorted(self._ranks.items(), key=lambda kv: kv[1])
        write_atomic(path / "tiktoken.model", b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in lines))
        config = {"tokenizer_class": "TikTokenTokenizer", "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "add_bos_token": self.add_bos_token, "chat_template": self.chat_template,
                  "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in sorted(self._names.items())
                                           if not t.startswith("<|reserved_token_")}}
        write_atomic(path / "tokenizer_config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self._pattern.encode())
        for t, r in sorted(self._ranks.items(), key=lambda kv: kv[1]):
            h.update(b"%d:%s;" % (r, base64.b64encode(t)))
        h.update(json.dumps(self._specials, sort_keys=True).encode())
        return h.hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def token_to_id(self, token: str) -> int | None:
        return self._specials.get(token, self._ranks.get(token.encode("utf-8")))

    def id_to_token(self, i: int) -> str | None:
        if i in self._names:
            return self._names[i]
        return self._enc.decode_single_token_bytes(i).decode("utf-8", "replace") if 0 <= i < len(self._ranks) else None

    def token_bytes(self, i: int) -> bytes:
        """The bytes of id `i` (a special token's: its name), what a grammar engine matches text against."""
        return self._names[i].encode("utf-8") if i in self._names else self._enc.decode_single_token_bytes(i)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     parse_special: bool = True) -> list[list[int]]:
        """Long texts are cut as Moonshot's tokenizer cuts them (400k characters, runs of 25k spaces or non-spaces:
        tiktoken's regex otherwise overflows its stack), so the ids are theirs."""
        prefix = self._bos(add_bos)
        out = []
        for text in texts:
            ids = list(prefix)
            for piece in _tiktoken_pieces(text):
                ids += self._enc.encode(piece, allowed_special="all") if parse_special else self._enc.encode_ordinary(piece)
            out.append(ids)
        return out

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


def _tiktoken_pieces(text: str, max_chars: int = 400_000, max_run: int = 25_000) -> Iterable[str]:
    for i in range(0, max(len(text), 1), max_chars):
        chunk, start, run, space = text[i:i + max_chars], 0, 0, None
        for j, c in enumerate(chunk):
            if c.isspace() != space:
                run, space = 1, c.isspace()
            else:
                run += 1
                if run > max_run:
                    yield chunk[start:j]
                    start, run = j, 1
        yield chunk[start:]


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
