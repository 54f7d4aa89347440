"""`qiusuo bench quant`: batch-1 and batch-8 decoding of packed weights (`qiusuo.quant`) through the serving engine's
default path (eager, as `qiusuo serve` runs without flags), at published per-layer shapes, against the memory
bandwidth roofline measured in the same run and, given a llama.cpp build (`--llama-cpp DIR`, made by
qiusuo/bench/setup_llama_cpp.sh), against llama.cpp on the same weights at Q8_0 and Q4_0.

Shapes (`--shape`): a few layers of a published model with random weights; the expert count is cut to fit this
machine's memory (`--experts`), since what one token reads is set by hidden size, expert width and top-k:
- v3: DeepSeek-V3's layer (hidden 7168, MLA with q LoRA 1536 and kv LoRA 512, 128 heads of 128 + 64, experts of
  width 2048, top-8 and 1 shared);
- v4-flash: DeepSeek-V4-Flash's layer (hidden 4096, CSA and HCA attention, experts of width 2048, top-6 and 1
  shared);
- 760m: the 760M-parameter V3-architecture model of issue 25 (hidden 1024, 8 layers of which 6 MoE, 64 experts
  top-6 + 1 shared of width 512, q LoRA 768, kv LoRA 512, vocab 32k), whole.

Bytes read per token (the roofline's numerator): every packed or float matrix a decoding step reads, counted from
the modules themselves: all attention, dense, shared-expert and head matrices once per step (shared by the batch),
the routed experts the batch's tokens chose (expected distinct experts for B tokens choosing K of E at random:
E (1 - (1 - K/E)^B)), one embedding row per token. Roofline tokens/s = bandwidth / bytes per token; the figure
reported is the fraction of it reached.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from qiusuo.bench.common import bench_tokenizer
from qiusuo.config import PRESETS, get_config
from qiusuo.model.moe import Experts
from qiusuo.model.transformer import Transformer
from qiusuo.quant.apply import families, parse_spec, quantize_model, set_activations
from qiusuo.quant.modules import QuantExperts, QuantLinear
from qiusuo.runtime import set_threads

SHAPES = {
    "v3": ("deepseek-v3", dict(num_hidden_layers=2, first_k_dense_replace=0, n_group=1, topk_group=1)),
    "v4-flash": ("deepseek-v4-flash", dict(num_hidden_layers=2)),
    "760m": ("deepseek-v3", dict(hidden_size=1024, num_hidden_layers=8, first_k_dense_replace=2, intermediate_size=2816,
                                 num_attention_heads=8, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=64,
                                 qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6,
                                 n_shared_experts=1, moe_intermediate_size=512, n_group=1, topk_group=1,
                                 vocab_size=32000, max_position_embeddings=4096, rope_scaling=None)),
}
DEFAULT_FORMATS = "bf16,int8,int4,int4:128,fp8,mxfp4"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="v3", choices=list(SHAPES), help="whose per-layer shapes")
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer (v3, v4-flash: cut to fit memory)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: 2 for v3 / v4-flash, 8 for 760m)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (v3, v4-flash)")
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated weight formats for every family "
                   "(fp32 too: the float model itself)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="sequences decoded together")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (serve --compile) "
                   "instead of eagerly; compiling costs a minute or more per format")
    p.add_argument("--activations", default="q8", choices=["q8", "fp32"], help="the packed layers' decoding "
                   "arithmetic, as serve's --activations (q8: the default engine path)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR", help="a llama.cpp build (setup_llama_cpp.sh DIR): "
                   "the same weights at Q8_0 and Q4_0 (and bf16) through llama-bench")
    p.add_argument("--out", default=None, help="folder for quant.json and quant.png (default: none)")
    p.add_argument("--quality", default=None, metavar="MODEL_DIR", help="instead of speed: bits per byte of this "
                   "model (e.g. runs/demo/model) on the whole validation split of --data, in fp32 and each format")
    p.add_argument("--data", default="runs/data", help="with --quality: the prepared data (qiusuo prepare)")


def config_of(args: argparse.Namespace):
    preset, over = SHAPES[args.shape]
    over = dict(over, num_nextn_predict_layers=0)
    if args.shape != "760m":
        over.update(n_routed_experts=args.experts, vocab_size=args.vocab, max_position_embeddings=4096)
        if args.shape == "v3":
            over["rope_scaling"] = None
    if args.layers:
        over["num_hidden_layers"] = args.layers
    if args.shape == "v4-flash":  # the compressed layers' kinds (CSA, HCA, ...: past the two sliding-window ones),
        # every MLP a routed MoE (a hash layer reads as many bytes per token)
        n = over["num_hidden_layers"]
        over.update(layer_types=PRESETS[preset]["layer_types"][2: 2 + n], mlp_layer_types=["moe"] * n)
    return get_config(preset, **over)


@torch.no_grad()
def random_model(cfg) -> Transformer:
    """Random weights in bf16 (the formats are made from these), built without an fp32 copy."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.cast(torch.bfloat16).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t.normal_(0, 0.02, generator=g) if t.dim() >= 2 else t.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("tid2eid"):
            t.copy_(torch.randint(0, cfg.n_routed_experts, t.shape, generator=g))
        else:
            t.zero_()
    from qiusuo.hf.load import _init_nonpersistent

    _init_nonpersistent(model, torch.device("cpu"))
    return model.eval()


