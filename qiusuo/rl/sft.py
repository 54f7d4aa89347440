"""`qiusuo sft`: supervised fine-tuning on chats, loss on the assistant's tokens only, short chats packed.

Data: `.jsonl`, one `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` per line, or
`task:SPEC` to generate worked traces from a built-in task's train split (`qiusuo.rl.tasks`). Each chat is
rendered with the tokenizer's chat template; the labels are the assistant turns' content and their closing
`<|end|>` (the role marker `<|assistant|>` is part of the prompt, as at inference), -100 everywhere else.

Packing without attention across examples: several chats share a row of `seq_len` tokens, and their document
ids go to the model as `doc_ids`: positions restart at 0 for each chat (so a packed chat sees the same rotary
positions as alone) and attention is causal within a chat only (block-diagonal); the test checks that packed
logits equal each chat's own forward. The MTP modules attend with a plain causal mask, so packed rows train the
main head only (`train.mtp_weight` applies with `sft.pack = false`, one chat per row).

The run is the pretraining trainer (`qiusuo.train.trainer.Trainer`) fed by `ChatSource`: the same optimizer step,
device selection (bf16 autocast on CUDA), checkpoints, exact resume (`qiusuo sft --resume RUN` reads the run's
own run.toml), metrics and plots. Settings are the run config's (`[sft]` plus the shared sections; defaults in
the `sft` run preset); `qiusuo sft --help` lists every key.

LoRA (`--lora.rank=16 --lora.targets=attention,experts`, `[lora]`): the `--model` folder is the frozen base (packed
with `--quantize int4`: QLoRA), only adapters train and are checkpointed, and the run exports RUN/adapter, a peft
folder (`qiusuo.lora.train`, docs/lora.md).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qiusuo.model.transformer import IGNORE_INDEX
from qiusuo.train.config import RunConfig

ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """A chat file or a chat is malformed; the message names the file and line."""


# ---------------------------------------------------------------- data

def read_chats(path: str | Path) -> list[tuple[int, list[dict]]]:
    """(line number, messages) for every non-blank line of a chat `.jsonl`; `ChatDataError` naming file and line
    for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: chat file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                    'object like {"messages": [{"role": "user", "content": "..."}, ...]}') from None
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ChatDataError(f"{where}: expected an object with a non-empty list under \"messages\"")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise ChatDataError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                                        f"\"content\": string}}, got {json.dumps(m)[:120]}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ChatDataError(f"{where}: no assistant message, so nothing to learn from this chat")
            out.append((n, msgs))
    if not out:
        raise ChatDataError(f"{path}: no chats (the file is empty)")
    return out


def task_chats(spec: str, n: int, seed: int) -> list[tuple[int, list[dict]]]:
    """n SFT chats from a built-in task's train split (`task:arithmetic:digits=2`)."""
    from qiusuo.rl.tasks import chat_messages, get_task

    task = get_task(spec)
    return [(i + 1, chat_messages(p)) for i, p in enumerate(task.problems("train", n, seed=seed))]


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it is trained on (assistant content + its end).

    Each assistant turn's span is found by rendering the chat up to the turn with the generation prompt (start)
    and through the turn (end); the template and tokenizer must be prefix-stable (ours are: turns end in special
    tokens), which is checked rather than assumed. The chats are training data, trusted: their `<think>` and
    answer markers are meant to become control tokens (user text goes through `encode_chat` instead); the
    template writes its own BOS."""
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False), add_bos=False)
    train = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.encode(tokenizer.apply_chat_template(messages[:i]), add_bos=False) if i else []
        end = tokenizer.encode(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False),
                               add_bos=False)
        if full[: len(end)] != end or end[: len(start)] != start:
            raise ChatDataError("the chat template does not render chats prefix by prefix (a turn changes how "
                                "earlier text is tokenised); use a template whose turns end in special tokens")
        for t in range(len(start), len(end)):
            train[t] = True
    return full, train


@dataclass
class Example:
    ids: list[int]
    train: list[bool]  # per token: is it a target
    line: int


def build_rows(examples: list[Example], seq_len: int, pad_id: int, pack: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `seq_len`: input ids, aligned labels (labels[t] = ids[t+1] when token t+1 is a target, else -100)
    and document ids (-1 on padding). First-fit packing in the given order when `pack`, one chat per row
    otherwise. Returns (N, seq_len) tensors."""
    rows: list[list[int]] = []  # indices into examples
    space: list[int] = []
    for k, ex in enumerate(examples):
        n = len(ex.ids)
        if n > seq_len:
            raise ChatDataError(f"chat at line {ex.line} has {n} tokens, more than --seq-len {seq_len}; raise "
                                "--seq-len or shorten it")
        r = next((r for r, s in enumerate(space) if s >= n), None) if pack else None
        if r is None:
            rows.append([]), space.append(seq_len)
            r = len(rows) - 1
        rows[r].append(k)
        space[r] -= n
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    docs = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for d, k in enumerate(members):
            ex, n = examples[k], len(examples[k].ids)
            ids[r, pos:pos + n] = torch.tensor(ex.ids)
            docs[r, pos:pos + n] = d
            tgt = torch.tensor(ex.ids[1:])
            keep = torch.tensor(ex.train[1:], dtype=torch.bool)
            labels[r, pos:pos + n - 1] = torch.where(keep, tgt, IGNORE_INDEX)
            pos += n
    return ids, labels, docs


