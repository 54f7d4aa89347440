"""llama.cpp driven from the outside: the reference `qiusuo bench quant` measures our quantised CPU decoding
against, on the same weights. A folder built by `qiusuo/bench/setup_llama_cpp.sh DIR` holds its tools; this
module only builds their command lines and reads their output, each run a subprocess with a timeout whose failure
is one line (`RuntimeError` naming the command and the tail of its stderr).

    llama = LlamaCpp.from_dir(DIR)
    llama.to_gguf(model_dir, "m-f32.gguf", "f32")          # a folder written by `qiusuo.save_hf`
    llama.quantize("m-f32.gguf", "m-q4_0.gguf", "Q4_0")
    llama.bench("m-q4_0.gguf", threads=2, n_gen=64)        # Speed(mean, std) in generated tokens/s
    llama.bench("m-q4_0.gguf", batch=8)                    # 8 sequences decoded together

Batched decoding: `llama-bench` times one sequence only (`-n` generates with a single-token batch; `-pg` adds a
prompt to that same sequence), so `batch > 1` runs `llama-batched-bench`, whose `S_TG` is the generated tokens of
all `-npl` sequences per second, one token per sequence per step, as our batched decoding does. It times each
setting once, so the setting is listed `repetitions` times in one run (one model load) for a mean and deviation.

Tokenizer: the converter names the pre-tokenizer (the regex that splits text before BPE) by hashing the ids a
tokenizer gives for a fixed text, and refuses hashes it does not know. Every tokenizer we train has its own hash
(the ids depend on the learnt merges), while the splitting itself is GPT-2's: ByteLevel with its regex, no prefix
space, which llama.cpp implements as the pre-tokenizer "gpt-2". `to_gguf` therefore checks `tokenizer.json` for
exactly that pre-tokenizer and then runs the converter under a few lines of Python, passed with `python -c`, that
wrap the converter's `TextModel.get_vocab_base_pre`: a hash the converter knows keeps its own answer (a real
DeepSeek-V3 tokenizer stays "deepseek-v3"), an unknown one gets "gpt-2". The alternatives: editing the
converter's hash table in place changes the build folder for every later user and is lost on a rebuild;
registering the hash of one tokenizer needs that hash computed first, by the converter's own code, for each
tokenizer, and says nothing more than the structural check does; vendoring a patched converter copies llama.cpp
code into this repository. Any other pre-tokenizer runs the converter unwrapped, which recognises it or refuses.

Greedy check: `greedy` runs `llama-completion` at temperature 0 and returns the prompt ids llama.cpp tokenised
(from `--verbose-prompt`) with the bytes it generated, so our model can decode from the very same ids (BOS and
tokenisation differences cannot enter) and `agreeing_tokens` counts how many of our first tokens llama.cpp's text
starts with.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SETUP = "qiusuo/bench/setup_llama_cpp.sh"
TOOLS = ("llama-bench", "llama-quantize", "llama-completion")
BATCHED = "llama-batched-bench"  # optional: only `bench(batch > 1)` needs it
CONVERTER = "convert_hf_to_gguf.py"
OUTTYPES = ("f32", "bf16", "f16", "q8_0")
QTYPES = ("Q8_0", "Q4_0")

# Run as `python -c _CONVERT CONVERTER PRE ARGS...`: the converter under its own name, with an unrecognised
# pre-tokenizer hash answered by PRE (see the module docstring). Nothing is written to disk.
_CONVERT = """\
import os, runpy, sys
converter, pre = sys.argv[1], sys.argv[2]
sys.argv = [converter] + sys.argv[3:]
sys.path.insert(0, os.path.dirname(os.path.abspath(converter)))
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(converter, run_name="__main__")
"""


@dataclass(frozen=True)
class Speed:
    """Generated tokens per second over all sequences: mean and standard deviation over `runs` timed runs."""
    mean: float
    std: float
    runs: int


@dataclass(frozen=True)
class Greedy:
    """What `llama-completion` did at temperature 0: the prompt ids it tokenised and the bytes it generated."""
    prompt_ids: list[int]
    text: bytes


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`cmd` with output captured; a non-zero exit or a timeout becomes one line: the command and its stderr's
    last lines."""
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{_show(cmd)}: timed out after {timeout:g} s: {_tail(e.stderr)}") from None
    except OSError as e:
        raise RuntimeError(f"{_show(cmd)}: {e}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{_show(cmd)}: exit {done.returncode}: {_tail(done.stderr)}")
    return done


