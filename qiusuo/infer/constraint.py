"""Structured output: a request's reply held to a JSON schema, a regular expression, a grammar or a tool call in the
checkpoint's own markup, by masking each constrained row's logits with what a grammar engine allows next.

The grammar engine is llguidance (an Earley parser over a lexer, Rust, no dependencies), chosen over xgrammar by
measuring both (`qiusuo bench structured --libraries`, figures in docs/structured_output.md): llguidance refuses
the schema keywords it does not implement (`not`, `uniqueItems`, `if`, ...), a 400 naming the field, where xgrammar
compiled `not` and `uniqueItems` and ignored them: output that does not validate, with no error. llguidance also
compiled schemas far faster, on the request path, with a much smaller worst case; xgrammar's masks were as fast at
the median and faster in the tail, a small share of a step either way. xgrammar also pulls in transformers and
triton.

What a request asks for becomes one `Grammar`, always llguidance's Lark dialect (`RESPONSE_FORMATS`):
- `json_object` / `json_schema`: `%json {schema}`. JSON is written compactly with json.dumps' separators
  (", " and ": ", no other whitespace): a model that never wants to write JSON could otherwise pad it with
  whitespace until max_tokens. `strict` is accepted either way: the output follows the schema in both.
- `regex` (qiusuo's extension): the whole reply matches the pattern (Rust regex syntax).
- `grammar` (qiusuo's extension): Lark as llguidance reads it (`"syntax": "lark"`, the default) or llama.cpp's GBNF
  (`"syntax": "gbnf"`, converted to Lark by llguidance).
- a forced tool call (`tool_call_grammar`): the rest of the call after the markup the reply was started with
  (`tools.prepare_chat`), one call, its arguments held to the function's parameter schema.
Markers that are control tokens are matched by id (`<[id]>`) and never as text: every control token is hidden from
the grammar's text (`Grammars.tokenizer`), so JSON strings cannot contain `<｜end▁of▁sentence｜>` either.

In the engine, per row: each sample owns a matcher (`RowConstraint`). `allowed` builds the boolean masks of the
constrained rows only, `sample` draws from the masked logits (logprobs stay the model's own, as vLLM reports them),
`advance` feeds each row its sampled token. A row whose prompt opened the reasoning (`<think>`) is free until it
emits the end-of-reasoning token; its reasoning_content is never constrained. The row's stop tokens are allowed
exactly when the grammar is complete, so a reply ends when, and only when, it is whole; one the model cannot finish
within max_tokens ends with finish_reason "length". Seeds are untouched (one draw per step, as unconstrained), and
so is the prefix cache (the prompt is the same). Speculative decoding is off for constrained rows: they never draft,
so a verifying step holds one position for them, masked like a plain step (`ModelRunner`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qiusuo.data.deepseek_encoding import DSML

# compact JSON (module docstring); llguidance reads these per schema from its "x-guidance" key
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
END_OF_REASONING = "</think>"
CACHED = 64  # compiled grammars kept per engine


class ConstraintError(ValueError):
    """A response format, schema, regex, grammar or tool that cannot be compiled; `param` names the request field
    (the server's 400 says which)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Grammar:
    """What a reply must match: `lark`, in llguidance's Lark dialect; `param`, the request field it came from;
    `after_reasoning`: free text until the end-of-reasoning token, then the grammar (a prompt that opened `<think>`)."""

    lark: str
    param: str
    after_reasoning: bool = False


def _schema(schema: Any, param: str) -> str:
    """`%json {...}` for a JSON schema, with the compact-JSON options."""
    if schema is True:  # any JSON value
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError(param, f"a JSON schema is an object (or true), got {json.dumps(schema)[:40]}")
    guidance = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": guidance}, ensure_ascii=False)


def json_schema(schema: Any, param: str = "json_schema") -> Grammar:
    """A reply that is one JSON value valid under `schema` (the Python API's way in)."""
    return Grammar("start: " + _schema(schema, param), param)


def regex(pattern: str, param: str = "regex") -> Grammar:
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError(param, "must be a non-empty string (a regular expression)")
    from llguidance import regex_to_lark

    return Grammar(f"start: /{regex_to_lark(pattern, 'd')}/", param)  # \d is [0-9], as people mean it


def grammar(text: str, syntax: str = "lark", param: str = "grammar") -> Grammar:
    """A grammar in llguidance's Lark dialect or llama.cpp's GBNF."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(param, "must be a non-empty string (a grammar)")
    if syntax == "gbnf":
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            text = any_to_lark(text)
        except Exception as e:  # the converter raises whatever its parser meets
            raise ConstraintError(param, f"not a GBNF grammar: {e}") from None
    elif syntax != "lark":
        raise ConstraintError("syntax", f"{syntax!r} is not a grammar syntax; use 'lark' (llguidance's) or 'gbnf' "
                                        "(llama.cpp's)")
    return Grammar(text, param)


def _json_object(value: dict, param: str) -> Grammar:
    return Grammar("start: " + _schema({"type": "object"}, param), param)


def _json_schema(value: dict, param: str) -> Grammar:
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ConstraintError(f"{param}.json_schema", "must be an object {\"name\": ..., \"schema\": {...}, "
                                                      "\"strict\": true}")
    if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ConstraintError(f"{param}.json_schema", "name must be a string and strict true or false")
    return json_schema(spec.get("schema", {}), f"{param}.json_schema.schema")


def _regex(value: dict, param: str) -> Grammar:
    return regex(value.get("regex"), f"{param}.regex")


def _grammar(value: dict, param: str) -> Grammar:
    try:
        return grammar(value.get("grammar"), value.get("syntax", "lark"), f"{param}.grammar")
    except ConstraintError as e:
        if e.param != "syntax":
            raise
        raise ConstraintError(f"{param}.syntax", str(e).removeprefix("syntax: ")) from None


# response_format's "type" -> the Grammar of its value; "text" asks for nothing
RESPONSE_FORMATS: dict[str, Callable[[dict, str], Grammar] | None] = {
    "text": None,
    "json_object": _json_object,
    "json_schema": _json_schema,
    "regex": _regex,  # qiusuo's extension: {"type": "regex", "regex": "..."}
    "grammar": _grammar,  # qiusuo's extension: {"type": "grammar", "grammar": "...", "syntax": "lark" | "gbnf"}
}


def response_format(value: Any, param: str = "response_format") -> Grammar | None:
    """The Grammar a request's `response_format` asks for (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise ConstraintError(f"{param}.type", f"must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, "
                                               f"got {kind!r}")
    build = RESPONSE_FORMATS[kind]
    return build(value, param) if build else None


