"""The training loop: batches from a source -> optimizer steps through the one train step
(`qiusuo.train.step.TrainStep`), with evaluation, samples, checkpoints, metrics and plots.
`Trainer(run_cfg).train()` is the whole job; `qiusuo train`, `qiusuo demo` and `qiusuo sft` call it.

The batch source is the only thing that differs between pretraining and SFT: `TokenSource` (token shards from
`qiusuo prepare`, next-token labels, a validation split) or SFT's chat source (`qiusuo.rl.sft.ChatSource`:
packed chats, assistant-only labels, per-document attention). A source provides `tokenizer`,
`model_config(model_section)`, `init_model(model_cfg, seed)`, `tokens_per_batch`, `next_batch()`,
`loss(forward, batch, run_cfg) -> LossOutput`, `state_dict()`/`load_state_dict()` (exact resume), and
`val_shards` (None: no evaluation).

One optimizer step = `grad_accum` micro-batches per rank; then the step does gradient clipping, the learning
rate for this step, the optimizer step, and the aux-loss-free balancing update (once per optimizer step, from the
loads of all micro-batches, summed over ranks).

Exact resume: everything a step depends on is saved (weights and the routers' bias buffers, optimizer state, the
source's position, RNG states, the step); the learning rate is a pure function of the step (or of elapsed time
under a time budget), so an interrupted and resumed step-budget run on CPU in fp32 repeats the same losses bit for bit.

Distributed training plugs in through `dist` (`qiusuo.train.distributed.Distributed`, built under torchrun), an
object with `rank`, `world_size`, `device`, `wrap(model, unused) -> model` (DDP/FSDP/expert parallel applied from
outside the model; `unused`: names of parameters this run never gives a gradient), `all_reduce_sum(tensor)` (in
place), `finish_grads(model)`, `clip_grad_norm(params, max_norm)` and `full_state` / `load_full_state` (checkpoints
in the one-process layout). Rank 0 alone writes checkpoints, metrics, plots and samples; gathering the full state
for them is collective, so every rank takes part.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qiusuo.data.shards import BatchLoader, TokenShards, unigram_bits_per_byte
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.model.count import count_params, train_flops_per_token
from qiusuo.model.transformer import Transformer
from qiusuo.runtime import (Interrupted, matmul_peak, max_rss_bytes, precision_choice, resolve_device, set_threads,
                            stop_on_interrupt)
from qiusuo.train import checkpoint as ckpt
from qiusuo.train import rundir
from qiusuo.train.config import DataSection, ModelSection, RunConfig
from qiusuo.train.metrics import MetricsLog, plot_run
from qiusuo.train.optim import build_optimizer, lr_factor, trainable
from qiusuo.train.precision import ComputeCopy
from qiusuo.train.qat import set_fp4_qat
from qiusuo.train.step import TrainingDiverged, TrainStep

__all__ = ["EvalResult", "Interrupted", "TokenSource", "Trainer", "TrainingDiverged"]


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy, nats per token
    bpb: float  # bits per byte of the source text
    tokens: int


def random_model(model_cfg, seed: int) -> Transformer:
    """A freshly initialised model (seeded: the same run starts from the same weights)."""
    torch.manual_seed(seed)
    model = Transformer(model_cfg)
    model.reset_parameters(seed)
    return model


class TokenSource:
    """Pretraining batches: windows of `seq_len` tokens from the prepared shards (`qiusuo prepare`), labels the
    next token; the validation split is evaluated in order."""

    def __init__(self, data: DataSection, seed: int, rank: int = 0, world_size: int = 1):
        data_dir = Path(data.dir)
        if not (data_dir / "train").is_dir():
            raise FileNotFoundError(f"data.dir = {data_dir} holds no prepared data (no train/ folder); make it with "
                                    f"`qiusuo prepare --out {data_dir}`, or point --data.dir at the folder where "
                                    f"it was prepared")
        self.train_shards = TokenShards(data_dir / "train")
        self.val_shards = TokenShards(data_dir / "val")
        self.tokenizer = Tokenizer.from_dir(data_dir) if (data_dir / "tokenizer.json").is_file() else None
        self.vocab_size = self.train_shards.manifest["vocab_size"]
        self.loader = BatchLoader(self.train_shards, data.batch_size, data.seq_len, seed=seed, rank=rank,
                                  world_size=world_size)
        self.tokens_per_batch = data.batch_size * data.seq_len

    def model_config(self, model: ModelSection):
        cfg = model.build(vocab_size=self.vocab_size)
        if cfg.vocab_size < self.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the data's vocabulary "
                             f"({self.vocab_size}); drop the override or re-run `qiusuo prepare --vocab-size`")
        tok = self.tokenizer
        return cfg if tok is None else cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)

    init_model = staticmethod(random_model)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.loader)  # (B, T), (B, T)

    @staticmethod
    def loss(forward, batch, cfg: RunConfig):
        x, y = batch
        return forward(x, labels=y, mtp_weight=cfg.train.mtp_weight, balance_alpha=cfg.balance.alpha)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


class Trainer:
    """`Trainer(cfg).train()`. `resume`: a run folder or checkpoint to continue (with `train.extra_minutes` /
    `extra_steps` set, past its budget: `_extend`); `overwrite`: a new run may replace the run already in
    `run.out_dir` (otherwise `train` refuses to start there: `qiusuo.train.rundir`)."""

    def __init__(self, cfg: RunConfig, dist=None, resume: str | Path | None = None, source=None,
                 overwrite: bool = False):
        cfg.validate()
        cfg.absolute_paths()  # the recorded run.toml then works from any working directory
        self.cfg, self.dist, self.overwrite = cfg, dist, overwrite
        self.rank, self.world_size = (dist.rank, dist.world_size) if dist else (0, 1)
        self.is_main = self.rank == 0
        self.device = dist.device if dist else resolve_device(cfg.run.device)
        self.out_dir = Path(cfg.run.out_dir)
        self.threads = set_threads(self.device, cfg.run.threads, announce=self.is_main)
        # "auto" measures the matmul peaks at these threads; the record goes into the run's log
        self.precision, self.precision_record = precision_choice(cfg.run.precision, self.device)

        self.source = source or TokenSource(cfg.data, cfg.run.seed, self.rank, self.world_size)
        self.tokenizer = self.source.tokenizer
        self.model_cfg = self.source.model_config(cfg.model)
        self.model = self.source.init_model(self.model_cfg, cfg.run.seed)
        self.model.to(self.device).train()
        self.lora_base = self._add_adapters() if cfg.lora.rank else None
        # before the optimizer: wrapping swaps parameters; MTP modules get no gradient when their loss is off
        unused = [] if cfg.train.mtp_weight > 0 else [n for n, _ in self.model.named_parameters() if n.startswith("mtp.")]
        wrapped = dist.wrap(self.model, unused=unused) if dist else self.model
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # bf16 in one process: forward and backward on a bf16 copy, the model its fp32 master weights
        # (`qiusuo.train.precision`); several processes keep autocast, since the wrappers own the parameters (FSDP
        # casts by its own mixed-precision policy)
        self.compute = ComputeCopy(self.model, self.precision) if self.precision is not None and not dist else None
        self.autocast_dtype = self.precision if self.compute is None else None
        run = self.compute.module if self.compute is not None else wrapped
        self.forward = torch.compile(run) if cfg.run.compile else run
        # a frozen router's bias is the base's: it moves only when the router trains (and is saved with it)
        gamma = cfg.balance.gamma if not cfg.lora.rank or cfg.lora.router else 0.0
        self.step_fn = TrainStep(self.model, self.optimizer, grad_clip=cfg.train.grad_clip, gamma=gamma,
                                 dist=dist, autocast=self.autocast_dtype, compute=self.compute,
                                 on_diverged=self._advice)
        self.elapsed = 0.0
        self._fp4_qat = False
        self.resumed_from = None
        if resume is not None:
            self._resume(resume)
        self.last_checkpoint: Path | None = Path(self.resumed_from) if self.resumed_from else None

        self.tokens_per_step = self.source.tokens_per_batch * cfg.train.grad_accum * self.world_size
        with_mtp = cfg.train.mtp_weight > 0 and self.model_cfg.num_nextn_predict_layers > 0
        active = count_params(self.model_cfg, include_mtp=with_mtp)["active"]
        self.flops_per_token = train_flops_per_token(self.model_cfg, cfg.data.seq_len, active)

    def _add_adapters(self) -> str:
        """`[lora]`: adapters over the source's model folder, frozen in the format it was loaded in. Returns that
        folder (the base an adapter names)."""
        from qiusuo.lora.train import prepare

        base = getattr(self.source, "init", "")
        if not base:
            raise ValueError(f"lora.rank={self.cfg.lora.rank}: adapters adapt a trained model; pass its folder "
                             f"(--model DIR: sft.init)")
        prepare(self.model, self.cfg.lora, self.cfg.run.seed)
        return str(base)

    def _resume(self, resume: str | Path) -> None:
        if self.dist is None:
            state = ckpt.load(resume, self.model, self.optimizer)
        else:  # every rank reads the full checkpoint and keeps its pieces
            full = Transformer(self.model_cfg)
            state = ckpt.load(resume, full, None)
            osd = torch.load(Path(state["path"]) / "optimizer.pt", map_location="cpu", weights_only=True)
            self.dist.load_full_state(self.model, self.optimizer, full.state_dict(), osd)
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.source.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.resumed_from = state["path"]
        if self.compute is not None:
            self.compute.sync()
        self._extend()

    def _extend(self) -> None:
        """"Train longer": `train.extra_minutes` (a run budgeted in minutes) or `extra_steps` (in steps) adds to the
        budget, and the learning rate from here on is a tail that decays linearly from the rate the run stopped at
        to `min_lr_ratio` of it (`lr_factor`'s tail), rather than the run's cosine re-stretched over the longer
        budget, which sent a finished demo's rate from 0.0012 back up to 0.0113 and its loss up with it. The tail
        is recorded in the config (`schedule.tail_from`, `tail_lr`) and the extra budget folded into the totals,
        so a later plain `--resume` continues the same schedule."""
        t, s = self.cfg.train, self.cfg.schedule
        if not (t.extra_minutes or t.extra_steps):
            return
        timed = t.minutes > 0
        if timed and t.extra_steps or not timed and t.extra_minutes:
            have, other = ("minutes", "extra_minutes") if timed else ("steps", "extra_steps")
            raise ValueError(f"this run is budgeted in {have} (train.{have}="
                             f"{t.minutes if timed else t.steps:g}); add to it with --train.{other}")
        start_lr = self.lr() / self.cfg.optim.lr  # where it stopped, under the old budget
        if timed:
            t.minutes += t.extra_minutes
        else:
            t.steps += t.extra_steps
        s.tail_from = max(self.position(), 0.0 if timed else float(s.warmup_steps))
        s.tail_lr = start_lr if self.step >= s.warmup_steps else 1.0
        t.extra_minutes, t.extra_steps = 0.0, 0

    @property
    def net(self) -> torch.nn.Module:
        """The module the forward runs: the bf16 compute copy in bf16 (one process), else the model."""
        return self.compute.module if self.compute is not None else self.model

    @property
    def step(self) -> int:
        """Optimizer steps taken (counted by the train step, restored on resume)."""
        return self.step_fn.steps

    @step.setter
    def step(self, value: int) -> None:
        self.step_fn.steps = value

    def _advice(self) -> str:
        keep = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        return f"; {keep}. Resume from it with a lower --optim.lr or more --schedule.warmup_steps"

    # ------------------------------------------------------------------ pieces
    def progress(self) -> float:
        """Share of the run done, driving the schedule: elapsed/budget under a time budget, else steps after
        warmup over the steps after warmup."""
        t, s = self.cfg.train, self.cfg.schedule
        if t.minutes > 0:
            return self.elapsed / (60 * t.minutes)
        return max(0, self.step - s.warmup_steps) / max(1, t.steps - s.warmup_steps)

    def position(self) -> float:
        """Where the run is in its budget's unit: elapsed seconds under a time budget, else optimizer steps."""
        return self.elapsed if self.cfg.train.minutes > 0 else float(self.step)

    def budget_end(self) -> float:
        t = self.cfg.train
        return 60 * t.minutes if t.minutes > 0 else float(t.steps)

    def finished(self) -> bool:
        return self.step >= self.cfg.train.steps or (self.cfg.train.minutes > 0 and self.elapsed >= self.budget_end())

    def lr(self) -> float:
        return self.cfg.optim.lr * lr_factor(self.cfg.schedule, self.step, self.progress(), self.position(),
                                             self.budget_end())

    def train_step(self) -> dict:
        """One optimizer step on `grad_accum` micro-batches from the source. Raises `TrainingDiverged` before
        touching the weights if the loss or the gradient norm is not finite."""
        self.net.train()
        self.set_fp4_qat()
        for m in self.net.modules():  # DeepSeek-V3.2's dense warm-up, then sparse training (qiusuo.model.dsa)
            if hasattr(m, "dense_warmup"):
                m.dense_warmup = self.step < self.cfg.train.indexer_warmup_steps
        batches = [tuple(t.to(self.device, non_blocking=True) for t in self.source.next_batch())
                   for _ in range(self.cfg.train.grad_accum)]
        return self.step_fn(batches, lambda b: self.source.loss(self.forward, b, self.cfg), self.lr())

    def set_fp4_qat(self) -> bool:
        """FP4 quantisation-aware training of the routed experts (`qiusuo.train.qat`) on from `train.fp4_qat_from`
        of the run: a function of progress, so a resumed run switches at the same step. Returns whether it is on."""
        on = self.cfg.train.fp4_qat and self.progress() >= self.cfg.train.fp4_qat_from
        if on != self._fp4_qat:
            set_fp4_qat(self.net, on)
            self._fp4_qat = on
        return on

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> EvalResult | None:
        """Mean validation cross-entropy over `batches` batches spread evenly over the validation split (None:
        all of it, in order), and bits per byte = loss / ln 2 / (bytes per token of the validation manifest).
        None when the source has no validation split (SFT).

        Spread, not the first ones: a split's files differ in difficulty. On the stdlib corpus at batch 12 the
        first 8 batches scored 1.05 bits per byte at step 500 of a demo whose whole split scored 1.53 at step
        520, so the periodic points of its curve did not lead to the final one."""
        val = getattr(self.source, "val_shards", None)
        if val is None:
            return None
        self.net.eval()
        T = self.cfg.data.seq_len
        windows = (len(val) - 1) // T
        B = max(1, min(self.cfg.data.batch_size, windows // self.world_size))
        loader = BatchLoader(val, B, T, shuffle=False, rank=self.rank, world_size=self.world_size)
        steps = loader.steps_per_epoch
        picked = range(steps) if batches is None or batches >= steps else [i * steps // batches for i in range(batches)]
        total = torch.zeros(2, device=self.device, dtype=torch.float64)  # summed nats, tokens
        for i in picked:
            loader.position = i * loader.global_batch  # the loader's whole state: batch i of the pass
            x, y = next(loader)
            x, y = x.to(self.device), y.to(self.device)
            with self.step_fn.autocast_context():
                out = self.net(x, labels=y, mtp_weight=0.0)
            total += torch.tensor([out.ce.item() * y.numel(), y.numel()], device=self.device, dtype=torch.float64)
        if self.dist is not None:
            self.dist.all_reduce_sum(total)
        self.net.train()
        loss = float(total[0] / total[1])
        return EvalResult(loss, loss / math.log(2) / val.bytes_per_token, int(total[1]))

    def unigram_bpb(self) -> float | None:
        """Bits per byte of the best context-free model of the data: the line to beat (None without val)."""
        src = self.source
        if getattr(src, "val_shards", None) is None:
            return None
        return unigram_bits_per_byte(src.train_shards, src.val_shards, self.model_cfg.vocab_size)

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
        return model, osd

    @torch.no_grad()
    def samples(self, model: torch.nn.Module | None = None) -> list[dict]:
        """Continuations of the configured prompts from the serving engine (temperature 0.8, seeded per prompt:
        the same run gives the same text). `model`: a gathered copy under `dist` (a sharded model cannot
        generate on rank 0 alone)."""
        from qiusuo.infer.engine import Engine
        from qiusuo.infer.sampling import SamplingParams

        prompts = self.cfg.eval.prompts
        if self.tokenizer is None or not prompts:
            return []
        model = model if model is not None else self.model
        ids = [self.tokenizer.encode(p, parse_special=False) for p in prompts]
        longest = max(len(i) for i in ids)
        room = self.model_cfg.max_position_embeddings - longest
        new = max(1, min(self.cfg.eval.sample_tokens, room))
        engine = Engine(model, self.tokenizer, max_batch=len(ids), max_model_len=longest + new)
        params = [SamplingParams(max_tokens=new, temperature=0.8, seed=self.cfg.run.seed + i) for i in range(len(ids))]
        outs = engine.generate(ids, params)
        self.model.train()
        return [{"prompt": p, "text": o.outputs[0].text} for p, o in zip(prompts, outs)]

    def save_checkpoint(self, gathered: tuple | None = None) -> Path:
        """Collective under `dist` (gathers the full state unless `gathered` is given); rank 0 writes."""
        model, opt_state = gathered if gathered is not None else self.gathered()
        if not self.is_main:
            self.last_checkpoint = self.out_dir / "checkpoints" / f"{ckpt.PREFIX}{self.step:06d}"
            return self.last_checkpoint
        state = {"step": self.step, "elapsed": self.elapsed, "loader": self.source.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        path = ckpt.save(self.out_dir, self.step, model, opt_state, state, self.cfg.to_toml(), self.cfg.checkpoint.keep)
        self.last_checkpoint = path
        return path

    def export(self, model: torch.nn.Module | None = None) -> Path:
        """The final model (`model`: a gathered copy under `dist`) as a self-contained Hugging Face folder
        (weights, config.json, tokenizer) for `qiusuo generate/chat/serve` and transformers; a run training
        adapters writes them alone as a peft folder, RUN/adapter (`qiusuo serve --lora`, `qiusuo convert
        --merge-lora`, peft)."""
        if self.lora_base is not None:
            from qiusuo.lora.train import export

            return export(self.model, self.out_dir / "adapter", base=self.lora_base)
        return ckpt.save_weights(model if model is not None else self.model, self.out_dir / "model", tokenizer=self.tokenizer)

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation against this machine's matmul peak (`runtime.matmul_peak`: measured once per
        process and cached, before the clock starts; bf16 at 512: where it is not native, a 1024^3 bf16 matmul takes
        seconds)."""
        peak = matmul_peak(self.device, self.precision or torch.float32, n=512 if self.precision else 1024, repeats=3)
        return tokens_per_s * self.flops_per_token / peak

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run to `train.steps` or until `train.minutes` are spent; returns a summary (final validation loss and
        bits per byte and the unigram baseline when the source has a validation split, paths of plots, samples,
        checkpoint and exported model)."""
        cfg, t = self.cfg, self.cfg.train
        budget = 60 * t.minutes if t.minutes > 0 else None
        if self.resumed_from and self.finished():
            done = f"{t.minutes:g} of {t.minutes:g} minutes" if budget else f"{self.step} of {t.steps} steps"
            if self.is_main:
                print(f"{self.out_dir} is already finished ({done}); to train longer, add "
                      f"--train.{'extra_minutes' if budget else 'extra_steps'}=N", file=sys.stderr)
            return {"steps": self.step, "stopped_by": "already finished", "checkpoint": str(self.resumed_from)}
        if self.is_main:
            if self.resumed_from:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            else:
                rundir.claim(self.out_dir, self.overwrite)
            (self.out_dir / "run.toml").write_text(cfg.to_toml())
        log = MetricsLog(self.out_dir, resume_step=self.step if self.resumed_from else None) if self.is_main else None
        if log:
            log.log("precision", self.step, **self.precision_record)
        unigram = self.unigram_bpb()
        self.mfu(1.0)  # measure the peak before the clock starts
        bar = tqdm(total=round(budget) if budget else t.steps, initial=round(self.elapsed) if budget else self.step,
                   unit="s" if budget else "step", desc="train", file=sys.stderr, dynamic_ncols=True,
                   disable=not (cfg.run.progress and self.is_main))
        try:
            with stop_on_interrupt("step") as stop:
                stopped = self._loop(budget, log, bar, unigram, stop)
        except (TrainingDiverged, KeyboardInterrupt):
            bar.close()
            if log:
                log.close()
            raise
        bar.close()
        if stopped == "interrupted":  # at a step boundary: the checkpoint resumes exactly
            path = self.save_checkpoint()
            if log:
                log.close()
            raise Interrupted(f"interrupted at step {self.step}; saved {path} (continue with --resume {self.out_dir})")
        return self._finish(stopped, log, unigram)

    def _stop_requested(self, stop) -> bool:
        """Ctrl-C seen by this process, or under `dist` by any rank (all stop after the same step)."""
        if self.dist is None:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.device)
        self.dist.all_reduce_sum(flag)
        return bool(flag.item() > 0)

    def _loop(self, budget: float | None, log: MetricsLog | None, bar, unigram: float | None, stop) -> str:
        """Steps until the step or time budget is spent or Ctrl-C (`stop`), with periodic logs, evaluations,
        samples and checkpoints. Returns what stopped it ("steps", "time" or "interrupted")."""
        cfg, t = self.cfg, self.cfg.train
        window = _Window()
        while self.step < t.steps:
            if budget is not None and self.elapsed >= budget:
                return "time"
            start = time.perf_counter()
            m = self.train_step()
            window.add(m)
            # the last step of the run: log it, and leave evaluation and the checkpoint to the end of the run
            last = self.step == t.steps or (budget is not None and self.elapsed + time.perf_counter() - start >= budget)
            if self.step % t.log_every == 0 or last:
                tps, vio, load = window.flush(self.tokens_per_step)
                mfu = self.mfu(tps)
                if log:
                    log.log("train", self.step, loss=m["loss"], ce=m["ce"], mtp=m["mtp"], lr=m["lr"],
                            grad_norm=m["grad_norm"], tokens_per_s=tps, mfu=mfu, max_vio=vio, load=load)
                bar.set_postfix(step=self.step, loss=f"{m['ce']:.3f}", tok_s=f"{tps:.0f}", mfu=f"{100 * mfu:.1f}%")
            if cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                ev = self.evaluate(cfg.eval.batches)
                if ev is not None:
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
            if self._stop_requested(stop) and self.step < t.steps:
                return "interrupted"
        return "steps"

    def _finish(self, stopped: str, log: MetricsLog | None, unigram: float | None) -> dict:
        """Final evaluation (the whole validation split), samples, checkpoint, export and plots."""
        final = self.evaluate(None)
        summary = {"steps": self.step, "stopped_by": stopped, "tokens": self.step * self.tokens_per_step,
                   "train_seconds": self.elapsed, "trainable_params": sum(p.numel() for p in trainable(self.model)),
                   "max_rss_mb": round(max_rss_bytes() / 2**20)}
        if final is not None:
            summary.update(val_loss=final.loss, val_bpb=final.bpb, val_tokens=final.tokens, unigram_bpb=unigram)
        gathered = self.gathered()  # collective under dist
        if self.is_main:
            if final is not None:
                log.log("val", self.step, loss=final.loss, bpb=final.bpb, tokens=final.tokens)
            samples = self.samples(gathered[0] if self.dist is not None else None)
            for s in samples:
                log.log("sample", self.step, **s)
            log.close()
            summary.update(checkpoint=str(self.save_checkpoint(gathered)), model=str(self.export(gathered[0])),
                           plots=[str(p) for p in plot_run(self.out_dir, unigram)], samples=samples)
        return summary


class _Window:
    """Steps since the last log line: their count and wall time (tokens/s), and their routing loads and MaxVio."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t, self.steps, self.load, self.vio = time.perf_counter(), 0, None, []

    def add(self, m: dict) -> None:
        self.steps += 1
        if m["load"]:
            loads = torch.tensor(m["load"])
            self.load = loads if self.load is None else self.load + loads
            self.vio.append(m["max_vio"])

    def flush(self, tokens_per_step: int) -> tuple[float, list, list]:
        now = time.perf_counter()
        tps = self.steps * tokens_per_step / max(now - self.t, 1e-9)
        vio = torch.tensor(self.vio).mean(0).tolist() if self.vio else []
        load = self.load.tolist() if self.load is not None else []
        self.reset()
        return tps, vio, load