def _show(cmd: list[str]) -> str:
    """The command for a message; the converter wrapper's code shown by its role, not its lines."""
    return " ".join("<wrapper>" if a == _CONVERT else a for a in cmd)


def _tail(err: bytes | str | None, lines: int = 3, chars: int = 400) -> str:
    text = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return (" | ".join(last) or "(no stderr)")[-chars:]


def is_gpt2_pretokenizer(model_dir: str | os.PathLike) -> bool:
    """Whether `model_dir/tokenizer.json` splits text exactly as GPT-2 does: a ByteLevel pre-tokenizer with its
    regex and no prefix space (what `qiusuo.data.tokenizer.Tokenizer.train` writes)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True
            and pre.get("add_prefix_space") is False)


def check_loadable(model_dir: str | os.PathLike) -> None:
    """ValueError for a config this llama.cpp converts but cannot load: its DeepSeek-V2/V3 loader skips
    `q_lora_rank` (plain query projection) only for 26 or 27 layers, which it takes for DeepSeek-V2-Lite, and
    otherwise stops at `key not found in model: deepseek2.attention.q_lora_rank` in every tool after conversion."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if (cfg.get("model_type") in ("deepseek_v2", "deepseek_v3") and not cfg.get("q_lora_rank")
            and cfg.get("num_hidden_layers") not in (26, 27)):
        raise ValueError(f"{model_dir}: llama.cpp loads a DeepSeek model without q_lora_rank only with 26 or 27 "
                         f"layers (DeepSeek-V2-Lite's); give the model a q_lora_rank")


