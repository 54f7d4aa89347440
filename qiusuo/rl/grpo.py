"""`qiusuo grpo`: group relative policy optimisation with rule-based rewards (DeepSeekMath, DeepSeek-R1).

One step: draw P prompts from the task's train split; sample G completions each on the serving engine
(`qiusuo.rl.rollout`); score them with the reward functions (`qiusuo.rl.rewards`); advantages within each group
`A = (r - mean(r)) / (std(r) + adv_eps)` (std unbiased, as in TRL); then `mu` optimizer steps on the batch with

    ratio = pi / pi_old (per token),  J = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL_k3
    KL_k3 = pi_ref / pi - log(pi_ref / pi) - 1   (unbiased, always >= 0; John Schulman's k3 estimator)

and loss = -J averaged either over all completion tokens of the batch (`token`, DAPO / TRL `bnpo`: long
completions weigh more) or per completion then over completions (`sequence`, the GRPO paper's 1/|o_i|).

pi_old is the policy that sampled: its log-probabilities are recomputed by the training forward before the
updates (with mu = 1 they equal the current ones, so ratio = 1 and only the gradient flows, as in TRL), not taken
from the sampler, which does not report the stop token's (rollout.py). The reference is a frozen copy of the
starting model, built only when beta > 0.

The optimizer step is the trainer's (`qiusuo.train.step.TrainStep`: clipping, the non-finite guard, the
learning rate, Adam), with the batch's micro-batches and this objective as its loss; the routing bias is not
moved in RL (`balance.gamma = 0` in the `grpo` run preset): balancing is a pretraining concern, and moving it
would move the policy off its gradient. Settings are the run config's (`[grpo]` plus the shared sections, defaults
in the `grpo` run preset; `qiusuo grpo --help` lists every key).

Learning rate: Adam moves every weight by about lr per step whatever the size of its gradient, and a small SFT'd
policy is sharp (on the `tiny` preset a step of L2 norm 0.01 along the raw policy gradient already lowers the
reward, and so does the opposite step), so lr must stay well below the SFT one. Measured on `tiny` (P=16, G=8,
warmup 10, greedy test accuracy): on docs/reasoning.md's SFT model lr 1e-4 went 65 -> 86 -> 82 -> 90% in 60 steps
while 3e-4 fell to 26-43%; on a model SFT'd on worked traces only 1e-3 fell to 6-10% and 1e-4 and 3e-5 stayed
flat within noise over 60-120 steps. Hence the default 1e-4 with a short warmup (Adam's first steps are
sign-sized for every weight).

Logged per step (metrics.jsonl, kind `grpo`): reward (total and per function), accuracy, KL, clip fraction,
response length, the share of groups whose rewards are all equal (they give no gradient), seconds in rollout, in
the no-grad reference / old-policy log-prob passes and in training, and rollout tokens/s; periodically test
accuracy (kind `eval`). Plots: reward.png and grpo.png.

LoRA (`[lora]`, as in `qiusuo sft`): only adapters over the frozen (optionally packed) policy train; the reference
policy is then the same model with its adapters off, not a copy; the run exports RUN/adapter.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from qiusuo.rl.rewards import RewardSpec, accuracy_reward, load_reward, score
from qiusuo.rl.rollout import pack_rollouts, sample_groups, token_logprobs
from qiusuo.rl.tasks import chat_messages, get_task
from qiusuo.runtime import Interrupted, resolve_device, resolve_precision, set_threads, stop_on_interrupt
from qiusuo.train import rundir
from qiusuo.train.config import RunConfig
from qiusuo.train.optim import build_optimizer, lr_factor
from qiusuo.train.step import TrainingDiverged, TrainStep


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): standardised within each group (unbiased std)."""
    if rewards.shape[1] < 2:
        raise ValueError("a group needs at least 2 completions: GRPO's advantage compares completions of the same "
                         "prompt, and with one there is nothing to compare (set --group-size >= 2)")
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float, norm: str = "token",
              denom: float | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective as a loss (to minimise).

    logp, old_logp, ref_logp, mask: (B, T) per token (mask 1 on completion tokens); adv: (B,) per completion.
    norm "token": sum over all masked tokens / denom (default: their count); "sequence": each completion's mean
    over its tokens, summed / denom (default: B). Pass the whole batch's denom when the batch is split into
    micro-batches, so the gradient does not depend on the split. Returns (loss, sums of KL, clipped tokens and
    tokens for logging)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * a, clipped * a)  # (B, T)
    kl = torch.zeros_like(logp)
    if beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if norm == "token":
        loss = (per_token * mask).sum() / (denom if denom is not None else mask.sum().clamp(min=1))
    elif norm == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / (denom if denom is not None else per_seq.shape[0])
    else:
        raise ValueError(f"loss normalisation must be 'token' or 'sequence', got {norm!r}")
    with torch.no_grad():  # a token is clipped when the clip, not the ratio, decides the objective
        is_clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
        stats = {"kl_sum": float((kl * mask).sum()), "clipped_sum": float((is_clipped.float() * mask).sum()),
                 "tokens": float(mask.sum())}
    return loss, stats