def packed_copy(model: Transformer, fmt: str) -> Transformer:
    """`model` with the families packed in `fmt` and every other weight in float32, as `qiusuo serve` loads a
    checkpoint on a CPU (`--dtype` float32, `--quantize`); "fp32": a float32 copy. `model` itself is unchanged."""
    if fmt == "fp32":
        return copy.deepcopy(model).float()
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = quantize_model(copy.deepcopy(model, memo=dict(shared)), parse_spec(fmt))
    for m in twin.modules():  # new float32 parameters for the rest: the shared bf16 ones stay `model`'s
        for name, p in list(m._parameters.items()):
            if p is not None and p.dtype == torch.bfloat16:
                m._parameters[name] = torch.nn.Parameter(p.float(), requires_grad=False)
    return twin


def bytes_per_token(model: Transformer, batch: int) -> tuple[float, float]:
    """(bytes a decoding step reads per token at `batch`, bits per weight of the packed matrices)."""
    cfg = model.cfg
    step, weights, wbytes = 0.0, 0, 0
    for path, fam in families(model).items():
        m = model.get_submodule(path)
        if isinstance(m, (QuantExperts, Experts)):
            tensors = [t for t in m.state_dict().values()]
            per_expert = sum(t.numel() * t.element_size() for t in tensors) / cfg.n_routed_experts
            E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
            step += per_expert * E * (1 - (1 - K / E) ** batch)
            n = sum(t.numel() for t in (m.gate_up_proj, m.down_proj)) * (2 if isinstance(m, QuantExperts) and m.fmt.packed else 1)
        else:
            tensors = list(m.state_dict().values())
            step += sum(t.numel() * t.element_size() for t in tensors)
            n = m.in_features * m.out_features if isinstance(m, QuantLinear) else m.weight.numel()
        weights += n
        wbytes += sum(t.numel() * t.element_size() for t in tensors)
    # everything else a step reads: norms, routers, kv_b_proj, MTP-free extras (small), one embedding row per token
    other = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                if not n.startswith("embed_tokens") and not any(n.startswith(p + ".") for p in families(model)))
    emb = model.embed_tokens.weight
    step += other + batch * emb.shape[1] * emb.element_size()
    return step / batch, 8 * wbytes / weights


def read_bandwidth(threads: int) -> float:
    """Bytes/s of the best of 5 sums over a 1 GiB float32 tensor at the benchmark's thread count."""
    big = torch.ones(2**28)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        best = max(best, big.numel() * 4 / (time.perf_counter() - t))
    del big
    return best


