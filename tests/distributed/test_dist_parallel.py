"""Two CPU processes (gloo, launched by torchrun) against one process: DDP, FSDP2 and expert parallel (with DDP and
with FSDP2) give the same losses, gradient norms, updated weights and balancing bias over 3 optimizer steps;
expert parallel sends each token only to its experts' ranks; checkpoints move between 2 processes and 1.

The one-process reference repeats the ranks' arithmetic (`emulated_step`): each rank's micro-batches at the ranks'
own shapes, gradients combined in the order the collective combines them. So DDP, whose arithmetic is then the
same op for op, must match it bit for bit. FSDP2 (sharded gradient norm) and expert parallel (an expert's rows
from both ranks in one matmul) reorder sums; they are bounded by noise measured in the same run: the gap between
the emulated reference and the plain one that runs each micro-batch's rows of all ranks at once (the same
arithmetic, summed in another order), times `NOISE_FACTOR`. Two broken runs (no gradient all-reduce; expert
gradients not divided by the world size) must fail the same check: the negative controls.

One torchrun job runs every 2-process scenario (this file is its script: see `worker`), so the processes start once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qiusuo.data.prepare import prepare
from qiusuo.hf import load_model
from qiusuo.train.config import load_run_config
from qiusuo.train.trainer import Trainer

WORLD, B, STEPS = 2, 2, 3
NO_MTP = {"train.mtp_weight": 0.0}  # the MTP modules get no gradient: DDP must not wait for them, EP must not invent one
MUON = {"optim.name": "muon"}  # Newton-Schulz in fp32 on a CPU (`optim.ns_dtype` auto): DDP's rounding stays small
# name: (parallel.dp, parallel.ep, extra run config, broken: a deliberate bug the check must catch)
MODES = {"ddp": ("ddp", 1, {}, None), "fsdp": ("fsdp", 1, {}, None), "ep_ddp": ("ddp", 2, {}, None),
         "ep_fsdp": ("fsdp", 2, {}, None), "ep_ddp_no_mtp": ("ddp", 2, NO_MTP, None),
         "ddp_muon": ("ddp", 1, MUON, None), "ep_ddp_muon": ("ddp", 2, MUON, None),
         "broken_no_allreduce": ("ddp", 1, {}, "no_allreduce"), "broken_world_scale": ("ddp", 2, {}, "world_scale")}
NOISE_FACTOR = 8  # a reordered sum may land this many times further off than the measured reordering did
FLOOR = {"loss": 1e-7, "grad_norm": 1e-6, "weights": 1e-7}  # where the measured gap is ~0: a few fp32 ulps


def make_cfg(data_dir, out_dir, batch_size, dp="none", ep=1, **kw):
    """A very small MoE (1 dense + 1 MoE layer + an MoE MTP block, 8 experts, K=2, noaux_tc bias) with a fast
    bias (gamma 1e-2), so that 3 steps move it visibly. (lr 2e-3: Adam turns fp32 rounding in a near-zero gradient
    into an update difference proportional to lr.)"""
    over = {"data.dir": str(data_dir), "run.out_dir": str(out_dir), "run.progress": False, "run.threads": 1,
            "run.device": "cpu", "run.precision": "fp32", "data.batch_size": batch_size, "data.seq_len": 16,
            "train.steps": 10, "train.grad_accum": 2, "optim.lr": 2e-3, "schedule.warmup_steps": 1,
            "balance.gamma": 1e-2, "eval.every": 0, "checkpoint.every": 0, "model.max_position_embeddings": 32,
            "model.hidden_size": 32, "model.intermediate_size": 64, "model.moe_intermediate_size": 16,
            "parallel.dp": dp, "parallel.ep": ep, "parallel.timeout_s": 60}
    return load_run_config("pretrain-tiny", {**over, **kw})


def emulated_step(t: Trainer, world: int, reduce_each: bool) -> dict:
    """One optimizer step of `world` data-parallel ranks, run in this one process: `t` reads the global batch,
    rank r's share of each micro-batch is its rows r*B:(r+1)*B (as `BatchLoader` splits them over ranks); each
    rank's micro-batches run at their own shapes through `TrainStep.backward`; gradients are combined as the
    collective does: divided by `world`, summed in rank order, once after the last micro-batch (DDP,
    `reduce_each` False) or after every micro-batch and accumulated (FSDP2's reduce-scatter, `reduce_each`)."""
    step, n = t.step_fn, t.cfg.train.grad_accum
    rows = t.cfg.data.batch_size // world
    micro = [[tuple(u[r * rows:(r + 1) * rows] for u in batch) for r in range(world)]
             for batch in (t.source.next_batch() for _ in range(n))]  # [m][r]
    loss_fn = lambda b: t.source.loss(t.forward, b, t.cfg)  # noqa: E731
    params = list(t.model.parameters())
    groups = [[(m, r) for m in range(n)] for r in range(world)] if not reduce_each else \
        [[(m, r)] for m in range(n) for r in range(world)]  # what one rank runs between two reductions
    rank_sums = [torch.zeros(3) for _ in range(world)]
    grads, reduced, load = [None] * len(params), [None] * len(params), None
    for i, group in enumerate(groups):
        t.optimizer.zero_grad(set_to_none=True)
        sums, part = step.backward([micro[m][r] for m, r in group], loss_fn, divisor=n)
        rank_sums[group[0][1]] += sums
        load = part if load is None else load + part
        for j, p in enumerate(params):  # this rank's contribution to the collective: its gradient / world
            if p.grad is not None:
                reduced[j] = p.grad / world if reduced[j] is None else reduced[j] + p.grad / world
        if (i + 1) % world == 0 if reduce_each else i == len(groups) - 1:  # the collective is complete
            grads = [r if g is None else (g if r is None else g + r) for g, r in zip(grads, reduced)]
            reduced = [None] * len(params)
    for p, g in zip(params, grads):
        p.grad = g
    total = rank_sums[0]
    for s in rank_sums[1:]:
        total = total + s
    return step.update(total / (n * world), load, t.lr())


def undivided(finish_grads):
    """`Distributed.finish_grads` with the bug of leaving expert gradients summed over the ranks (times W)."""
    from qiusuo.train.distributed import ExpertParallel

    def finish(model):
        finish_grads(model)
        for m in model.modules():
            if isinstance(m, ExpertParallel):
                for p in m.parameters():
                    if p.grad is not None:
                        p.grad.mul_(WORLD)
    return finish


def worker(data_dir: Path, out: Path, ref_ckpt: Path) -> None:
    """Runs under torchrun (2 processes). Rank 0 writes results.pt; every rank writes its all-to-all counts."""
    from qiusuo.model.moe import moe_routers
    from qiusuo.train.distributed import Distributed, ExpertParallel

    results, volume = {}, []
    for name, (dp, ep, kw, broken) in MODES.items():
        cfg = make_cfg(data_dir, out / name, B, dp, ep, **kw)
        dist = Distributed.from_env(cfg.parallel, "cpu")
        if broken == "no_allreduce":  # DDP never synchronises: each rank steps on its own half of the batch
            dist.sync_gradients = lambda last: dist.wrapped.no_sync()
        if broken == "world_scale":  # expert gradients summed over ranks but not divided by the world size
            dist.finish_grads = undivided(dist.finish_grads)
        t = Trainer(cfg, dist=dist)
        # expected rows per destination rank from the routing itself: slot (n, k) belongs to rank idx // (E/P)
        expected = {}
        experts = [m for m in t.model.modules() if isinstance(m, ExpertParallel)]
        for layer, r in enumerate(moe_routers(t.model)):
            def hook(mod, inp, output, layer=layer):
                owner = output[1].idx.flatten() // (t.model_cfg.n_routed_experts // ep)
                expected[layer] = expected.get(layer, 0) + torch.bincount(owner, minlength=ep)
            r.register_forward_hook(hook)
        steps = [t.train_step() for _ in range(STEPS)]
        if experts and not kw and not broken:  # (Muon and no-MTP runs route the same way: counted once)
            volume += [{"rank": dist.rank, "layer": i, "sent": e.sent_rows.tolist(), "expected": expected[i].tolist(),
                        "K": t.model_cfg.num_experts_per_tok}
                       for i, e in enumerate(experts)]
        sd, _ = dist.full_state(t.model, t.optimizer)
        results[name] = {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps], "sd": sd}

    # resume in 2 processes (FSDP2 + EP=2): steps 1-2, checkpoint, steps 3-4; a fresh trainer resumes from step 2
    cfg = make_cfg(data_dir, out / "resume", B, "fsdp", 2)
    t = Trainer(cfg, dist=Distributed.from_env(cfg.parallel, "cpu"))
    first = [t.train_step()["loss"] for _ in range(2)]
    sd_first, _ = t.dist.full_state(t.model, t.optimizer)
    path = t.save_checkpoint()
    after = [t.train_step()["loss"] for _ in range(2)]
    sd_a, _ = t.dist.full_state(t.model, t.optimizer)
    t2 = Trainer(cfg, dist=Distributed.from_env(cfg.parallel, "cpu"), resume=path)
    resumed = [t2.train_step()["loss"] for _ in range(2)]
    sd_b, _ = t2.dist.full_state(t2.model, t2.optimizer)
    # a 1-process checkpoint (step 2 of the reference) continued in 2 processes
    t3 = Trainer(cfg, dist=Distributed.from_env(cfg.parallel, "cpu"), resume=ref_ckpt)
    from_one = t3.train_step()["loss"]
    results["resume"] = {"first": first, "after": after, "resumed": resumed, "sd_first": sd_first, "sd_after": sd_a,
                         "sd_resumed": sd_b, "ckpt": str(path), "from_one": from_one}
    rank = int(os.environ["RANK"])
    (out / f"volume_{rank}.json").write_text(json.dumps(volume))
    if rank == 0:
        torch.save(results, out / "results.pt")
    t.dist.close()