class GRPO:
    """The run: `GRPO(run_cfg).train()`; `step()` does one rollout + update and returns its metrics.
    `model`/`tokenizer`: an already loaded policy (default: loaded from `grpo.model`)."""

    def __init__(self, cfg: RunConfig, model=None, tokenizer=None, overwrite: bool = False):
        cfg.validate()
        self.cfg, g, self.overwrite = cfg, cfg.grpo, overwrite
        self.device = resolve_device(cfg.run.device)
        set_threads(self.device, cfg.run.threads)
        if model is None:
            from qiusuo.hf.load import load_model, load_tokenizer

            if not g.model:
                raise ValueError("pass --model DIR (a model folder with its tokenizer, e.g. the output of qiusuo sft)")
            quantize = cfg.lora.quantize if cfg.lora.rank else ""  # QLoRA: the base loads packed
            model = load_model(g.model, device=self.device, progress=False, quantize=quantize or None)
            tokenizer = load_tokenizer(g.model)
        self.model, self.tok = model, tokenizer
        self.task = get_task(g.task)
        self.rewards: list[RewardSpec] = [load_reward(s) for s in g.rewards]
        names = [r.name for r in self.rewards]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"--reward: need at least one, each name once; got {names}")
        lo = cfg.lora
        # the reference: with adapters alone training, the policy with its adapters off (no copy of the model)
        self.ref = None
        if g.beta > 0 and not (lo.rank and not lo.router and not lo.norms):
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        if lo.rank:
            from qiusuo.lora.train import prepare

            prepare(model, lo, cfg.run.seed)
        self.opt = build_optimizer(model, cfg.optim)
        gamma = cfg.balance.gamma if not lo.rank or lo.router else 0.0  # a frozen router's bias is the base's
        self.train_step = TrainStep(model, self.opt, grad_clip=cfg.train.grad_clip, gamma=gamma,
                                    autocast=resolve_precision(cfg.run.precision, self.device),
                                    on_diverged=lambda: "; lower --optim.lr")
        self.problems = self.task.problems("train", g.prompts_per_step * cfg.train.steps, seed=cfg.run.seed)
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.step_no = 0

    def _forward_logprobs(self, model, ids):
        with self.train_step.autocast_context():
            return token_logprobs(model, ids, self.cfg.grpo.temperature)

    def _ref_logprobs(self, ids):
        if self.ref is not None:
            return self._forward_logprobs(self.ref, ids)
        from qiusuo.lora.train import base_only

        with base_only(self.model):
            return self._forward_logprobs(self.model, ids)

    def save(self, out: Path) -> Path:
        """The policy: the whole model as RUN/model, or a run training adapters its adapter as RUN/adapter."""
        from qiusuo.hf.save import save_hf

        if self.cfg.lora.rank:
            from qiusuo.lora.train import export

            return export(self.model, out / "adapter", base=self.cfg.grpo.model or None)
        return save_hf(self.model, out / "model", tokenizer=self.tok, progress=False)

    def prompt_ids(self, problems) -> list[list[int]]:
        tok = self.tok
        return [tok.encode_chat(chat_messages(p, with_answer=False)) for p in problems]

    def step(self) -> dict:
        cfg, g, model = self.cfg, self.cfg.grpo, self.model
        P, G = g.prompts_per_step, g.group_size
        problems = self.problems[self.step_no * P:(self.step_no + 1) * P]
        t0 = time.perf_counter()
        groups, stats = sample_groups(model, self.tok, self.prompt_ids(problems), G, g.temperature, g.max_tokens,
                                      seed=cfg.run.seed * 1_000_003 + self.step_no * P * G, block_size=g.block_size,
                                      draft_tokens=g.draft_tokens)
        t_roll = time.perf_counter() - t0
        rollouts = [r for grp in groups for r in grp]
        probs = [p for p in problems for _ in range(G)]
        texts = [r.text for r in rollouts]
        total, per, failed = score(self.rewards, texts, probs, step=self.step_no + 1)
        r = torch.tensor(total).view(P, G)
        adv = group_advantages(r, g.adv_eps).view(-1).to(self.device)  # (P*G,)

        t1 = time.perf_counter()
        ids, mask = pack_rollouts(rollouts, self.pad, self.device)
        n = len(rollouts)
        chunks = [slice(i, min(i + g.micro_batch, n)) for i in range(0, n, g.micro_batch)]
        # a batch whose groups all have equal rewards carries no policy gradient; without a KL term there is nothing
        # to learn from it, and an Adam step would still move the weights on stale momentum, so it is skipped
        skip = g.beta == 0 and not bool(adv.abs().max() > 0)
        with torch.no_grad():
            old = [self._forward_logprobs(model, ids[c]) for c in chunks] if g.mu > 1 and not skip else None
            ref = [self._ref_logprobs(ids[c]) for c in chunks] if g.beta > 0 else None
        t_ref = time.perf_counter() - t1  # no-grad passes: the reference (beta > 0) and the old policy (mu > 1)
        denom = float(mask.sum().clamp(min=1)) if g.loss_norm == "token" else float(n)
        sums = {"kl_sum": 0.0, "clipped_sum": 0.0, "tokens": 0.0, "loss": 0.0}

        def loss_fn(k: int):
            c = chunks[k]
            logp = self._forward_logprobs(model, ids[c])
            loss, st = grpo_loss(logp, old[k] if old is not None else logp.detach(), ref[k] if ref is not None else None,
                                 adv[c], mask[c], g.epsilon, g.beta, g.loss_norm, denom)
            sums["loss"] += float(loss.detach())
            for key in st:
                sums[key] += st[key]
            return SimpleNamespace(loss=loss)

        gn, lr = 0.0, cfg.optim.lr * lr_factor(cfg.schedule, self.step_no, 0.0)
        for _ in range(0 if skip else g.mu):
            # micro-batch losses are already normalised over the whole batch (denom): summed, not averaged
            gn = self.train_step(range(len(chunks)), loss_fn, lr, average=False)["grad_norm"]
        t_train = time.perf_counter() - t1 - t_ref
        self.step_no += 1
        spread = r.max(1).values - r.min(1).values
        return {
            "reward": float(r.mean()),
            **{f"reward/{k}": sum(v) / n for k, v in per.items()},
            **{f"failed/{k}": v for k, v in failed.items()},
            "accuracy": sum(accuracy_reward(texts, probs)) / n,
            "kl": sums["kl_sum"] / max(sums["tokens"], 1),
            "clip_fraction": sums["clipped_sum"] / max(sums["tokens"], 1),
            "loss": sums["loss"] / g.mu,
            "response_length": sum(len(x.completion_ids) for x in rollouts) / n,
            "zero_spread": float((spread == 0).float().mean()),
            "grad_norm": gn, "skipped": int(skip), "lr": lr,
            "rollout_s": t_roll, "ref_s": t_ref, "train_s": t_train,
            "rollout_tokens_per_s": stats["generated_tokens"] / t_roll,
            "prefix_cached": stats["cached_prompt_tokens"] / max(stats["prompt_tokens"], 1),
        }

    def evaluate(self) -> dict:
        from qiusuo.rl.eval import evaluate

        g = self.cfg.grpo
        return evaluate(self.model, self.tok, self.task, n=g.eval_n, seed=self.cfg.run.seed, max_tokens=g.max_tokens)

    def train(self) -> dict:
        from qiusuo.train.metrics import MetricsLog

        cfg, g = self.cfg, self.cfg.grpo
        cfg.absolute_paths()
        out = rundir.claim(cfg.run.out_dir, self.overwrite)
        (out / "run.toml").write_text(cfg.to_toml())
        log = MetricsLog(out, tensorboard=False)
        t0 = time.perf_counter()
        before = self.evaluate()
        log.log("eval", 0, **before)
        recs = []
        bar = tqdm(total=cfg.train.steps, desc="grpo", disable=not cfg.run.progress, file=sys.stderr)
        with stop_on_interrupt("step") as stop:
            while self.step_no < cfg.train.steps and not stop.requested:
                rec = self.step()
                recs.append(rec)
                log.log("grpo", self.step_no, **rec)
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{rec['accuracy']:.2f}")
                if g.eval_every and self.step_no % g.eval_every == 0 and self.step_no < cfg.train.steps:
                    log.log("eval", self.step_no, **self.evaluate())
        bar.close()
        if stop.requested and self.step_no < cfg.train.steps:  # GRPO keeps no optimizer checkpoints: the policy
            log.close()
            plot_grpo(out)
            final = self.save(out)
            raise Interrupted(f"interrupted at step {self.step_no}; the policy so far is saved in {final} (GRPO runs "
                              f"have no --resume: start another from it with --model {final})")
        after = self.evaluate()
        log.log("eval", self.step_no, **after)
        log.close()
        plots = plot_grpo(out)
        final = self.save(out)
        roll = sum(x["rollout_s"] for x in recs)
        ref = sum(x["ref_s"] for x in recs)
        train = sum(x["train_s"] for x in recs)
        busy = max(roll + ref + train, 1e-9)
        k = max(1, len(recs) // 5)
        return {
            "steps": self.step_no,
            "test_accuracy_before": before["accuracy"], "test_accuracy_after": after["accuracy"],
            "reward_first_steps": sum(x["reward"] for x in recs[:k]) / k,
            "reward_last_steps": sum(x["reward"] for x in recs[-k:]) / k,
            "rollout_tokens_per_s": sum(x["rollout_tokens_per_s"] * x["rollout_s"] for x in recs) / max(roll, 1e-9),
            "rollout_share": roll / busy, "ref_share": ref / busy, "train_share": train / busy,
            "rollout_s": round(roll, 1), "ref_s": round(ref, 1), "train_s": round(train, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "model": str(final), "plots": [str(p) for p in plots],
        }


def plot_grpo(run_dir: str | Path) -> list[Path]:
    """reward.png (total and per-function reward per step, test accuracy) and grpo.png (accuracy, KL, clip
    fraction, response length, zero-spread groups, time split), from metrics.jsonl alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qiusuo.train.metrics import read

    run_dir = Path(run_dir)
    recs = read(run_dir)
    steps_recs = [r for r in recs if r["kind"] == "grpo"]
    evals = [r for r in recs if r["kind"] == "eval"]
    if not steps_recs:
        return []
    s = [r["step"] for r in steps_recs]
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(s, [r["reward"] for r in steps_recs], label="total reward", lw=1.5)
    for k in sorted({k for r in steps_recs for k in r if k.startswith("reward/")}):
        ax.plot(s, [r.get(k, float("nan")) for r in steps_recs], label=k, lw=1, alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="k", label="test accuracy")
    ax.set(xlabel="GRPO step", ylabel="mean over the batch", title="GRPO reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "reward.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "reward.png")

    panels = [("accuracy", "train accuracy"), ("kl", "KL to reference (k3)"), ("clip_fraction", "clip fraction"),
              ("response_length", "response length (tokens)"), ("zero_spread", "groups with zero reward spread"),
              ("rollout_s", "seconds per step")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "rollout_s":  # where a step's time goes
            for k, label in (("rollout_s", "rollout"), ("ref_s", "reference/old log-probs"), ("train_s", "train")):
                ax.plot(s, [r.get(k, float("nan")) for r in steps_recs], label=label)
            ax.legend(fontsize=8)
        else:
            ax.plot(s, [r[key] for r in steps_recs])
        ax.set(xlabel="step", title=title)
    fig.tight_layout()
    fig.savefig(run_dir / "grpo.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "grpo.png")
    return out


ALIASES = {
    "--model": ("grpo.model", {"help": "model folder with its tokenizer (e.g. RUN/model from qiusuo sft)"}),
    "--quantize": ("lora.quantize", {"help": "QLoRA: the frozen base's formats (int4, experts=int4,...)"}),
    "--task": ("grpo.task", {}),
    "--out-dir": ("run.out_dir", {}),
    "--steps": ("train.steps", {}),
    "--prompts-per-step": ("grpo.prompts_per_step", {}),
    "--group-size": ("grpo.group_size", {}),
    "--max-tokens": ("grpo.max_tokens", {}),
    "--temperature": ("grpo.temperature", {}),
    "--lr": ("optim.lr", {}),
    "--beta": ("grpo.beta", {}),
    "--mu": ("grpo.mu", {}),
    "--reward": ("grpo.rewards", {"action": "append", "help": "NAME[=WEIGHT], repeatable: accuracy, format, "
                                  "module:function or file.py:function"}),
    "--seed": ("run.seed", {}),
    "--threads": ("run.threads", {}),
    "--device": ("run.device", {}),
    "--no-progress": ("run.progress", {"action": "store_const", "const": False, "help": "no progress bar"}),
}


def add_args(p: argparse.ArgumentParser) -> None:
    from qiusuo.train.config import add_config_args

    from qiusuo.train.run import add_overwrite_arg

    p.usage = "qiusuo grpo --model DIR [--config PRESET_OR_TOML] [--section.key VALUE ...] [--overwrite]"
    add_overwrite_arg(p)
    add_config_args(p, "grpo", ALIASES, resumable=False)


def main(args: argparse.Namespace) -> int:
    from qiusuo.train.config import load_run_config, overrides

    try:
        cfg = load_run_config(args.config or args.default_config, overrides(args))
        summary = GRPO(cfg, overwrite=args.overwrite).train()
    except Interrupted as e:
        print(f"qiusuo grpo: {e}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"qiusuo grpo: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
