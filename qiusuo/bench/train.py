"""`qiusuo bench train`: training tokens/s and MFU on the `bench` model size, fp32 and bf16 (ours: a bf16 copy with
fp32 master weights; transformers: autocast), against transformers' `DeepseekV3ForCausalLM` with the same config,
weights, inputs and optimizer in the same run.

Settings are the one run config every command that trains reads (`--config`, default the `pretrain-bench` run
preset, then `--section.key=value`; `--batch`, `--seq-len`, `--preset`, `--device`, `--threads` are aliases of
`data.batch_size`, `data.seq_len`, `model.preset`, `run.device`, `run.threads`). Our step is THE training step
(`qiusuo.train.step.TrainStep`: forward, backward, AdamW from `[optim]`, balancing-bias update with
`balance.gamma`), so the figure is what `qiusuo train` gets; `grad_clip=None` skips the gradient norm, as the
reference step (forward, cross-entropy, backward, the same AdamW groups) does not compute one either. MFU =
achieved model FLOP/s over this machine's matmul peak in that precision, both measured in this run.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from qiusuo.bench.common import transformers_twin
from qiusuo.model.count import count_params, train_flops_per_token
from qiusuo.model.transformer import Transformer
from qiusuo.runtime import device_sync, matmul_peak, median_time, resolve_device, set_threads
from qiusuo.train.config import RunConfig, add_config_args, load_run_config, overrides
from qiusuo.train.optim import build_optimizer
from qiusuo.train.precision import ComputeCopy
from qiusuo.train.step import TrainStep

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # name -> compute dtype (transformers: autocast)
ALIASES = {"--batch": ("data.batch_size", {}), "--seq-len": ("data.seq_len", {}), "--preset": ("model.preset", {}),
           "--device": ("run.device", {}), "--threads": ("run.threads", {"help": "0: the idle cores"})}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS),
                   help="precisions to measure (bf16: ours a bf16 copy with fp32 masters, transformers autocast; "
                        "slow on CPUs without native bf16)")
    add_config_args(p, "pretrain-bench", ALIASES)


def qiusuo_step(model: Transformer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
                cfg: RunConfig | None = None) -> Callable:
    """One optimizer step of `model` on (x, y) (B, T) through `TrainStep`, optimizer and balancing from `cfg`
    (default: the `pretrain-bench` run preset). `dtype` bf16: as `qiusuo train` runs it in one process, on a bf16
    copy with `model` as the fp32 master weights (`qiusuo.train.precision`)."""
    cfg = cfg or load_run_config("pretrain-bench")
    compute = ComputeCopy(model, dtype) if dtype is not None else None
    net = compute.module if compute is not None else model
    step = TrainStep(model, build_optimizer(model, cfg.optim), grad_clip=None, gamma=cfg.balance.gamma,
                     compute=compute)
    return lambda: step([(x, y)], lambda b: net(b[0], labels=b[1], mtp_weight=0.0), lr=cfg.optim.lr)


def reference_step(twin, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None, cfg: RunConfig) -> Callable:
    """transformers' training step as its users write it: forward, cross-entropy in fp32, backward, AdamW (the
    same parameter groups and settings as ours)."""
    opt = build_optimizer(twin, cfg.optim)

    def step():
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = twin(input_ids=x).logits  # (B, T, vocab)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(args: argparse.Namespace) -> dict[str, float]:
    """{"who/precision": tokens/s}; prints tokens/s, MFU and the ratio to transformers per precision."""
    run_cfg = load_run_config(args.config or args.default_config, overrides(args))
    device = resolve_device(run_cfg.run.device)
    set_threads(device, run_cfg.run.threads)
    torch.manual_seed(0)  # inputs, then the peak's operands, then the weights: the same draws in every run
    cfg = run_cfg.model.build().replace(num_nextn_predict_layers=0)  # the main model only
    B, T = run_cfg.data.batch_size, run_cfg.data.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.roll(x, -1, dims=1)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    flops_tok = train_flops_per_token(cfg, T, count_params(cfg)["active"])
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    print(f"model {run_cfg.model.preset}: batch {B} x {T} tokens, {flops_tok / 1e6:.1f} MFLOP per token (6N + attention)", flush=True)
    model = Transformer(cfg).to(device).train()
    twin = None if args.no_reference else transformers_twin(model)[0]
    if twin is not None:
        twin.train()
    results = {}
    for name in args.dtypes:
        dt = PRECISIONS[name]
        steps = {"qiusuo": qiusuo_step(model, x, y, dt, run_cfg)}
        if twin is not None:
            steps["transformers"] = reference_step(twin, x, y, dt, run_cfg)
        for who, step in steps.items():
            t = median_time(step, repeats=args.repeats, warmup=2, sync=device_sync(device))
            tps = B * T / t
            results[f"{who}/{name}"] = tps
            print(f"{name:5s} {who:15s} {tps:10.0f} tokens/s   MFU {100 * tps * flops_tok / peaks[name]:5.1f}%", flush=True)
        if twin is not None:
            ratio = results[f"qiusuo/{name}"] / results[f"transformers/{name}"]
            print(f"{name:5s} speedup over transformers: {ratio:.2f}x", flush=True)
    return results