def one_process(data, out, kw, emulate: str | None, save_at: int | None = None) -> dict:
    """STEPS steps of the one-process run of `kw` on the global batch: `emulate` None (each micro-batch's rows of
    all ranks at once, the plain trainer), "once" (DDP's order) or "each" (FSDP2's order); a checkpoint after
    `save_at` steps."""
    t = Trainer(make_cfg(data, out, WORLD * B, **kw))
    res = {"loss": [], "grad_norm": []}
    for i in range(STEPS):
        m = emulated_step(t, WORLD, emulate == "each") if emulate else t.train_step()
        res["loss"].append(m["loss"])
        res["grad_norm"].append(m["grad_norm"])
        if save_at is not None and i + 1 == save_at:
            res["ckpt"] = t.save_checkpoint()
    res["sd"] = {k: v.clone() for k, v in t.model.state_dict().items()}
    return res


def gaps(a: dict, b: dict) -> dict:
    """Largest differences between two runs: losses (absolute), gradient norms (relative), weights (absolute)."""
    return {"loss": max(abs(x - y) for x, y in zip(a["loss"], b["loss"])),
            "grad_norm": max(abs(x - y) / y for x, y in zip(a["grad_norm"], b["grad_norm"])),
            "weights": max((a["sd"][k].float() - v.float()).abs().max().item() for k, v in b["sd"].items())}