def decode_speed(model: Transformer, tok, batch: int, new: int, prompt_len: int, repeats: int,
                 compile: bool = False) -> float:
    """Decoding tokens/s of the serving engine (eager, or compiled: `serve --compile`): (time to generate `new` tokens - time to generate 1) per
    token after the first, so the prompt's prefill is not counted (llama-bench's `-n` measures generation alone
    too). Median of `repeats` after a warm-up; fresh prompts each run (no prefix-cache hits)."""
    import statistics

    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams

    engine = Engine(model, tok, max_batch=batch, block_size=16, max_model_len=prompt_len + new, compile=compile)
    g = torch.Generator().manual_seed(0)

    def timed(n: int) -> float:
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        t = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t

    timed(new)  # warm-up (compiled: the one shape both runs take, rows and context padded)
    runs = [timed(new) - timed(1) for _ in range(repeats)]
    return batch * (new - 1) / statistics.median(runs)


@torch.no_grad()
def val_bpb(model: Transformer, data_dir: str, seq_len: int = 256, batch: int = 8) -> float:
    """Bits per byte of `model` on the whole validation split of `data_dir`, in order (as the trainer's final
    evaluation): mean cross-entropy / ln 2 / bytes per token."""
    import math

    from qiusuo.data.shards import BatchLoader, TokenShards

    val = TokenShards(Path(data_dir) / "val")
    loader = BatchLoader(val, batch, seq_len, shuffle=False)
    nats = tokens = 0.0
    for _ in range(loader.steps_per_epoch):
        x, y = next(loader)
        nats += model(x, labels=y, mtp_weight=0.0).ce.item() * y.numel()
        tokens += y.numel()
    return nats / tokens / math.log(2) / val.bytes_per_token


def quality(args: argparse.Namespace) -> dict:
    """`--quality DIR`: the model's validation bits per byte in fp32 and in each format (every family packed), twice
    per format: as prefill computes (the stored weights, dequantised, times float activations) and as decoding
    computes (every matmul through the kernels with `--activations`)."""
    from qiusuo.hf.load import load_model

    threads = set_threads(torch.device("cpu"), args.threads)
    rows = []
    ref = None
    for fmt in ["fp32", *args.formats.split(",")]:
        model = load_model(args.quality, dtype=torch.float32, quantize=None if fmt == "fp32" else fmt, progress=False)
        for path in ["weights"] if fmt == "fp32" else ["weights", "decode"]:
            if path == "decode":
                set_activations(model, args.activations, kernel_rows=2**62)
            bpb = val_bpb(model, args.data, min(256, model.cfg.max_position_embeddings))
            ref = ref if ref is not None else bpb
            rows.append({"format": fmt, "path": path, "bpb": bpb, "relative": bpb / ref - 1})
            acts = ",".join(sorted({m.act for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))}))
            what = "" if fmt == "fp32" else f" {path}" + (f" ({acts})" if path == "decode" else "")
            print(f"{fmt:9s}{what:16s} {bpb:.4f} bits per byte ({100 * (bpb / ref - 1):+.2f}% vs fp32)", flush=True)
        del model
    out = {"model": args.quality, "data": args.data, "threads": threads, "activations": args.activations,
           "rows": rows, "lscpu": cpu_name()}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "quant_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def run(args: argparse.Namespace) -> dict:
    if args.quality:
        return quality(args)
    threads = set_threads(torch.device("cpu"), args.threads)
    cfg = config_of(args)
    print(f"shape {args.shape}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} "
          f"experts top-{cfg.num_experts_per_tok} of width {cfg.moe_intermediate_size}, vocab {cfg.vocab_size}; "
          f"{threads} threads", flush=True)
    base = random_model(cfg)
    tok = bench_tokenizer()
    bw = read_bandwidth(threads)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (sum over 1 GiB, {threads} threads)", flush=True)
    rows = []
    who = "qiusuo-compiled" if args.compile else "qiusuo"
    for fmt in args.formats.split(","):
        model = set_activations(packed_copy(base, fmt), args.activations)
        for B in args.batch:
            per_token, bits = bytes_per_token(model, B)
            tps = decode_speed(model, tok, B, args.new_tokens, args.prompt_len, args.repeats, args.compile)
            roof = bw / per_token
            rows.append({"who": who, "format": fmt, "batch": B, "tokens_per_s": tps, "bits": bits,
                         "bytes_per_token": per_token, "roofline": roof, "fraction": tps / roof})
            print(f"{who:10s} {fmt:9s} batch {B:2d}: {tps:8.1f} tokens/s  {per_token / 1e6:8.1f} MB/token  "
                  f"{bits:5.2f} bits/weight  {100 * tps / roof:5.1f}% of the roofline", flush=True)
        del model
    if args.llama_cpp:
        rows += llama_rows(args, base, tok, bw)
    out = {"shape": args.shape, "threads": threads, "bandwidth": bw, "rows": rows, "lscpu": cpu_name()}
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "quant.json").write_text(json.dumps(out, indent=2) + "\n")
        plot(out, folder / "quant.png")
    return out