# ---- forced tool calls ----

def _literal(tokenizer, text: str) -> str:
    """Lark for `text` written exactly: control tokens by id, the rest as quoted text."""
    parts, plain = [], []  # plain: ids of a run of text, decoded together (a character may span tokens)
    for i in tokenizer.encode(text, add_bos=False, parse_special=True) if text else []:
        if i in tokenizer.control_ids:
            parts += [json.dumps(tokenizer.decode(plain), ensure_ascii=False)] if plain else []
            parts.append(f"<[{i}]>")
            plain = []
        else:
            plain.append(i)
    parts += [json.dumps(tokenizer.decode(plain), ensure_ascii=False)] if plain else []
    return " ".join(parts) or '""'


def _json_args(tokenizer, schema: dict, param: str) -> str:
    return _schema(schema, param)


def _dsml_text(sub: dict) -> str:
    """A DSML string value written raw (string="true"): any text without '<' (which starts the closing marker),
    within the schema's length bounds, or matching its pattern (searched, as JSON Schema does)."""
    if "pattern" in sub:
        from llguidance import regex_to_lark

        p = sub["pattern"]
        before, after = ("" if p.startswith("^") else "[^<]*"), ("" if p.endswith("$") else "[^<]*")
        return f"/{before}({regex_to_lark(p.removeprefix('^').removesuffix('$'), 'dw')}){after}/"
    lo, hi = sub.get("minLength", 0), sub.get("maxLength")
    return f"/[^<]{{{lo},{'' if hi is None else hi}}}/"


def _dsml_args(tokenizer, schema: dict, param: str) -> str:
    """DSML parameters (`qiusuo.data.deepseek_encoding`): one line per property, in the schema's order, required
    ones always, the others optionally; plain strings raw (string="true": the parser keeps a string-typed value's
    text as it is, quotes included), every other value JSON."""
    props, required = schema.get("properties") or {}, set(schema.get("required") or [])
    lines = []
    for k, sub in props.items():
        raw = isinstance(sub, dict) and sub.get("type") == "string" and not ({"enum", "const"} & set(sub))
        value = _dsml_text(sub) if raw else _schema(sub, f"{param}.properties.{k}")
        head = _literal(tokenizer, f'<{DSML}parameter name="{k}" string="{"true" if raw else "false"}">')
        line = f"{head} {value} {_literal(tokenizer, f'</{DSML}parameter>' + chr(10))}"
        lines.append(line if k in required else f"({line})?")
    return " ".join(lines) or '""'


