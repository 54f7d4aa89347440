"""THE optimizer step: every caller that trains (pretraining, SFT, GRPO, `qiusuo bench train`) goes through
`TrainStep`, supplying only its micro-batches and its loss. One copy of the code that scales, clips, sets the
learning rate, steps, balances and refuses non-finite updates, so the callers cannot drift apart.

One call = backward over each micro-batch's `LossOutput.loss` (divided by their count when `average`, else as
given: GRPO normalises over its whole batch itself), the distributed gradient finish and global clipping, the
non-finite guard (nothing is applied when the loss or the gradient norm is NaN/inf), `lr` into every group,
`optimizer.step()`, and the aux-loss-free balancing update from the per-expert loads the forwards returned
(`LossOutput.load`, summed over micro-batches and ranks: the bias moves once per optimizer step, as DeepSeek-V3
describes). Balancing state travels in return values: routers count nothing themselves.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable

import torch

from qiusuo.model.moe import update_balance_bias


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; nothing from that step was applied."""


class TrainStep:
    """`TrainStep(model, optimizer, grad_clip=..., gamma=..., dist=..., autocast=...)(batches, loss_fn, lr)`.

    model: the single-device module (its parameters are clipped; its routers' biases are balanced).
    grad_clip: max global gradient norm; 0: no clipping (the norm is still computed, for the guard and the log);
        None: not even the norm (the training benchmark, whose reference step does not compute one either).
    gamma: bias speed of the aux-loss-free balancing (0: no update, as in RL).
    dist: a `qiusuo.train.distributed.Distributed` (all-reduces, expert gradients, sharded clipping) or None.
    autocast: the autocast dtype (bf16) or None for fp32.
    compute: a `qiusuo.train.precision.ComputeCopy` of `model` that `loss_fn` runs (bf16 with fp32 master
        weights), or None: its gradients move to `model` after each micro-batch, and it is re-made from `model`
        after each optimizer step.
    on_diverged: extra advice appended to the `TrainingDiverged` message (where to resume from, what to lower).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float | None = 1.0,
                 gamma: float = 0.0, dist=None, autocast: torch.dtype | None = None, compute=None,
                 on_diverged: Callable[[], str] = lambda: ""):
        self.model, self.optimizer, self.dist, self.compute = model, optimizer, dist, compute
        self.grad_clip, self.gamma, self.autocast, self.on_diverged = grad_clip, gamma, autocast, on_diverged
        self.device = next(model.parameters()).device
        self.steps = 0  # optimizer steps taken through this object

    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def __call__(self, batches: Iterable[Any], loss_fn: Callable[[Any], Any], lr: float,
                 average: bool = True) -> dict:
        """One optimizer step over `batches` (a list of micro-batches); `loss_fn(batch)` returns a `LossOutput`
        (or anything with `loss`, optional `ce`, `mtp`, `load`). Returns {loss, ce, mtp, lr, grad_norm,
        max_vio, load} with the loss terms averaged over micro-batches and ranks."""
        batches = list(batches)
        sums, load = self.backward(batches, loss_fn, len(batches) if average else 1)
        world = self.dist.world_size if self.dist is not None else 1
        if self.dist is not None:
            self.dist.all_reduce_sum(sums)
        return self.update(sums / (len(batches) * world), load, lr)

    def backward(self, batches: list, loss_fn: Callable[[Any], Any], divisor: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of `loss / divisor` over this rank's micro-batches, gradients accumulating in
        `.grad` (a one-process reference of several ranks calls this per rank: tests/distributed). Returns the
        (3,) sums of (loss, ce, mtp) over them and their summed loads (None when nothing routed). Under `dist`
        the data-parallel gradients are combined with the last micro-batch's backward only
        (`Distributed.sync_gradients`)."""
        n = len(batches)
        if n == 0:
            raise ValueError("a training step needs at least one micro-batch")
        sums = torch.zeros(3, device=self.device)  # loss, ce, mtp summed over micro-batches
        load = None
        for i, batch in enumerate(batches):
            sync = self.dist.sync_gradients(i == n - 1) if self.dist is not None else contextlib.nullcontext()
            with sync:
                with self.autocast_context():
                    out = loss_fn(batch)
                (out.loss / divisor if divisor != 1 else out.loss).backward()
            if self.compute is not None:
                self.compute.grads_to_master()
            loss = out.loss.detach().float()
            sums += torch.stack([loss, getattr(out, "ce", loss).float(), getattr(out, "mtp", loss * 0).float()])
            part = getattr(out, "load", None)
            if part is not None and part.numel():
                load = part if load is None else load + part
        return sums, load

    def update(self, terms: torch.Tensor, load: torch.Tensor | None, lr: float) -> dict:
        """Given the gradients in `.grad` and the (3,) mean loss terms over micro-batches and ranks: clip, refuse
        a non-finite step, set `lr`, step the optimizer, move the balancing bias from `load` (summed over ranks
        here under `dist`)."""
        grad_norm = self._clip()
        loss, ce, mtp = terms.tolist()
        gn = float(grad_norm) if grad_norm is not None else 0.0
        if not (math.isfinite(loss) and math.isfinite(gn)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gn}"
            raise TrainingDiverged(f"{what} at step {self.steps + 1}; training stopped and nothing from that step "
                                   f"was applied{self.on_diverged()}")
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = update_balance_bias(self.model, load, self.gamma,
                                      all_reduce=self.dist.all_reduce_sum if self.dist is not None else None)
        if self.compute is not None:
            self.compute.sync()
        self.steps += 1
        return {"loss": loss, "ce": ce, "mtp": mtp, "lr": lr, "grad_norm": gn, **balance}

    def _clip(self) -> torch.Tensor | None:
        if self.dist is not None:
            self.dist.finish_grads(self.model)
        if self.grad_clip is None:
            return None
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.dist is not None:
            return self.dist.clip_grad_norm(list(self.model.parameters()), clip)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