def bound(noise: dict) -> dict:
    return {k: NOISE_FACTOR * v + FLOOR[k] for k, v in noise.items()}


def check(got: dict, ref: dict, noise: dict, exact: bool) -> None:
    """`got` (a 2-process run) against `ref` (its one-process emulation): the same keys, the balancing bias
    identical (integer loads), the rest equal (`exact`) or within `bound(noise)`."""
    assert set(got["sd"]) == set(ref["sd"])
    g = gaps(got, ref)
    limit = {k: 0.0 for k in g} if exact else bound(noise)
    over = {k: (g[k], limit[k]) for k in g if g[k] > limit[k]}
    over |= {k: "differs" for k, v in ref["sd"].items()
             if "e_score_correction_bias" in k and not torch.equal(got["sd"][k], v)}
    assert not over, f"gap > bound: {over} (noise measured between the references: {noise})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    prepare(data, max_bytes=60_000, vocab_size=300, val_fraction=0.1, progress=False)
    refs = {}
    for name, kw in (("base", {}), ("no_mtp", NO_MTP), ("muon", MUON)):
        for emulate in (None, "once", "each") if name == "base" else (None, "once"):
            save = 2 if (name, emulate) == ("base", None) else None
            refs[name, emulate] = one_process(data, root / f"ref_{name}_{emulate}", kw, emulate, save_at=save)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, str(data), str(root), str(refs["base", None]["ckpt"])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[proc.stderr.find("Traceback"):][:6000]
    vol = [v for r in range(WORLD) for v in json.loads((root / f"volume_{r}.json").read_text())]
    return {"root": root, "data": data, "refs": refs, "out": torch.load(root / "results.pt", weights_only=True),
            "volume": vol}