# tool-call format -> (markup between the function's name and its arguments, markup closing the call, the
# arguments' grammar): the markup `tools._MARKUP` parses; the section's own end follows the call
CALLS: dict[str, tuple[str, str, Callable[[Any, dict, str], str]]] = {
    "deepseek_v3": ("\n```json\n", "\n```<｜tool▁call▁end｜>", _json_args),
    "deepseek_v31": ("<｜tool▁sep｜>", "<｜tool▁call▁end｜>", _json_args),
    "kimi_k2": (":0<|tool_call_argument_begin|>", "<|tool_call_end|>", _json_args),
    "deepseek_v32": ('">\n', f"</{DSML}invoke>\n", _dsml_args),
    "deepseek_v4": ('">\n', f"</{DSML}invoke>\n", _dsml_args),
}


def tool_call_grammar(tokenizer, fmt: str, tools: list[dict], name: str | None) -> Grammar:
    """The rest of one forced call in `fmt`'s markup after the reply's prefix (`tools.prepare_chat`): the named
    function's arguments (`name`), or any offered function's name and arguments (`name` "": tool_choice required).
    One call: the section closes after it."""
    from qiusuo.infer.tools import _MARKUP

    between, close, arguments = CALLS[fmt]
    rules = []
    for i, t in enumerate(tools):
        f = t["function"]
        if name and f["name"] != name:
            continue
        schema = f.get("parameters") or {"type": "object", "properties": {}}
        head = "" if name else _literal(tokenizer, f["name"] + between)  # a named call's head is in the prompt
        args = arguments(tokenizer, schema, f"tools[{i}].function.parameters")
        rules.append(f"call{i}: {head} {args} {_literal(tokenizer, close + _MARKUP[fmt]['end'])}")
    body = "start: " + " | ".join(r.partition(":")[0] for r in rules)
    return Grammar("\n".join([body, *rules]), "tools")


def request_grammar(tokenizer, format_: Any, chat=None, tools: list | None = None, tool_choice: Any = None
                    ) -> Grammar | None:
    """The constraint of a request: a forced tool call (`tool_choice` required or named, `chat` its
    `tools.ChatPrompt`), which wins over `response_format` (the reply is a call), else `response_format`; in a
    chat whose prompt opened the reasoning, switched on after it."""
    from qiusuo.infer.tools import forced_name

    name = forced_name(tool_choice, tools) if chat is not None and chat.fmt else None
    if name is not None:
        return tool_call_grammar(tokenizer, chat.fmt, tools, name)
    g = response_format(format_)
    if g is not None and chat is not None and chat.thinking:
        g = Grammar(g.lark, g.param, after_reasoning=True)
    return g


# ---- compiling, per engine ----

class Grammars:
    """llguidance's view of one engine's tokenizer (built once, on the first constrained request: seconds for a
    large vocabulary) and the compiled matchers of requests. Thread-safe: requests are compiled in the server's
    worker threads."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tok, self.vocab_size = tokenizer, vocab_size
        self.eos = min(eos_ids) if eos_ids else vocab_size - 1
        self._ll = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[Grammar, Compiled] = OrderedDict()  # agents send the same schemas again

    def compile(self, g: Grammar) -> "Compiled":
        """`g` checked and compiled (the last CACHED ones kept); ConstraintError naming its field when llguidance
        refuses it."""
        with self._lock:
            hit = self._compiled.get(g)
            if hit is not None:
                self._compiled.move_to_end(g)
                return hit
        c = self._compile(g)
        with self._lock:
            self._compiled[g] = c
            while len(self._compiled) > CACHED:
                self._compiled.popitem(last=False)
        return c

    @property
    def tokenizer(self):
        """The LLTokenizer: every control token marked special, so grammars match them only by id."""
        with self._lock:
            if self._ll is None:
                import llguidance

                if hasattr(self.tok, "to_json"):  # Hugging Face tokenizers: llguidance reads the JSON
                    spec = json.loads(self.tok.to_json())
                    for t in spec.get("added_tokens", []):
                        t["special"] = t["special"] or t["id"] in self.tok.control_ids
                    src = json.dumps(spec)
                else:  # tiktoken: each id's bytes
                    src = llguidance.TokenizerWrapper(_ByteTokens(self.tok, self.eos))
                self._ll = llguidance.LLTokenizer(src, n_vocab=self.vocab_size, eos_token=self.eos)
            return self._ll

    def _compile(self, g: Grammar) -> "Compiled":
        import llguidance

        try:
            text = llguidance.LLMatcher.grammar_from_lark(g.lark)
        except ValueError as e:
            raise ConstraintError(g.param, str(e)) from None
        m = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if m.is_error():
            raise ConstraintError(g.param, m.get_error().strip().splitlines()[0][:500])
        trigger = None
        if g.after_reasoning:
            trigger = self.tok.token_to_id(END_OF_REASONING)
            if trigger is None:
                raise ConstraintError(g.param, f"this tokenizer has no {END_OF_REASONING} token to switch the "
                                               "constraint on after the reasoning; ask for chat mode")
        return Compiled(m, trigger, self.eos)


class _ByteTokens:
    """What llguidance's TokenizerWrapper reads of a tiktoken tokenizer: each id's bytes, the special ids, encode."""

    def __init__(self, tok, eos: int):
        self.eos_token_id, self.bos_token_id = eos, tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(tok.control_ids)
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_bos=False, parse_special=False)


@dataclass
class Compiled:
    """A request's checked grammar: a matcher at the start of the reply, copied for each sample."""

    matcher: Any
    trigger: int | None  # the end-of-reasoning token that switches the constraint on (None: on from the start)
    eos: int  # the id llguidance allows when the grammar is complete

    def start(self) -> "RowConstraint":
        return RowConstraint(self.matcher.deep_copy(), self.trigger is None, self.trigger, self.eos)