class ChatSource:
    """SFT batches for the trainer: chats rendered, tokenised and packed into rows once; each step draws
    `batch_size` rows of a per-epoch permutation (seeded by `run.seed` and the epoch), a pure function of the
    number of batches drawn, which is all `state_dict` has to save for exact resume.

    The model is the `[sft] init` folder's (its tokenizer too, unless `[sft] tokenizer` names one) or a fresh
    `[model] preset` model sized to a tokenizer (given, or a byte-level BPE trained on the chats)."""

    val_shards = None  # no validation split: the trainer skips evaluation

    def __init__(self, cfg: RunConfig):
        from qiusuo.data.tokenizer import Tokenizer

        sft, self.seed = cfg.sft, cfg.run.seed
        if not sft.data:
            raise ValueError("pass --data FILE.jsonl or --data task:SPEC (the run config key sft.data)")
        self.chats = task_chats(sft.data[5:], sft.examples, self.seed) if sft.data.startswith("task:") else read_chats(sft.data)
        if sft.init and not Path(sft.init).is_dir():
            raise ValueError(f"sft.init={sft.init!r} is not a model folder; pass a folder, or leave it empty for a "
                             f"fresh model of [model] preset")
        if sft.tokenizer or sft.init:
            self.tokenizer = Tokenizer.from_dir(sft.tokenizer or sft.init)
        else:
            # digits are blanked out so no merge ever joins them: numbers stay one token per digit (as in LLaMA's and
            # DeepSeek's tokenizers), which is what lets a small model learn place-value arithmetic
            texts = [re.sub(r"[0-9]", " ", m["content"]) for _, msgs in self.chats for m in msgs]
            self.tokenizer = Tokenizer.train(texts, sft.vocab_size)
        self.init = sft.init
        self.quantize = cfg.lora.quantize if cfg.lora.rank else ""  # QLoRA: the base loads packed, never in float
        examples = []
        for line, msgs in self.chats:
            try:
                ids, train = tokenize_chat(self.tokenizer, msgs)
            except Exception as e:
                raise ChatDataError(f"{sft.data}:{line}: {e}") from None
            examples.append(Example(ids, train, line))
        random.Random(self.seed).shuffle(examples)
        self.examples = examples
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.ids, self.labels, self.docs = build_rows(examples, cfg.data.seq_len, pad, sft.pack)
        self.pack = sft.pack
        self.rows = self.ids.shape[0]
        self.batch_size = min(cfg.data.batch_size, self.rows)
        self.tokens_per_batch = self.batch_size * cfg.data.seq_len
        self.drawn = 0  # batches drawn so far

    def model_config(self, model_section):
        from qiusuo.hf.load import read_config

        if self.init:
            return read_config(self.init)[0]
        tok = self.tokenizer
        return model_section.build(vocab_size=tok.vocab_size).replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                                                      pad_token_id=tok.pad_id)

    def init_model(self, model_cfg, seed: int):
        from qiusuo.hf.load import load_model
        from qiusuo.train.trainer import random_model

        if self.init:
            return load_model(self.init, progress=False, quantize=self.quantize or None)
        return random_model(model_cfg, seed)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        N, B = self.rows, self.batch_size
        epoch, k = divmod(self.drawn * B, N)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        idx = order[k:k + B] if k + B <= N else order[-B:]  # a whole batch from this epoch's order
        self.drawn += 1
        return self.ids[idx], self.labels[idx], self.docs[idx]  # (B, T) each

    def loss(self, forward, batch, cfg: RunConfig):
        ids, labels, docs = batch
        if self.pack:
            return forward(ids, labels=labels, doc_ids=docs, mtp_weight=0.0, balance_alpha=cfg.balance.alpha)
        return forward(ids, labels=labels, mtp_weight=cfg.train.mtp_weight, balance_alpha=cfg.balance.alpha)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


