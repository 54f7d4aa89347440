"""Training on several processes: data parallel (DDP or FSDP2) and expert parallel, applied to the single-device
`Transformer` from outside (the model code stays single-device, as in torchtitan), under `torchrun`.

Legend: W world size, P expert-parallel degree (divides W), E routed experts, E/P experts per rank, N tokens of a
rank's micro-batch, K experts per token, D hidden.

Layout: ranks form W/P expert groups of P consecutive ranks; rank r owns experts [(r % P) * E/P, (r % P + 1) * E/P)
of every MoE layer. Ranks with the same r % P hold the same experts ("replicas", W/P of them). Everything else
(attention, dense and shared-expert MLPs, router, embeddings) is data parallel over all W ranks.

Gradients: DDP/FSDP average the data-parallel weights over W. They must not touch the expert weights (each rank
holds different experts), so those are excluded from DDP/FSDP; after backward, `finish_grads` divides an expert's
gradient (which the all-to-all's backward already summed over the P ranks of its expert group) by W and sums it
over its replicas: the same gradient as one process on the global batch.

Checkpoints stay in the one-process layout (Hugging Face weights + index-keyed AdamW state): `full_state` gathers
every tensor to full size, `load_full_state` cuts a full state back to this rank's pieces, so a checkpoint moves
freely between 1 and N processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, distribute_tensor

from qiusuo.model.moe import Experts, MoE
from qiusuo.train.config import ParallelSection


class DistributedError(RuntimeError):
    """A bad parallel configuration, or a collective that failed (a rank died or timed out)."""


def collective_failure(e: BaseException) -> bool:
    """Whether an exception is a failed collective (a peer died, or timed out after `parallel.timeout_s`). Gloo
    raises plain RuntimeErrors for these ("Connection reset by peer", "Timed out waiting ... for recv"), NCCL
    raises `DistBackendError`; the message is all there is to tell them from other RuntimeErrors."""
    if isinstance(e, tdist.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("gloo/transport", "NCCL", "Connection reset by peer", "Connection closed by peer",
                                   "Timed out waiting", "timed out"))


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def check_parallel(cfg: ParallelSection, world_size: int, n_routed_experts: int | None) -> None:
    """Clear errors for layouts that cannot work, before any process group exists (n_routed_experts None: the
    model is not built yet, check the world only)."""
    if cfg.ep > 1 and world_size % cfg.ep:
        raise DistributedError(f"parallel.ep={cfg.ep} does not divide the world size {world_size}; launch a multiple "
                               f"of {cfg.ep} processes (torchrun --nproc_per_node) or pick an ep that divides {world_size}")
    if cfg.ep > 1 and n_routed_experts is not None and not n_routed_experts:
        raise DistributedError(f"parallel.ep={cfg.ep} but the model has no routed experts; use parallel.ep=1")
    if cfg.ep > 1 and n_routed_experts and n_routed_experts % cfg.ep:
        raise DistributedError(f"n_routed_experts={n_routed_experts} is not divisible by parallel.ep={cfg.ep}; pick an "
                               f"ep that divides it (each rank owns n_routed_experts / ep experts)")
    if world_size > 1 and cfg.dp == "none":
        raise DistributedError(f"{world_size} processes but parallel.dp='none'; set --parallel.dp=ddp or fsdp")


class ExpertParallel(Experts):
    """This rank's E/P experts of one MoE layer; tokens travel to the ranks owning their experts and back.

    The token dispatch is `Experts.forward`'s own (`qiusuo.model.moe.dispatch`: sort the N*K (token, expert)
    slots by expert, so by owning rank; weight, unsort and sum over K afterwards); only `run_sorted` differs:
    exchange per-expert counts with one all-to-all, send each slot's token row to its owner with
    `all_to_all_single`, run the local experts on what arrived (sorted by local expert), send the outputs back
    the same way. A token goes only to the ranks owning one of its experts, once per chosen expert there (a
    rank that owns two of its experts receives it twice: simpler than de-duplicating, and at most K rows per
    token either way). Both all-to-alls are autograd functions: their backward sends the gradients along the
    reverse path.

    `sent_rows[p]` counts rows sent to rank p (group-local index) since the last reset, for measuring volume."""

    def __init__(self, full: Experts, group, ep_rank: int, ep: int):
        nn.Module.__init__(self)
        E = full.gate_up_proj.shape[0]
        self.num_experts, self.ep, self.ep_rank, self.group = E, ep, ep_rank, group
        self.limit = full.limit  # V4's SwiGLU clamp
        self.weight_transform = getattr(full, "weight_transform", None)  # FP4 QAT (qiusuo.train.qat)
        self.local = E // ep
        lo = ep_rank * self.local
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[lo:lo + self.local].clone())  # (E/P, 2I, D)
        self.down_proj = nn.Parameter(full.down_proj.detach()[lo:lo + self.local].clone())  # (E/P, D, I)
        self.sent_rows = torch.zeros(ep, dtype=torch.long)
        self.ran_with_grad = False  # a forward since the last `finish_grads` that backward will reach

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (N*K, D) sorted by global expert, counts (E,) -> the experts' outputs (N*K, D) in the same order,
        computed on the ranks that own them."""
        P, L = self.ep, self.local
        self.ran_with_grad |= torch.is_grad_enabled()
        recv_counts = torch.empty_like(counts)  # (P*L,) [src, local expert]: rows each source sends here
        tdist.all_to_all_single(recv_counts, counts, group=self.group)
        send_split = counts.view(P, L).sum(1)  # (P,)
        recv = recv_counts.view(P, L)
        recv_split = recv.sum(1)  # (P,)
        send_split_l, recv_split_l = send_split.tolist(), recv_split.tolist()
        self.sent_rows += send_split.cpu()
        xr = all_to_all_single_autograd(xs, recv_split_l, send_split_l, self.group)  # (M, D) by source, local expert
        local_id = torch.arange(L, device=xs.device).repeat(P).repeat_interleave(recv.flatten())  # (M,)
        lorder = local_id.argsort(stable=True)  # rows by local expert
        ys = self.grouped(xr[lorder], recv.sum(0)) if len(lorder) else xr  # (M, D)
        # (no rows arrived: pass the empty received tensor on, so the return all-to-all stays in the autograd graph
        # and this rank joins its backward; the other ranks would wait for it forever otherwise)
        yr = torch.empty_like(ys).index_copy_(0, lorder, ys)  # back to arrival order
        return all_to_all_single_autograd(yr, send_split_l, recv_split_l, self.group)  # (N*K, D) in owner order