def mode_reference(runs, mode: str) -> tuple[dict, dict]:
    """The emulated one-process run a mode must match, and the noise: its gaps to the plain one-process run of the
    same settings."""
    dp, _, kw, _ = MODES[mode]
    name = "no_mtp" if kw == NO_MTP else "muon" if kw == MUON else "base"
    ref, plain = runs["refs"][name, "each" if dp == "fsdp" else "once"], runs["refs"][name, None]
    return ref, gaps(plain, ref)


@pytest.mark.parametrize("mode", [m for m in MODES if MODES[m][3] is None])
def test_two_processes_match_one(runs, mode):
    got = runs["out"][mode]
    ref, noise = mode_reference(runs, mode)
    dp, ep, kw, _ = MODES[mode]
    check(got, ref, noise, exact=dp == "ddp" and ep == 1)  # DDP: the same arithmetic, op for op
    moved = sum(int(v.abs().sum() > 0) for k, v in ref["sd"].items() if "e_score_correction_bias" in k)
    assert moved >= (1 if kw == NO_MTP else 2)  # the MoE layer and the MTP block's MoE
    if kw == NO_MTP:  # the MTP modules untouched, exactly (no weight decay step either)
        for k, v in ref["sd"].items():
            if k.startswith("mtp."):
                assert torch.equal(got["sd"][k], v), k
    if kw == MUON:  # Muon did move the matrices, and not as AdamW's reference did
        key = "layers.0.self_attn.o_proj.weight"
        assert (got["sd"][key] - runs["refs"]["base", "once"]["sd"][key]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", [m for m in MODES if MODES[m][3] is not None])
def test_negative_controls_fail_the_check(runs, mode):
    """A missing gradient all-reduce, and expert gradients off by the world size, are caught by the bounds the
    real modes pass."""
    ref, noise = mode_reference(runs, mode)
    with pytest.raises(AssertionError, match="gap > bound"):
        check(runs["out"][mode], ref, noise, exact=False)


def test_expert_parallel_sends_tokens_only_to_their_experts_ranks(runs):
    vol = runs["volume"]
    assert len(vol) == 2 * WORLD * 2  # 2 EP modes x 2 ranks x 2 MoE layers
    remote_rows = 0
    for v in vol:
        assert v["sent"] == v["expected"], v  # rows to each rank == (token, expert) pairs that rank owns
        remote_rows += sum(n for p, n in enumerate(v["sent"]) if p != v["rank"])
    assert remote_rows > 0


def test_checkpoint_from_two_processes_resumes_exactly_and_loads_in_one(runs, tmp_path):
    r = runs["out"]["resume"]
    assert r["resumed"] == r["after"]  # bit for bit in 2 processes
    for k, v in r["sd_after"].items():
        assert torch.equal(r["sd_resumed"][k], v), k
    # its checkpoint holds exactly the 2-process state, and loads as a model
    model = load_model(r["ckpt"], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, r["sd_first"][k]), k
    # the 2-process run (FSDP2 + EP) follows its emulation; a 1-process run continues its checkpoint the same way
    ref, noise = mode_reference(runs, "ep_fsdp")
    tol = bound(noise)["loss"]
    emu = runs["refs"]["base", "each"]["loss"]
    assert max(abs(a - b) for a, b in zip(r["first"], emu[:2])) <= tol
    one = Trainer(make_cfg(runs["data"], tmp_path / "one", WORLD * B), resume=r["ckpt"])
    assert one.step == 2
    cont = [emulated_step(one, WORLD, reduce_each=True)["loss"] for _ in range(2)]
    assert max(abs(a - b) for a, b in zip(cont, r["after"])) <= tol
    # and a 1-process checkpoint (the plain reference at step 2) continues in 2 processes
    assert abs(r["from_one"] - runs["refs"]["base", None]["loss"][2]) <= tol


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