def run_sft(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    """The whole job on the trainer; returns its summary plus the data's shape (rows, chats)."""
    from qiusuo.train.trainer import Trainer

    source = ChatSource(cfg)
    with warnings.catch_warnings():  # plot_run's validation panel is empty here (SFT has no val split)
        warnings.simplefilter("ignore", UserWarning)
        summary = Trainer(cfg, resume=resume, source=source, overwrite=overwrite).train()
    return {**summary, "rows": source.rows, "chats": len(source.examples)}


ALIASES = {
    "--data": ("sft.data", {"help": "chat .jsonl or task:SPEC, e.g. task:arithmetic:digits=2"}),
    "--model": ("sft.init", {"help": "model folder to fine-tune; a model size name (tiny, ...) sets model.preset"}),
    "--tokenizer": ("sft.tokenizer", {}),
    "--out-dir": ("run.out_dir", {}),
    "--steps": ("train.steps", {}),
    "--batch-size": ("data.batch_size", {}),
    "--seq-len": ("data.seq_len", {}),
    "--lr": ("optim.lr", {}),
    "--seed": ("run.seed", {}),
    "--threads": ("run.threads", {}),
    "--quantize": ("lora.quantize", {"help": "QLoRA: the frozen base's formats (int4, experts=int4,...)"}),
    "--no-pack": ("sft.pack", {"action": "store_const", "const": False, "help": "one chat per row"}),
    "--no-progress": ("run.progress", {"action": "store_const", "const": False, "help": "no progress bar"}),
}


def add_args(p: argparse.ArgumentParser) -> None:
    from qiusuo.train.config import add_config_args
    from qiusuo.train.run import add_overwrite_arg, add_resume_arg

    p.usage = ("qiusuo sft --data CHATS.jsonl|task:SPEC [--config PRESET_OR_TOML] [--section.key VALUE ...] "
               "[--resume RUN] [--overwrite]")
    add_resume_arg(p)
    add_overwrite_arg(p)
    add_config_args(p, "sft", ALIASES)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config of `qiusuo sft`: preset/TOML (or the resumed run's run.toml), then the flags. `--model NAME`
    with a model size instead of a folder sets `model.preset` (a fresh model of that size)."""
    from qiusuo.config import PRESETS
    from qiusuo.train.config import load_run_config, overrides
    from qiusuo.train.run import config_source, resume_overrides

    over = resume_overrides(args, overrides(args))
    init = over.get("sft.init")
    if init in PRESETS and not Path(init).is_dir():
        over["model.preset"] = over.pop("sft.init")
    return load_run_config(config_source(args, args.default_config), over)


def main(args: argparse.Namespace) -> int:
    from qiusuo.io import CheckpointError
    from qiusuo.runtime import Interrupted
    from qiusuo.train.step import TrainingDiverged

    try:
        summary = run_sft(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    except Interrupted as e:
        print(f"qiusuo sft: {e}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged) as e:
        print(f"qiusuo sft: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
