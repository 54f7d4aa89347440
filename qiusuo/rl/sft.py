"""`qiusuo sft`: supervised fine-tuning on chats, loss on the assistant's tokens only, short chats packed.

Data: `.jsonl`, one `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` per line, or
`task:SPEC` to generate worked traces from a built-in task's train split (`qiusuo.rl.tasks`). Each chat is
rendered with the tokenizer's chat template; the labels are the assistant turns' content and their closing
`<|end|>` (the role marker `<|assistant|>` is part of the prompt, as at inference), -100 everywhere else.

Packing without attention across examples: several chats share a row of `seq_len` tokens, and a
`DocumentMask` is passed to the model in place of a cache. It implements the latent-cache protocol of
`qiusuo.model.cache` without storing anything: positions restart at 0 for each chat (so a packed chat sees the
same rotary positions as alone) and attention is causal within a chat only (block-diagonal). The model needs no
change, and the test checks that packed logits equal each chat's own forward. The MTP modules attend with a plain
causal mask, so packed rows train the main head only (`--mtp-weight` applies with `--no-pack`, one chat per row).

Checkpoints, resume, metrics and plots are the trainer's (`qiusuo.train.checkpoint`, `qiusuo.train.metrics`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qiusuo.model.transformer import IGNORE_INDEX

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
    tokens), which is checked rather than assumed."""
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    train = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.encode(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else []
        end = tokenizer.encode(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False))
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


class DocumentMask:
    """A stand-in for a latent cache that makes one forward pass treat each document of a packed row as its own
    sequence: positions restart per document and attention is causal within it (see the module docstring).

    docs: (B, T) document id per token (padding has its own id, -1, and attends only to padding)."""

    def __init__(self, docs: torch.Tensor):
        B, T = docs.shape
        t = torch.arange(T, device=docs.device)
        start = torch.ones_like(docs, dtype=torch.bool)
        start[:, 1:] = docs[:, 1:] != docs[:, :-1]
        first = torch.cummax(torch.where(start, t, 0), dim=1).values  # (B, T) index of the document's first token
        self._positions = t - first
        same = docs[:, :, None] == docs[:, None, :]  # (B, T, T)
        self._mask = (same & (t[None, :, None] >= t[None, None, :]))[:, None]  # (B, 1, T, T) causal within a doc

    def positions(self, T: int) -> torch.Tensor:
        return self._positions

    def update(self, layer: int, latent: torch.Tensor):
        return latent, self._mask

    def advance(self, T: int) -> None:
        pass


def sft_loss(model, ids: torch.Tensor, labels: torch.Tensor, docs: torch.Tensor | None, mtp_weight: float):
    """The model's `LossOutput` on a batch; packed rows (`docs` given) go through a `DocumentMask`."""
    if docs is None:
        return model(ids, labels=labels, mtp_weight=mtp_weight)
    return model(ids, labels=labels, cache=DocumentMask(docs), absorb=False, mtp_weight=0.0)


# ---------------------------------------------------------------- the run

@dataclass
class SFTConfig:
    data: str = ""  # chat .jsonl, or task:SPEC (generated traces, e.g. task:arithmetic:digits=2)
    model: str = "tiny"  # a model folder (Hugging Face layout) or a preset name (random init)
    tokenizer: str = ""  # tokenizer folder; default: the model folder's, or (preset) train one on the data
    vocab_size: int = 320  # BPE vocabulary when a tokenizer is trained on the data
    out_dir: str = "runs/sft"
    examples: int = 2000  # chats generated for task:SPEC data
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    pack: bool = True
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # only without packing (see the module docstring)
    balance_gamma: float = 1e-3  # aux-loss-free routing bias speed, as in pretraining
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    threads: int = 0  # CPU threads; 0: the idle cores
    progress: bool = True


