"""The pretraining loop: token shards -> AdamW steps on a `Transformer`, with evaluation, samples, checkpoints,
metrics and plots. `Trainer(run_cfg).train()` is the whole job; `qiusuo train` and `qiusuo demo` call it.

One optimizer step = `grad_accum` micro-batches of (batch_size, seq_len) tokens per rank; then gradient clipping,
the learning rate for this step, `AdamW.step`, and the aux-loss-free balancing update (once per optimizer step,
from the token counts of all micro-batches, summed over ranks).

Exact resume: everything a step depends on is saved (weights and the routers' bias buffers, AdamW state, the
loader's position, RNG states, the step); the learning rate is a pure function of the step (or of elapsed time
under a time budget), so an interrupted and resumed step-budget run on CPU in fp32 repeats the same losses bit for bit.

Distributed training plugs in through `dist` (`qiusuo.train.distributed.Distributed`, built under torchrun), an
object with `rank`, `world_size`, `device`, `wrap(model, unused) -> model` (DDP/FSDP/expert parallel applied from
outside the model; `unused`: names of parameters this run never gives a gradient), `all_reduce_sum(tensor)` (in place), `finish_grads(model)`, `clip_grad_norm(params, max_norm)` and
`full_state` / `load_full_state` (checkpoints in the one-process layout). Rank 0 alone writes checkpoints, metrics,
plots and samples; gathering the full state for them is collective, so every rank takes part.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qiusuo.config import count_params
from qiusuo.data.shards import BatchLoader, TokenShards, unigram_bits_per_byte
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.model.moe import update_balance_bias
from qiusuo.model.transformer import Transformer
from qiusuo.perf.common import matmul_peak, train_flops_per_token
from qiusuo.train import checkpoint as ckpt
from qiusuo.train.config import RunConfig
from qiusuo.train.metrics import MetricsLog, plot_run
from qiusuo.train.optim import build_optimizer, lr_factor, set_lr


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; nothing from that step was applied."""


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy, nats per token
    bpb: float  # bits per byte of the source text
    tokens: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device={name!r} but CUDA is not available; use --run.device=cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. "auto": bf16 on CUDA, fp32 on CPU (see config.py)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bf16" else None


