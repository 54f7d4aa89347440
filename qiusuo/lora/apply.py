"""Which layers take adapters, and adapters added to a model, frozen around, and merged back, all from outside its
math (the model classes know nothing of adapters).

Targets are tensor families (DESIGN.md section 7), the ones `qiusuo.quant.apply.families` finds by module type:
- `attention`: every linear projection of the attention (MLA's, V3.2's indexer, V4's compressed attention and its
  compressor and indexer), MLA's `kv_b_proj` included (`LoraLatent` folds into the absorbed decoding path);
  not V4's grouped output projection `o_a_proj` (a per-group einsum: transformers' and peft's V4 have no plain
  linear there to name an adapter by);
- `experts`: both matrices of every routed-expert bank, one adapter per expert (3D A and B);
- `shared`, `dense`: the shared experts' MLP and the dense layers' MLPs.
Never the embeddings, the head or the MTP modules (transformers has no MTP module for peft to put an adapter on).
Routers and norms can train in full instead (`trainable`: peft's `modules_to_save`).

Ranks: r on every matrix, and 2r with alpha 2 alpha (the same scale) on the experts' fused gate_up, as peft itself
converts a rank-r adapter on per-expert gate_proj and up_proj onto transformers 5's fused experts (`rank_pattern`
`.*\\.gate_up_proj`): the capacity of separate gate and up adapters, and peft's own files read back unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qiusuo.lora.layers import LoraExperts, LoraLatent, LoraLayer, LoraLinear, init_adapter, lora_layers
from qiusuo.model.compressed_attention import GroupedLinear
from qiusuo.model.mla import LatentProjection
from qiusuo.model.moe import Experts, HashRouter, Router
from qiusuo.model.rope import RMSNorm

FAMILIES = ("attention", "experts", "shared", "dense")


def parse_targets(spec: str | list | tuple) -> list[str]:
    """"attention,experts" (or a list) -> the families, checked; ValueError naming an unknown one."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    bad = [t for t in names if t not in FAMILIES]
    if bad or not names:
        raise ValueError(f"lora.targets={spec!r}: {'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty'}; "
                         f"name tensor families from {', '.join(FAMILIES)}")
    return names


def target_modules(model: nn.Module, families: list[str] | None = None) -> dict[str, str]:
    """Module path -> family of every layer an adapter of `families` (default: all) wraps, in module order."""
    from qiusuo.quant.apply import families as tensor_families  # quant's families, by module type

    wanted = set(families or FAMILIES)
    found = dict(tensor_families(model))
    for path, m in model.named_modules():
        if isinstance(m, LatentProjection):  # quant leaves kv_b_proj out (absorbed path); an adapter folds into it
            found[path] = "attention"
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    grouped = {p for p, m in model.named_modules() if isinstance(m, GroupedLinear)}  # V4's wo_a: no adapter kind yet
    return {p: f for p, f in sorted(found.items(), key=lambda pf: order[pf[0]])
            if f in wanted and not p.startswith("mtp.") and ".base_layer" not in p and p not in grouped}


def wrap(model: nn.Module, path: str, n: int, ranks: dict[str, int], dropout: float = 0.0) -> LoraLayer:
    """Replace the layer at `path` by its adapter kind with a bank of `n` zero adapters of `ranks` ({"lora": r}, or
    {"gate_up": r, "down": r'} for experts). Returns the new layer."""
    base = model.get_submodule(path)
    if isinstance(base, Experts):
        layer = LoraExperts(base, n, ranks["gate_up"], ranks["down"], dropout)
    else:
        kind = LoraLatent if isinstance(base, LatentProjection) else LoraLinear
        layer = kind(base, n, ranks["lora"], dropout)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, layer)
    return layer


def pair_ranks(layer_or_base: nn.Module, rank: int) -> dict[str, int]:
    """The ranks a layer's adapter gets for a run's `rank`: r, and 2r on the experts' gate_up (module docstring)."""
    if isinstance(layer_or_base, (Experts, LoraExperts)):
        return {"gate_up": 2 * rank, "down": rank}
    return {"lora": rank}


