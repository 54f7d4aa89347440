"""`qiusuo bench train`: training tokens/s and MFU on the `bench` config, fp32 and bf16 autocast, against
transformers' `DeepseekV3ForCausalLM` with the same config, weights, inputs and dtype policy in the same run."""

from __future__ import annotations

import argparse

import torch

from qiusuo.config import count_params, get_config
from qiusuo.model.moe import update_balance_bias
from qiusuo.model.transformer import Transformer
from qiusuo.perf.common import device_sync, matmul_peak, median_time, train_flops_per_token, transformers_twin


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench", help="model size from the registry")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="precisions to measure (bf16 = autocast; slow on CPUs without native bf16)")


def step_fn(model, x, y, opt, autocast_dtype, qiusuo: bool):
    device_type = x.device.type

    def step():
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            if qiusuo:
                loss = model(x, labels=y, mtp_weight=0.0).loss
            else:
                logits = model(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if qiusuo:
            update_balance_bias(model, 1e-3)

    return step


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = get_config(args.preset, num_nextn_predict_layers=0)
    B, T = args.batch, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.roll(x, -1, dims=1)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    flops_tok = train_flops_per_token(cfg, T, count_params(cfg)["active"])
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    print(f"config {args.preset}: batch {B} x {T} tokens, {flops_tok / 1e6:.1f} MFLOP per token (6N + attention)", flush=True)
    results = {}
    model = Transformer(cfg).to(device).train()
    twin = None if args.no_reference else transformers_twin(model)
    if twin is not None:
        twin.train()
    variants = {"fp32": None, "bf16": torch.bfloat16}
    for name in args.dtypes:
        dt = variants[name]
        runs = [("qiusuo", model, True)]
        if twin is not None:
            runs.append(("transformers", twin, False))
        for who, m, ours in runs:
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            t = median_time(step_fn(m, x, y, opt, dt, ours), repeats=args.repeats, warmup=2, sync=device_sync(device))
            tps = B * T / t
            mfu = tps * flops_tok / peaks[name]
            results[(who, name)] = tps
            print(f"{name:5s} {who:15s} {tps:10.0f} tokens/s   MFU {100 * mfu:5.1f}%", flush=True)
        if twin is not None:
            print(f"{name:5s} speedup over transformers: {results[('qiusuo', name)] / results[('transformers', name)]:.2f}x", flush=True)
    return {f"{w}/{n}": v for (w, n), v in results.items()}