def cpu_threads(requested: int) -> int:
    """`requested`, or for 0 the cores left idle by other work (1-minute load average), at least 1.

    Why: torch's OpenMP threads wait for each other after every op; when other processes hold the cores, each
    wait costs a scheduler slice. Measured on 2 shared cores at load ~7: a `tiny` training step took 10 s with 2
    threads and 1.75 s with 1."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy + 1)))


class Trainer:
    def __init__(self, cfg: RunConfig, dist=None, resume: str | Path | None = None):
        cfg.validate()
        self.cfg, self.dist = cfg, dist
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        self.is_main = self.rank == 0
        self.device = dist.device if dist else resolve_device(cfg.run.device)
        self.autocast_dtype = resolve_precision(cfg.run.precision, self.device)
        self.out_dir = Path(cfg.run.out_dir)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.run.threads))

        data_dir = Path(cfg.data.dir)
        self.train_shards = TokenShards(data_dir / "train")
        self.val_shards = TokenShards(data_dir / "val")
        self.tokenizer = Tokenizer.from_dir(data_dir) if (data_dir / "tokenizer.json").is_file() else None
        vocab = self.train_shards.manifest["vocab_size"]
        self.model_cfg = cfg.model.build(vocab_size=vocab)
        if self.model_cfg.vocab_size < vocab:
            raise ValueError(f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the data's vocabulary "
                             f"({vocab}); drop the override or re-run `qiusuo prepare --vocab-size`")
        if self.tokenizer is not None:
            self.model_cfg = self.model_cfg.replace(bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id,
                                                    pad_token_id=self.tokenizer.pad_id)

        torch.manual_seed(cfg.run.seed)
        self.model = Transformer(self.model_cfg)
        self.model.reset_parameters(cfg.run.seed)
        self.model.to(self.device).train()
        self.model.set_balance_alpha(cfg.balance.alpha)
        # before the optimizer: wrapping swaps parameters; MTP modules get no gradient when their loss is off
        unused = [] if cfg.train.mtp_weight > 0 else [n for n, _ in self.model.named_parameters() if n.startswith("mtp.")]
        wrapped = dist.wrap(self.model, unused=unused) if dist else self.model
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.forward = torch.compile(wrapped) if cfg.run.compile else wrapped
        self.loader = BatchLoader(self.train_shards, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.run.seed,
                                  rank=self.rank, world_size=self.world_size)
        self.step, self.elapsed = 0, 0.0
        self.resumed_from = None
        if resume is not None:
            if dist is None:
                state = ckpt.load(resume, self.model, self.optimizer)
            else:  # every rank reads the full checkpoint and keeps its pieces
                full = Transformer(self.model_cfg)
                state = ckpt.load(resume, full, None)
                osd = torch.load(Path(state["path"]) / "optimizer.pt", map_location="cpu", weights_only=True)
                dist.load_full_state(self.model, self.optimizer, full.state_dict(), osd)
            self.step, self.elapsed = state["step"], state["elapsed"]
            self.loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
            self.resumed_from = state["path"]
        self.last_checkpoint: Path | None = Path(self.resumed_from) if self.resumed_from else None

        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * self.world_size
        with_mtp = cfg.train.mtp_weight > 0 and self.model_cfg.num_nextn_predict_layers > 0
        active = count_params(self.model_cfg, include_mtp=with_mtp)["active"]
        self.flops_per_token = train_flops_per_token(self.model_cfg, cfg.data.seq_len, active)
        self._peak = None

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def progress(self) -> float:
        """Share of the run done, driving the schedule: elapsed/budget under a time budget, else steps after
        warmup over the steps after warmup."""
        t, s = self.cfg.train, self.cfg.schedule
        if t.minutes > 0:
            return self.elapsed / (60 * t.minutes)
        return max(0, self.step - s.warmup_steps) / max(1, t.steps - s.warmup_steps)

    def lr(self) -> float:
        return self.cfg.optim.lr * lr_factor(self.cfg.schedule, self.step, self.progress())

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist is not None:
            self.dist.all_reduce_sum(t)
        return t

    def train_step(self) -> dict:
        """One optimizer step. Raises `TrainingDiverged` before touching the weights if the loss or the gradient
        norm is not finite."""
        cfg = self.cfg
        self.model.train()
        sums = torch.zeros(3, device=self.device)  # loss, ce, mtp summed over micro-batches
        for _ in range(cfg.train.grad_accum):
            x, y = next(self.loader)  # (B, T), (B, T)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.forward(x, labels=y, mtp_weight=cfg.train.mtp_weight)
            (out.loss / cfg.train.grad_accum).backward()
            sums += torch.stack([out.loss.detach(), out.ce, out.mtp]).float()
        sums = self._all_reduce(sums) / (cfg.train.grad_accum * self.world_size)
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        if self.dist is not None:
            self.dist.finish_grads(self.model)
            grad_norm = self.dist.clip_grad_norm(list(self.model.parameters()), clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss, ce, mtp = sums.tolist()
        gn = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(gn)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gn}"
            keep = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise TrainingDiverged(f"{what} at step {self.step + 1}; training stopped and nothing from that step was "
                                   f"applied; {keep}. Resume from it with a lower --optim.lr or more --schedule.warmup_steps")
        lr = self.lr()
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = update_balance_bias(self.model, self.cfg.balance.gamma,
                                      all_reduce=self.dist.all_reduce_sum if self.dist else None)
        self.step += 1
        return {"loss": loss, "ce": ce, "mtp": mtp, "lr": lr, "grad_norm": gn, **balance}

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> EvalResult:
        """Mean validation cross-entropy over the first `batches` batches of the validation split in order
        (None: all of it), and bits per byte = loss / ln 2 / (bytes per token of the validation manifest)."""
        self.model.eval()
        T = self.cfg.data.seq_len
        windows = (len(self.val_shards) - 1) // T
        B = max(1, min(self.cfg.data.batch_size, windows // self.world_size))
        loader = BatchLoader(self.val_shards, B, T, shuffle=False, rank=self.rank, world_size=self.world_size)
        n = loader.steps_per_epoch if batches is None else min(batches, loader.steps_per_epoch)
        total = torch.zeros(2, device=self.device, dtype=torch.float64)  # summed nats, tokens
        for _ in range(n):
            x, y = next(loader)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.model(x, labels=y, mtp_weight=0.0)
            total += torch.tensor([out.ce.item() * y.numel(), y.numel()], device=self.device, dtype=torch.float64)
        total = self._all_reduce(total)
        self.model.train()
        loss = float(total[0] / total[1])
        return EvalResult(loss, loss / math.log(2) / self.val_shards.bytes_per_token, int(total[1]))

    def gathered(self) -> tuple[torch.nn.Module | None, dict | None]:
        """(model, optimizer state dict) in the one-process layout. Under `dist` a full CPU copy on rank 0 and
        (None, None) elsewhere, collective: every rank must call it; alone, the live model and optimizer state."""
        if self.dist is None:
            return self.model, self.optimizer.state_dict()
        sd, osd = self.dist.full_state(self.model, self.optimizer)
        if sd is None:
            return None, None
        model = Transformer(self.model_cfg)
        model.load_state_dict(sd)
        model.set_balance_alpha(self.cfg.balance.alpha)
        return model, osd

    @torch.no_grad()
    def samples(self, model: torch.nn.Module | None = None) -> list[dict]:
        """Continuations of the configured prompts (temperature 0.8, seeded: the same run gives the same text).
        `model`: a gathered copy under `dist` (a sharded model cannot generate on rank 0 alone)."""
        if self.tokenizer is None:
            return []
        model = model if model is not None else self.model
        device = next(model.parameters()).device
        model.eval()
        gen = torch.Generator(device=device).manual_seed(self.cfg.run.seed)
        out = []
        for prompt in self.cfg.eval.prompts:
            ids = torch.tensor([self.tokenizer.encode(prompt, parse_special=False)], device=device)
            room = self.model_cfg.max_position_embeddings - ids.shape[1]
            with self._autocast():
                seq = model.generate(ids, min(self.cfg.eval.sample_tokens, room), temperature=0.8,
                                          eos_token_id=self.tokenizer.eos_id, generator=gen)
            out.append({"prompt": prompt, "text": self.tokenizer.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True)})
        self.model.train()
        return out

    def save_checkpoint(self, gathered: tuple | None = None) -> Path:
        """Collective under `dist` (gathers the full state unless `gathered` is given); rank 0 writes."""
        model, opt_state = gathered if gathered is not None else self.gathered()
        if not self.is_main:
            self.last_checkpoint = self.out_dir / "checkpoints" / f"{ckpt.PREFIX}{self.step:06d}"
            return self.last_checkpoint
        state = {"step": self.step, "elapsed": self.elapsed, "loader": self.loader.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        path = ckpt.save(self.out_dir, self.step, model, opt_state, state, self.cfg.to_toml(), self.cfg.checkpoint.keep)
        self.last_checkpoint = path
        return path

    def export(self, model: torch.nn.Module | None = None) -> Path:
        """The final model (`model`: a gathered copy under `dist`) as a self-contained Hugging Face folder
        (weights, config.json, tokenizer) for `qiusuo generate/chat/serve` and transformers."""
        return ckpt.save_weights(model if model is not None else self.model, self.out_dir / "model", tokenizer=self.tokenizer)

    def _mfu(self, tokens_per_s: float) -> float:
        if self._peak is None:
            self._peak = matmul_peak(self.device, self.autocast_dtype or torch.float32, n=1024, repeats=3)
        return tokens_per_s * self.flops_per_token / self._peak

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run to `train.steps` or until `train.minutes` are spent; returns a summary (final validation loss and
        bits per byte, the unigram baseline, paths of plots, samples, checkpoint and exported model)."""
        cfg, t = self.cfg, self.cfg.train
        budget = 60 * t.minutes if t.minutes > 0 else None
        log = MetricsLog(self.out_dir, resume_step=self.step if self.resumed_from else None) if self.is_main else None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "run.toml").write_text(cfg.to_toml())
        unigram = unigram_bits_per_byte(self.train_shards, self.val_shards, self.model_cfg.vocab_size)
        self._mfu(1.0)  # measure the peak before the clock starts
        bar = tqdm(total=round(budget) if budget else t.steps, initial=round(self.elapsed) if budget else self.step,
                   unit="s" if budget else "step", desc="train", file=sys.stderr, dynamic_ncols=True,
                   disable=not (cfg.run.progress and self.is_main))
        window_t, window_steps, window_load, window_vio = time.perf_counter(), 0, None, []
        stopped = "steps"
        try:
            while self.step < t.steps:
                if budget is not None and self.elapsed >= budget:
                    stopped = "time"
                    break
                start = time.perf_counter()
                m = self.train_step()
                window_steps += 1
                if m["load"]:
                    loads = torch.tensor(m["load"])
                    window_load = loads if window_load is None else window_load + loads
                    window_vio.append(m["max_vio"])
                # the last step of the run: log it, and leave evaluation and the checkpoint to the end of the run
                last = self.step == t.steps or (budget is not None and self.elapsed + time.perf_counter() - start >= budget)
                if self.step % t.log_every == 0 or last:
                    now = time.perf_counter()
                    tps = window_steps * self.tokens_per_step / max(now - window_t, 1e-9)
                    mfu = self._mfu(tps)
                    if log:
                        vio = torch.tensor(window_vio).mean(0).tolist() if window_vio else []
                        log.log("train", self.step, loss=m["loss"], ce=m["ce"], mtp=m["mtp"], lr=m["lr"],
                                grad_norm=m["grad_norm"], tokens_per_s=tps, mfu=mfu, max_vio=vio,
                                load=window_load.tolist() if window_load is not None else [])
                    bar.set_postfix(step=self.step, loss=f"{m['ce']:.3f}", tok_s=f"{tps:.0f}", mfu=f"{100 * mfu:.1f}%")
                    window_t, window_steps, window_load, window_vio = now, 0, None, []
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                    ev = self.evaluate(cfg.eval.batches)
                    if log:
                        log.log("val", self.step, loss=ev.loss, bpb=ev.bpb, tokens=ev.tokens)
                    bar.write(f"step {self.step}: val loss {ev.loss:.4f}, {ev.bpb:.4f} bits/byte (unigram {unigram:.4f})")
                if cfg.eval.sample_every and self.step % cfg.eval.sample_every == 0 and self.tokenizer is not None:
                    model = self.gathered()[0] if self.dist is not None else None  # collective
                    for s in self.samples(model) if self.is_main else []:
                        log.log("sample", self.step, **s)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not last:
                    self.save_checkpoint()
                self.elapsed += time.perf_counter() - start
                if budget:
                    bar.n = min(round(self.elapsed), bar.total)
                    bar.refresh()
                else:
                    bar.update(1)
        except TrainingDiverged:
            bar.close()
            if log:
                log.close()
            raise
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint()
            if self.is_main:
                print(f"\ninterrupted at step {self.step}; saved {path} (continue with --resume {self.out_dir})", file=sys.stderr)
            if log:
                log.close()
            raise
        bar.close()
        final = self.evaluate(None)
        summary = {"steps": self.step, "stopped_by": stopped, "tokens": self.step * self.tokens_per_step,
                   "train_seconds": self.elapsed, "val_loss": final.loss, "val_bpb": final.bpb,
                   "val_tokens": final.tokens, "unigram_bpb": unigram}
        gathered = self.gathered()  # collective under dist
        if self.is_main:
            log.log("val", self.step, loss=final.loss, bpb=final.bpb, tokens=final.tokens)
            samples = self.samples(gathered[0] if self.dist is not None else None)
            for s in samples:
                log.log("sample", self.step, **s)
            log.close()
            summary.update(checkpoint=str(self.save_checkpoint(gathered)), model=str(self.export(gathered[0])),
                           plots=[str(p) for p in plot_run(self.out_dir, unigram)], samples=samples)
        return summary