class LlamaCpp:
    """The tools of one llama.cpp build folder (see `SETUP`) and the Python that runs its converter."""

    def __init__(self, root: Path, python: str = sys.executable):
        self.root = root
        self.python = python

    @classmethod
    def from_dir(cls, path: str | os.PathLike, python: str = sys.executable) -> LlamaCpp:
        """The build in `path`; FileNotFoundError naming what is missing and the script that makes it."""
        root = Path(path)
        missing = [f"bin/{t}" for t in TOOLS if not os.access(root / "bin" / t, os.X_OK)]
        missing += [] if (root / CONVERTER).is_file() else [CONVERTER]
        if missing:
            raise FileNotFoundError(f"{root} is not a llama.cpp build (missing {', '.join(missing)}); "
                                    f"make one with `{SETUP} {root}`")
        return cls(root, python)

    def tool(self, name: str) -> str:
        path = self.root / "bin" / name
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"{path} is missing; rebuild with `{SETUP} {self.root}`")
        return str(path)

    def to_gguf(self, model_dir: str | os.PathLike, out_gguf: str | os.PathLike, outtype: str = "f32",
                timeout: float = 3600) -> Path:
        """Convert a Hugging Face folder (`qiusuo.save_hf`'s, DeepSeek-V3 layout and names) to `out_gguf`."""
        if outtype not in OUTTYPES:
            raise ValueError(f"outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
        check_loadable(model_dir)
        args = [str(model_dir), "--outfile", str(out_gguf), "--outtype", outtype]
        converter = str(self.root / CONVERTER)
        if is_gpt2_pretokenizer(model_dir):
            cmd = [self.python, "-c", _CONVERT, converter, "gpt-2", *args]
        else:
            cmd = [self.python, converter, *args]
        run(cmd, timeout)  # the converter imports the gguf-py beside it (unless NO_LOCAL_GGUF is set)
        return Path(out_gguf)

    def quantize(self, gguf_in: str | os.PathLike, gguf_out: str | os.PathLike, qtype: str, threads: int = 2,
                 pure: bool = False, timeout: float = 3600) -> Path:
        """`llama-quantize` to Q8_0 or Q4_0 (from an f32/bf16/f16 GGUF). Either way norms, the routing bias and
        the router (`ffn_gate_inp`) stay float32. Its Q4_0 is a mix: the output head goes to Q6_K, the rest to
        Q4_0; `pure` makes the head Q4_0 too (Q8_0 is pure already)."""
        if qtype not in QTYPES:
            raise ValueError(f"qtype {qtype!r}: one of {', '.join(QTYPES)}")
        flags = ["--pure"] if pure else []
        run([self.tool("llama-quantize"), *flags, str(gguf_in), str(gguf_out), qtype, str(threads)], timeout)
        return Path(gguf_out)

    def bench_cmd(self, gguf: str | os.PathLike, threads: int = 2, n_gen: int = 64, batch: int = 1,
                  repetitions: int = 5, n_prompt: int = 16) -> list[str]:
        """The command `bench` runs. `n_prompt` is used for `batch > 1` only (`llama-batched-bench` prefills
        each sequence before timing its decoding; `llama-bench -p 0 -n N` decodes from an empty cache)."""
        if batch == 1:
            return [self.tool("llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-t", str(threads),
                    "-r", str(repetitions), "-o", "json"]
        ctx = batch * (n_prompt + n_gen)
        return [self.tool(BATCHED), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
                "-npp", str(n_prompt), "-ntg", str(n_gen), "-npl", ",".join([str(batch)] * repetitions),
                "--output-format", "jsonl"]

    def bench(self, gguf: str | os.PathLike, threads: int = 2, n_gen: int = 64, batch: int = 1,
              repetitions: int = 5, n_prompt: int = 16, timeout: float = 1800) -> Speed:
        """Decoding tokens/s of `gguf` on `threads` CPU threads, `batch` sequences at a time."""
        out = run(self.bench_cmd(gguf, threads, n_gen, batch, repetitions, n_prompt), timeout).stdout.decode()
        return parse_bench(out, n_gen) if batch == 1 else parse_batched_bench(out, n_gen, batch)

    def greedy_cmd(self, gguf: str | os.PathLike, prompt: str, n_tokens: int = 16, threads: int = 2,
                   cache_type: str = "f32") -> list[str]:
        """`llama-completion` at temperature 0 for exactly `n_tokens` new tokens, no chat mode; the prompt taken
        as written (`--no-escape`: `\\n` stays two characters), its ids listed (`--verbose-prompt`) and not echoed;
        control tokens printed as their text (`-sp`); the cache in `cache_type` (f32: no rounding beyond the
        weights'); flash attention off: its CPU kernel moved a logit by more than a random model's top-1 margin
        (5e-3, where our model in float32 and float64 differ by 6e-7), so one of three prompts parted at token 9
        with it and none without. `--ignore-eos` bans end-of-generation ids outright: where our greedy choice is
        one of them, the two part there."""
        return [self.tool("llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(n_tokens),
                "-t", str(threads), "--temp", "0", "--top-k", "1", "--ignore-eos", "-no-cnv", "--no-warmup",
                "--no-escape", "--no-display-prompt", "--verbose-prompt", "-sp",
                "-ctk", cache_type, "-ctv", cache_type, "-fa", "off"]

    def greedy(self, gguf: str | os.PathLike, prompt: str, n_tokens: int = 16, threads: int = 2,
               cache_type: str = "f32", timeout: float = 600) -> Greedy:
        """llama.cpp's greedy continuation of `prompt`: the prompt ids it used and the bytes it generated."""
        done = run(self.greedy_cmd(gguf, prompt, n_tokens, threads, cache_type), timeout)
        return parse_greedy(done.stdout, done.stderr)

    def greedy_agreement(self, gguf: str | os.PathLike, model, tokenizer, prompt: str, n_tokens: int = 16,
                         threads: int = 2) -> int:
        """How many of `model`'s first `n_tokens` greedy tokens (`Transformer.generate` from llama.cpp's own
        prompt ids) llama.cpp's greedy text on `gguf` reproduces. `tokenizer`: the byte-level BPE the GGUF was
        made with. With float32 weights both ways, expect all of them."""
        import torch

        g = self.greedy(gguf, prompt, n_tokens, threads)
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(torch.tensor([g.prompt_ids], device=device), n_tokens)[0, len(g.prompt_ids):]
        return agreeing_tokens(g.text, byte_level_pieces(tokenizer, out.tolist()))


def parse_bench(out: str, n_gen: int) -> Speed:
    """`llama-bench -o json`'s record of the decoding test (n_prompt 0, n_gen `n_gen`)."""
    try:
        tests = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"llama-bench printed no JSON: {_tail(out)}") from None
    for t in tests:
        if t.get("n_prompt") == 0 and t.get("n_gen") == n_gen:
            return Speed(float(t["avg_ts"]), float(t["stddev_ts"]), len(t.get("samples_ts") or []))
    raise RuntimeError(f"llama-bench's JSON has no decoding test of {n_gen} tokens")


def parse_batched_bench(out: str, n_gen: int, batch: int) -> Speed:
    """`llama-batched-bench --output-format jsonl`'s rows for `batch` sequences: mean and deviation of S_TG."""
    speeds = []
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("pl") == batch and row.get("tg") == n_gen:
                speeds.append(float(row["speed_tg"]))
    if not speeds:
        raise RuntimeError(f"llama-batched-bench printed no row for {batch} sequences: {_tail(out)}")
    return Speed(statistics.fmean(speeds), statistics.stdev(speeds) if len(speeds) > 1 else 0.0, len(speeds))


_PROMPT_LEN = re.compile(r"number of tokens in prompt = (\d+)")
_PROMPT_ID = re.compile(r"^(?:[\d.]+ I)?\s*(\d+) -> '", re.M)


def parse_greedy(stdout: bytes, stderr: bytes) -> Greedy:
    """The prompt ids from `--verbose-prompt` (on stderr: `number of tokens in prompt = N`, then N lines
    `[time I] ID -> 'piece'`, a piece's own newlines continuing it on the next lines) and the generated bytes
    (stdout, without the blank line llama-completion ends with)."""
    err = stderr.decode(errors="replace")
    ids: list[int] = []
    if m := _PROMPT_LEN.search(err):
        ids = [int(x.group(1)) for x in _PROMPT_ID.finditer(err, m.end())][:int(m.group(1))]
    text = stdout[:-2] if stdout.endswith(b"\n\n") else stdout
    return Greedy(ids, text)


def byte_level_pieces(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each id stands for in a byte-level BPE tokenizer (GPT-2's byte <-> printable character map),
    for comparing token by token with text llama.cpp printed, partial UTF-8 sequences included."""
    return [_piece(tokenizer.id_to_token(i)) for i in ids]


def _piece(token: str) -> bytes:
    """A byte-level token's bytes; an added token (`<|end|>`, `<｜User｜>`) written outside the map as UTF-8."""
    if all(c in _UNICODE_TO_BYTE for c in token):
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    return token.encode()


def _bytes_to_unicode() -> dict[str, int]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _bytes_to_unicode()


def agreeing_tokens(text: bytes, pieces: list[bytes]) -> int:
    """How many of `pieces` (our greedy tokens, in order) `text` (llama.cpp's greedy output) starts with."""
    n, at = 0, 0
    for p in pieces:
        if text[at:at + len(p)] != p:
            break
        n, at = n + 1, at + len(p)
    return n