class Distributed:
    """The process group and the parallel layout of one rank; the `dist` object `Trainer` takes.

    Build with `Distributed.from_env(parallel_cfg, device_name)` inside a torchrun launch; `close()` at the end."""

    def __init__(self, cfg: ParallelSection, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.local_rank, self.device = cfg, rank, world_size, local_rank, device
        self.ep = cfg.ep
        self.ep_rank = rank % self.ep
        # every rank must create every group, in the same order
        self.ep_group = self.replica_group = None
        for g in range(world_size // self.ep):
            ranks = list(range(g * self.ep, (g + 1) * self.ep))
            pg = tdist.new_group(ranks)
            if rank in ranks:
                self.ep_group = pg
        for j in range(self.ep):
            ranks = list(range(j, world_size, self.ep))
            pg = tdist.new_group(ranks)
            if rank in ranks:
                self.replica_group = pg
        self.model: nn.Module | None = None
        self.wrapped: nn.Module | None = None  # what `wrap` returned (the DDP module, or the model itself)
        self.expert_params: set[int] = set()

    @classmethod
    def from_env(cls, cfg: ParallelSection, device_name: str = "auto") -> Distributed:
        """Join the torchrun job: gloo on CPU, NCCL on CUDA (one GPU per local rank), collectives that fail after
        `cfg.timeout_s` instead of hanging when a rank dies."""
        if not launched_by_torchrun():
            raise DistributedError("parallel.dp/parallel.ep ask for several processes but this was not launched by "
                                   "torchrun (RANK/WORLD_SIZE/LOCAL_RANK unset); run `torchrun --nproc_per_node=N -m "
                                   "qiusuo train ...`, or drop the parallel.* settings for one process")
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        check_parallel(cfg, world, None)
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                                     **({"device_id": device} if use_cuda else {}))
        return cls(cfg, rank, world, local, device)

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------------ wrapping
    def wrap(self, model: nn.Module, unused: list[str] = ()) -> nn.Module:
        """Expert parallel first (swap each MoE's `experts` for this rank's `ExpertParallel` slice), then DDP or
        FSDP2 over everything else. Returns the module to call for training steps. Build the optimizer after
        this: FSDP2 and the expert swap replace parameters. `unused`: names of parameters no loss reaches in this
        run (the MTP modules when the MTP loss is off); DDP would otherwise wait for their gradients forever."""
        check_parallel(self.cfg, self.world_size, model.cfg.n_routed_experts)
        self.model = model
        if self.ep > 1:
            for m in model.modules():
                if isinstance(m, MoE):
                    m.experts = ExpertParallel(m.experts, self.ep_group, self.ep_rank, self.ep)
        experts = [p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()]
        self.expert_params = {id(p) for p in experts}
        if self.cfg.dp == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ignore = [n for n, p in model.named_parameters() if id(p) in self.expert_params or n in set(unused)]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
            # buffers: the routing bias is updated identically on every rank (from loads summed over ranks)
            self.wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               broadcast_buffers=False)
            return self.wrapped
        if self.cfg.dp == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if self.device.type == "cuda" else MixedPrecisionPolicy()
            ignored = set(experts)
            blocks = list(model.layers) + [m.block for m in getattr(model, "mtp", [])]
            for b in blocks:
                fully_shard(b, mp_policy=mp, ignored_params=ignored & set(b.parameters()) or None)
            fully_shard(model, mp_policy=mp, ignored_params=ignored or None)
        self.wrapped = model
        return model

    def sync_gradients(self, last: bool):
        """The context of one micro-batch's backward. DDP all-reduces only with the step's last micro-batch
        (`no_sync` before it): one all-reduce per step instead of one per micro-batch, and every rank's gradient is
        its own micro-batches' sum before ranks are combined, the order a one-process reference can repeat
        exactly. FSDP2 reduce-scatters after every micro-batch (holding unsharded gradients across micro-batches
        would give up the memory it shards for)."""
        if self.cfg.dp == "ddp" and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def finish_grads(self, model: nn.Module) -> None:
        """Expert gradients after backward: divide by W (DDP/FSDP average the rest over W) and sum over replicas."""
        for m in model.modules():
            if isinstance(m, ExpertParallel):
                ran, m.ran_with_grad = m.ran_with_grad, False
                for p in m.parameters():
                    if p.grad is None and ran:  # the layer ran but no token reached these experts: zeros, as one
                        p.grad = torch.zeros_like(p)  # process's full weight gets for them
                    if p.grad is None:  # the layer did not run (MTP off): no gradient, as in one process
                        continue
                    p.grad.div_(self.world_size)
                    if self.world_size > self.ep:
                        tdist.all_reduce(p.grad, group=self.replica_group)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the whole distributed model: sharded (FSDP) gradients are summed
        across ranks by DTensor, expert gradients across the expert group (each rank holds different experts)."""
        params = [p for p in params if p.grad is not None]
        dense = [p.grad for p in params if id(p) not in self.expert_params]
        expert = [p.grad for p in params if id(p) in self.expert_params]
        total = torch.nn.utils.get_total_norm(dense, 2.0) if dense else torch.zeros((), device=self.device)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        if self.ep > 1:  # (without experts the total is exactly the one-process norm: no square and root)
            e = torch.nn.utils.get_total_norm(expert, 2.0) ** 2 if expert else torch.zeros((), device=self.device)
            tdist.all_reduce(e, group=self.ep_group)
            total = (total**2 + e).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ does
        for p in params:  # on the local pieces: the total is already global
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
        return total

    # ------------------------------------------------------------------ full state (checkpoints)
    def _full(self, t: torch.Tensor, expert: bool) -> torch.Tensor:
        """The full-size tensor on every rank (CPU)."""
        if isinstance(t, DTensor):
            return t.full_tensor().cpu()
        if expert and self.ep > 1:
            parts = [torch.empty_like(t) for _ in range(self.ep)]
            tdist.all_gather(parts, t.contiguous(), group=self.ep_group)
            return torch.cat(parts).cpu()
        return t.detach().to("cpu", copy=True)  # a copy on a CPU too: the caller keeps it while training goes on

    def _local(self, full: torch.Tensor, like: torch.Tensor, expert: bool) -> torch.Tensor:
        """This rank's piece of a full tensor, shaped and placed like `like`."""
        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
        if expert and self.ep > 1:
            n = like.shape[0]
            full = full[self.ep_rank * n:(self.ep_rank + 1) * n]
        return full.to(like.device, like.dtype)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """(model state dict, optimizer state dict) in the one-process layout, full size, on CPU, on rank 0;
        (None, None) on the others. Collective: every rank calls it. Tensor by tensor, so a rank other than 0
        holds at most one full tensor at a time."""
        main = self.rank == 0
        expert_names = {n for n, p in model.named_parameters() if id(p) in self.expert_params}
        sd = {}
        for n, t in model.state_dict().items():
            full = self._full(t, n in expert_names)
            if main:
                sd[n] = full
        osd = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(params):
            st = osd["state"].get(i)
            if st is None:
                continue
            full = {k: self._full(v, id(p) in self.expert_params) if torch.is_tensor(v) and v.dim() > 0 else
                    (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in st.items()}
            if main:
                state[i] = full
        return (sd, {"state": state, "param_groups": osd["param_groups"]}) if main else (None, None)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, sd: dict,
                        osd: dict | None) -> None:
        """Inverse of `full_state`: cut full tensors to this rank's pieces and load them."""
        expert_names = {n for n, p in model.named_parameters() if id(p) in self.expert_params}
        own = model.state_dict()
        with torch.no_grad():
            for n, t in own.items():
                local = self._local(sd[n], t, n in expert_names)
                if isinstance(t, DTensor):
                    t.to_local().copy_(local.to_local())
                else:
                    t.copy_(local)
        if optimizer is None or osd is None:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, st in osd["state"].items():
            p = params[int(i)]
            state[int(i)] = {k: self._local(v, p, id(p) in self.expert_params) if torch.is_tensor(v) and v.dim() > 0
                             else v for k, v in st.items()}
        optimizer.load_state_dict({"state": state, "param_groups": osd["param_groups"]})