def load_model_and_tokenizer(model: str, tokenizer: str = "", device: str = "cpu", texts=None, vocab_size: int = 320,
                             seed: int = 0):
    """(model, tokenizer) from a model folder, or a preset initialised with `seed` and sized to the tokenizer
    (given, or trained on `texts`)."""
    import qiusuo
    from qiusuo.config import PRESETS
    from qiusuo.data.tokenizer import Tokenizer

    if Path(model).is_dir():
        tok = Tokenizer.from_dir(tokenizer or model)
        return qiusuo.load_model(model, device=device, progress=False), tok
    if model not in PRESETS:
        raise ValueError(f"--model {model!r} is neither a model folder nor a preset ({', '.join(PRESETS)})")
    if tokenizer:
        tok = Tokenizer.from_dir(tokenizer)
    elif texts is not None:
        tok = Tokenizer.train(texts, vocab_size)
    else:
        raise ValueError(f"--model {model} is a preset; pass --tokenizer DIR (or SFT data to train one on)")
    cfg = qiusuo.get_config(model, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                            pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    m = qiusuo.Transformer(cfg)
    m.reset_parameters(seed)
    return m.to(device), tok


def _toml(cfg) -> str:
    """A flat TOML record of the run (saved as run.toml in every checkpoint)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in asdict(cfg).items())


def run_sft(cfg: SFTConfig, resume: str | None = None) -> dict:
    """The whole job; returns a summary (steps, final loss, tokens/s, where the model went)."""
    from qiusuo.model.moe import update_balance_bias
    from qiusuo.train import checkpoint as ckpt
    from qiusuo.train.config import ScheduleSection
    from qiusuo.train.metrics import MetricsLog, plot_run
    from qiusuo.train.optim import lr_factor, param_groups, set_lr
    from qiusuo.train.trainer import cpu_threads

    torch.set_num_threads(cpu_threads(cfg.threads))
    if not cfg.data:
        raise ValueError("pass --data FILE.jsonl or --data task:SPEC")
    chats = task_chats(cfg.data[5:], cfg.examples, cfg.seed) if cfg.data.startswith("task:") else read_chats(cfg.data)
    texts = None
    if not Path(cfg.model).is_dir() and not cfg.tokenizer:
        # digits are blanked out so no merge ever joins them: numbers stay one token per digit (as in LLaMA's and
        # DeepSeek's tokenizers), which is what lets a small model learn place-value arithmetic
        texts = [re.sub(r"[0-9]", " ", m["content"]) for _, msgs in chats for m in msgs]
    model, tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer, texts=texts, vocab_size=cfg.vocab_size, seed=cfg.seed)
    examples = []
    for line, msgs in chats:
        try:
            ids, train = tokenize_chat(tok, msgs)
        except Exception as e:
            raise ChatDataError(f"{cfg.data}:{line}: {e}") from None
        examples.append(Example(ids, train, line))
    random.Random(cfg.seed).shuffle(examples)
    ids, labels, docs = build_rows(examples, cfg.seq_len, tok.pad_id if tok.pad_id is not None else 0, cfg.pack)
    N = ids.shape[0]
    B = min(cfg.batch_size, N)

    sched = ScheduleSection(kind="cosine", warmup_steps=cfg.warmup_steps, min_lr_ratio=0.1)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    out = Path(cfg.out_dir)
    step = 0
    if resume:
        step = ckpt.load(resume, model, opt)["step"]
    log = MetricsLog(out, resume_step=step if resume else None, tensorboard=False)
    (out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    last = {}
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", disable=not cfg.progress, file=sys.stderr)
    while step < cfg.steps:
        epoch, k = divmod(step * B, N)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = order[k:k + B] if k + B <= N else order[-B:]  # a whole batch from this epoch's order
        lr = cfg.lr * lr_factor(sched, step, max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        set_lr(opt, lr)
        outp = sft_loss(model, ids[idx], labels[idx], docs[idx] if cfg.pack else None, cfg.mtp_weight)
        outp.loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        if not (math.isfinite(float(outp.loss.detach())) and math.isfinite(gn)):
            raise RuntimeError(f"loss or gradient norm is not finite at step {step + 1}; lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_balance_bias(model, cfg.balance_gamma)
        step += 1
        tokens += int((labels[idx] != IGNORE_INDEX).sum())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            el = time.perf_counter() - t0
            last = dict(loss=float(outp.loss.detach()), ce=float(outp.ce), mtp=float(outp.mtp), lr=lr, grad_norm=gn,
                        tokens_per_s=tokens / el)
            log.log("train", step, **last)
            bar.set_postfix(loss=f"{last['ce']:.3f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            ckpt.save(out, step, model, opt, {"step": step}, _toml(cfg), keep=2)
    bar.close()
    ckpt.save(out, step, model, opt, {"step": step}, _toml(cfg), keep=2)
    log.close()
    with warnings.catch_warnings():  # plot_run's validation panel is empty here (SFT has no val split)
        warnings.simplefilter("ignore", UserWarning)
        plot_run(out)
    from qiusuo.hf import save_hf

    final = save_hf(model, out / "model", tokenizer=tok, progress=False)
    return {"steps": step, "rows": N, "chats": len(examples), "target_tokens_per_s": last.get("tokens_per_s"),
            "final_ce": last.get("ce"), "model": str(final), "seconds": round(time.perf_counter() - t0, 1)}


def add_args(p: argparse.ArgumentParser) -> None:
    d = SFTConfig()
    p.add_argument("--data", required=True, help="chat .jsonl ({\"messages\": [...]} per line) or task:SPEC, e.g. "
                   "task:arithmetic:digits=2 (generated worked traces)")
    p.add_argument("--model", default=d.model, help="model folder (Hugging Face layout) or preset name (random init)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer folder; default: the model folder's, or for a "
                   "preset a byte-level BPE trained on the data")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary when training a tokenizer")
    p.add_argument("--out-dir", default=d.out_dir, help="checkpoints, metrics.jsonl, loss.png, final model in model/")
    p.add_argument("--examples", type=int, default=d.examples, help="chats generated for task:SPEC data")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    p.add_argument("--no-pack", dest="pack", action="store_false", help="one chat per row (default: pack several, "
                   "attention kept within each chat)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="MTP loss weight (only with --no-pack)")
    p.add_argument("--balance-gamma", type=float, default=d.balance_gamma, help="routing bias update speed")
    p.add_argument("--seed", type=int, default=d.seed, help="init, data order, generated data")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics lines")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints (0: end only)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (0: the idle cores)")
    p.add_argument("--resume", default=None, help="run folder or checkpoint to continue from")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from qiusuo.train.checkpoint import CheckpointError

    kw = {k: v for k, v in vars(args).items() if k in SFTConfig.__dataclass_fields__}
    try:
        summary = run_sft(SFTConfig(**kw), resume=args.resume)
    except (ValueError, FileNotFoundError, CheckpointError, RuntimeError) as e:
        print(f"qiusuo sft: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