def scale_of(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's multiplier: alpha / r (rsLoRA: alpha / sqrt(r), Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str | list = FAMILIES, dropout: float = 0.0,
             seed: int = 0, rslora: bool = False) -> list[str]:
    """Wrap every layer of `targets` with one fresh adapter (A random, B zero: the model computes exactly what it
    did). Returns the wrapped module paths. ValueError when nothing matches."""
    if rank < 1:
        raise ValueError(f"lora.rank={rank}: an adapter needs rank >= 1 (0 turns adapters off)")
    paths = list(target_modules(model, parse_targets(targets)))
    if not paths:
        raise ValueError(f"lora.targets={targets!r}: this model has no such layers")
    gen = torch.Generator().manual_seed(seed)
    scale = scale_of(alpha, rank, rslora)
    for path in paths:
        layer = wrap(model, path, 1, pair_ranks(model.get_submodule(path), rank), dropout)
        init_adapter(layer, 0, gen)
        for _, _, _, s in layer.pairs():
            s.fill_(scale)
    return paths


def extra_trainable(model: nn.Module, router: bool, norms: bool) -> dict[str, nn.Parameter]:
    """Parameters that train in full beside the adapters: the routers' weights and / or the norms' gains (not the
    MTP modules'), by name."""
    out = {}
    for path, m in model.named_modules():
        if path.startswith("mtp."):
            continue
        if (router and isinstance(m, (Router, HashRouter))) or (norms and isinstance(m, RMSNorm)):
            out[f"{path}.weight" if path else "weight"] = m.weight
    return out


def freeze_base(model: nn.Module, router: bool = False, norms: bool = False) -> list[str]:
    """Only the adapters (and the routers' / norms' weights when asked) keep `requires_grad`; the base is frozen in
    whatever format it was loaded. Returns the trainable parameter names."""
    model.requires_grad_(False)
    for m in lora_layers(model):
        for _, A, B, _ in m.pairs():
            A.requires_grad_(True)
            B.requires_grad_(True)
    for p in extra_trainable(model, router, norms).values():
        p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_paths(model: nn.Module) -> dict[str, LoraLayer]:
    """Module path -> adapter layer."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def delta_weight(layer: LoraLayer, pair: str, index: int = 0) -> torch.Tensor:
    """scale * B A of adapter `index` on one matmul, float32: (N, K), or (E, N, K) for experts."""
    _, A, B, s = next(p for p in layer.pairs() if p[0] == pair)
    return torch.matmul(B[index].float(), A[index].float()) * float(s[index])


@torch.no_grad()
def merge_lora(model: nn.Module, index: int = 0) -> nn.Module:
    """Bake adapter `index` into every base (W + scale B A) and unwrap: the plain model again, same names. A packed
    base is dequantised, added to and quantised again into its own format (one band, one expert at a time).
    Returns the model."""
    from qiusuo.quant.modules import QuantExperts, QuantLinear, fill_rows

    for path, layer in lora_paths(model).items():
        base = layer.base_layer
        if isinstance(layer, LoraExperts):
            for pair, name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                d = delta_weight(layer, pair, index)  # (E, N, K)
                if isinstance(base, QuantExperts):
                    q, s = getattr(base, name), getattr(base, f"{name}_scale")
                    for e in range(base.num_experts):
                        w = base.fmt.dequantize(q[e], None if s is None else s[e]) + d[e].to(q.device)
                        fill_rows(base.fmt, q[e], None if s is None else s[e], w)
                else:
                    w = getattr(base, name)
                    w.copy_((w.float() + d.to(w.device)).to(w.dtype))
        else:
            d = delta_weight(layer, "lora", index)
            if isinstance(base, QuantLinear):
                base.fill(base.dequantized() + d.to(base.weight.device))
            else:
                base.weight.copy_((base.weight.float() + d.to(base.weight.device)).to(base.weight.dtype))
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, base)
    return model
