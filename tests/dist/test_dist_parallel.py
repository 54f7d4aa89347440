"""Two CPU processes (gloo, launched by torchrun) against one process on the same global batch: DDP, FSDP2, expert
parallel (with DDP and with FSDP2) give the same losses, updated weights and balancing bias over 3 optimizer steps;
expert parallel sends each token only to its experts' ranks; checkpoints move between 2 processes and 1.

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
MODES = {"ddp": ("ddp", 1, {}), "fsdp": ("fsdp", 1, {}), "ep_ddp": ("ddp", 2, {}), "ep_fsdp": ("fsdp", 2, {}),
         "ep_ddp_no_mtp": ("ddp", 2, NO_MTP), "ddp_muon": ("ddp", 1, MUON), "ep_ddp_muon": ("ddp", 2, MUON)}


def make_cfg(data_dir, out_dir, batch_size, dp="none", ep=1, **kw):
    """A very small MoE (1 dense + 1 MoE layer + an MoE MTP block, 8 experts, K=2, noaux_tc bias) with a fast
    bias (gamma 1e-2), so that 3 steps move it visibly. (lr 2e-3: Adam turns fp32 rounding in a near-zero gradient
    into an update difference proportional to lr: 1.6e-5 at lr 1e-2 in one lm_head element.)"""
    over = {"data.dir": str(data_dir), "run.out_dir": str(out_dir), "run.progress": False, "run.threads": 1,
            "run.device": "cpu", "data.batch_size": batch_size, "data.seq_len": 16, "train.steps": 10,
            "train.grad_accum": 2, "optim.lr": 2e-3, "schedule.warmup_steps": 1, "balance.gamma": 1e-2,
            "eval.every": 0, "checkpoint.every": 0, "model.max_position_embeddings": 32, "model.hidden_size": 32,
            "model.intermediate_size": 64, "model.moe_intermediate_size": 16, "parallel.dp": dp, "parallel.ep": ep,
            "parallel.timeout_s": 60}
    return load_run_config("pretrain-tiny", {**over, **kw})


def worker(data_dir: Path, out: Path, ref_ckpt: Path) -> None:
    """Runs under torchrun (2 processes). Rank 0 writes results.pt; every rank writes its all-to-all counts."""
    from qiusuo.model.moe import moe_routers
    from qiusuo.train.distributed import Distributed, ExpertParallel

    results, volume = {}, []
    for name, (dp, ep, kw) in MODES.items():
        cfg = make_cfg(data_dir, out / name, B, dp, ep, **kw)
        dist = Distributed.from_env(cfg.parallel, "cpu")
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
        if experts and not kw:  # (Muon and no-MTP runs route the same way: counted once)
            volume += [{"rank": dist.rank, "layer": i, "sent": e.sent_rows.tolist(), "expected": expected[i].tolist(),
                        "K": t.model_cfg.num_experts_per_tok}
                       for i, e in enumerate(experts)]
        sd, _ = dist.full_state(t.model, t.optimizer)
        results[name] = {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps], "sd": sd}

    # resume in 2 processes (FSDP2 + EP=2): steps 1-2, checkpoint, steps 3-4; a fresh trainer resumes from step 2
    cfg = make_cfg(data_dir, out / "resume", B, "fsdp", 2)
    t = Trainer(cfg, dist=Distributed.from_env(cfg.parallel, "cpu"))
    first = [t.train_step()["loss"] for _ in range(2)]
    path = t.save_checkpoint()
    after = [t.train_step()["loss"] for _ in range(2)]
    sd_a, _ = t.dist.full_state(t.model, t.optimizer)
    t2 = Trainer(cfg, dist=Distributed.from_env(cfg.parallel, "cpu"), resume=path)
    resumed = [t2.train_step()["loss"] for _ in range(2)]
    sd_b, _ = t2.dist.full_state(t2.model, t2.optimizer)
    # a 1-process checkpoint (step 2 of the reference) continued in 2 processes
    t3 = Trainer(cfg, dist=Distributed.from_env(cfg.parallel, "cpu"), resume=ref_ckpt)
    from_one = t3.train_step()["loss"]
    results["resume"] = {"first": first, "after": after, "resumed": resumed, "sd_after": sd_a, "sd_resumed": sd_b,
                         "ckpt": str(path), "from_one": from_one}
    rank = int(os.environ["RANK"])
    (out / f"volume_{rank}.json").write_text(json.dumps(volume))
    if rank == 0:
        torch.save(results, out / "results.pt")
    t.dist.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    prepare(data, max_bytes=60_000, vocab_size=300, val_fraction=0.1, progress=False)
    # the one-process reference on the same global batch (WORLD * B rows per micro-batch)
    ref = Trainer(make_cfg(data, root / "ref", WORLD * B))
    losses = []
    for step in range(STEPS + 1):
        losses.append(ref.train_step()["loss"])
        if step == 1:
            ref_ckpt = ref.save_checkpoint()
            ref_sd = {k: v.clone() for k, v in ref.model.state_dict().items()}
        if step == STEPS - 1:
            final_sd = {k: v.clone() for k, v in ref.model.state_dict().items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           __file__, str(data), str(root), str(ref_ckpt)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[proc.stderr.find("Traceback"):][:6000]
    vol = [v for r in range(WORLD) for v in json.loads((root / f"volume_{r}.json").read_text())]
    others = {}
    for name, kw in (("no_mtp", NO_MTP), ("muon", MUON)):  # the one-process references of the other modes
        t = Trainer(make_cfg(data, root / f"ref_{name}", WORLD * B, **kw))
        others[name] = ([t.train_step()["loss"] for _ in range(STEPS)], t.model.state_dict())
    return {"root": root, "data": data, "ref_loss": losses, "ref_sd": final_sd, "ref_ckpt_sd": ref_sd,
            "ref_no_mtp": others["no_mtp"], "ref_muon": others["muon"],
            "out": torch.load(root / "results.pt", weights_only=True), "volume": vol}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_processes_match_one(runs, mode):
    got, ref_loss, ref_sd = runs["out"][mode], runs["ref_loss"][:STEPS], runs["ref_sd"]
    if MODES[mode][2] == NO_MTP:
        ref_loss, ref_sd = runs["ref_no_mtp"]
    elif MODES[mode][2] == MUON:
        ref_loss, ref_sd = runs["ref_muon"]
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref_loss), rtol=0, atol=1e-5)
    assert set(got["sd"]) == set(ref_sd)
    moved = 0
    for k, v in ref_sd.items():
        torch.testing.assert_close(got["sd"][k], v, rtol=0, atol=1e-5, msg=f"{mode}: {k}")
        if MODES[mode][2] == NO_MTP and k.startswith("mtp."):  # untouched, exactly (no weight decay step either)
            assert torch.equal(got["sd"][k], v), k
        if "e_score_correction_bias" in k:  # the balancing bias: identical, and it did move
            assert torch.equal(got["sd"][k], v), k
            moved += int(v.abs().sum() > 0)
    assert moved >= (1 if MODES[mode][2] == NO_MTP else 2)  # the MoE layer and the MTP block's MoE
    if MODES[mode][2] == MUON:  # Muon did move the matrices, and not as AdamW's reference did
        key = "layers.0.self_attn.o_proj.weight"
        assert (got["sd"][key] - runs["ref_sd"][key]).abs().max() > 1e-4


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
    # the 2-process run's first steps are the reference's; its checkpoint loads in one process and in load_model
    torch.testing.assert_close(torch.tensor(r["first"]), torch.tensor(runs["ref_loss"][:2]), rtol=0, atol=1e-5)
    one = Trainer(make_cfg(runs["data"], tmp_path / "one", WORLD * B), resume=r["ckpt"])
    assert one.step == 2
    torch.testing.assert_close(torch.tensor([one.train_step()["loss"] for _ in range(2)]), torch.tensor(r["after"]),
                               rtol=0, atol=1e-5)
    model = load_model(r["ckpt"], progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, runs["ref_ckpt_sd"][k], rtol=0, atol=1e-5, msg=k)
    # and a 1-process checkpoint continues in 2 processes
    assert abs(r["from_one"] - runs["ref_loss"][2]) < 1e-5


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