def llama_rows(args, base: Transformer, tok, bw: float) -> list[dict]:
    """llama.cpp on the same weights: our bf16 export converted to GGUF, quantised to Q8_0 and Q4_0, llama-bench."""
    import tempfile

    from qiusuo.bench.llama_cpp import LlamaCpp
    from qiusuo.hf.save import save_hf

    lc = LlamaCpp.from_dir(args.llama_cpp)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        save_hf(base, Path(d) / "hf", tokenizer=tok, progress=False)
        bf16 = Path(d) / "bf16.gguf"
        lc.to_gguf(Path(d) / "hf", bf16, "bf16")
        ggufs = {"bf16": bf16}
        for q in ("Q8_0", "Q4_0"):
            ggufs[q] = Path(d) / f"{q}.gguf"
            lc.quantize(bf16, ggufs[q], q, threads=args.threads, pure=True)  # the head too, as our "int4"
        for name, path in ggufs.items():
            size = path.stat().st_size
            for B in args.batch:
                tps = lc.bench(path, threads=args.threads, n_gen=args.new_tokens * 2, batch=B).mean
                rows.append({"who": "llama.cpp", "format": name, "batch": B, "tokens_per_s": tps,
                             "gguf_bytes": size})
                print(f"llama.cpp  {name:9s} batch {B:2d}: {tps:8.1f} tokens/s  (GGUF {size / 1e9:.2f} GB)", flush=True)
    return rows


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = {"bf16": 16, "Q8_0": 8.5, "Q4_0": 4.5}
    fig, axes = plt.subplots(1, len({r["batch"] for r in out["rows"]}), figsize=(11, 4), squeeze=False)
    for ax, B in zip(axes[0], sorted({r["batch"] for r in out["rows"]})):
        for who, marker in (("qiusuo", "o"), ("qiusuo-compiled", "^"), ("llama.cpp", "s")):
            rs = [r for r in out["rows"] if r["who"] == who and r["batch"] == B]
            if not rs:
                continue
            xs = [r.get("bits", bits.get(r["format"], 0)) for r in rs]
            ax.scatter(xs, [r["tokens_per_s"] for r in rs], marker=marker, label=who)
            for x, r in zip(xs, rs):
                ax.annotate(r["format"], (x, r["tokens_per_s"]), fontsize=7)
        ax.set(xlabel="bits per weight (scales included)", ylabel="decode tokens/s", title=f"batch {B}")
        ax.legend()
    fig.suptitle(f"{out['shape']} shapes, {out['threads']} threads, {out['lscpu']}, "
                 f"{out['bandwidth'] / 1e9:.0f} GB/s read", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