@dataclass
class RowConstraint:
    """One sample's place in its grammar."""

    matcher: Any
    active: bool  # False while the row is still reasoning
    trigger: int | None
    eos: int


def allowed(seqs: list, vocab: int) -> tuple[list[int], torch.Tensor] | None:
    """(rows, mask (R, vocab) bool) of the rows whose constraint is active, or None when no row has one. A row's stop
    tokens are allowed when its grammar allows its end (and a text token a request stops at, where the grammar
    allows that text)."""
    rows = [r for r, s in enumerate(seqs) if s.constraint is not None and s.constraint.active]
    if not rows:
        return None
    import llguidance.torch as lt

    bits = lt.allocate_token_bitmask(len(rows), vocab)  # (R, ceil(vocab / 32)) int32
    for j, r in enumerate(rows):
        lt.fill_next_token_bitmask(seqs[r].constraint.matcher, bits, j)
    mask = unpack(bits, vocab)  # (R, vocab)
    for j, r in enumerate(rows):
        s = seqs[r]
        stops = list(s.req.stop_ids)
        if stops:
            mask[j, stops] |= mask[j, s.constraint.eos]
    return rows, mask


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """llguidance's bitmask (R, W) int32, token t at bit t % 32 of word t // 32 -> (R, vocab) bool. Shifting whole
    words beat a table lookup per byte at 1 and 32 rows of 8k and 129k tokens (docs/structured_output.md)."""
    return ((bits.unsqueeze(-1) >> _SHIFTS) & 1).view(bits.shape[0], -1)[:, :vocab].bool()


def masked(logits: torch.Tensor, rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    """A copy of logits (B, V) whose `rows` keep only the tokens `mask` (R, V) allows (the others -inf). One
    `torch.where` pass: cheaper than a copy and a masked fill (docs/structured_output.md)."""
    mask = mask.to(logits.device, non_blocking=True)  # built on the CPU, where the grammar engine writes it
    if len(rows) == logits.shape[0]:
        return torch.where(mask, logits, _NEG_INF)
    out = logits.clone()
    out[rows] = torch.where(mask, logits[rows], _NEG_INF)
    return out


_NEG_INF = torch.tensor(float("-inf"))


class Masker:
    """A step's masks computed in a worker thread while the model runs (`start` before the forward, `allowed` from
    the sampler): llguidance leaves the GIL while it computes a mask, torch while it multiplies, so on a machine with
    a core to spare the masks come off the step's critical path. `overlap=False`, or a call for other rows than those
    started, computes them in place."""

    def __init__(self, overlap: bool = True):
        self.overlap = overlap
        self._pool = None
        self._job = None  # (rows, vocab, future) of the step under way

    def start(self, seqs: list, vocab: int) -> None:
        if not self.overlap or not any(s.constraint is not None and s.constraint.active for s in seqs):
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="qiusuo-masks")
        self._job = (seqs, vocab, self._pool.submit(allowed, seqs, vocab))

    def allowed(self, seqs: list, vocab: int) -> tuple[list[int], torch.Tensor] | None:
        job, self._job = self._job, None
        if job is not None:
            done = job[2].result()  # waited for even when not used: its matchers are about to advance
            if job[0] is seqs and job[1] == vocab:
                return done
        return allowed(seqs, vocab)


def advance(seqs: list, tokens: list[int], errors: dict[int, str]) -> None:
    """Feed each constrained row its sampled token: a reasoning row switches on at the end-of-reasoning token; a stop
    token ends the row and is not fed."""
    for r, s in enumerate(seqs):
        c = s.constraint
        if c is None or r in errors:
            continue
        tok = tokens[r]
        if not c.active:
            c.active = tok == c.trigger
        elif tok not in s.req.stop_ids and not c.matcher.consume_token(tok):
            errors[r] = f"the constraint refused token {tok}: {c.matcher.get_error()}"
