"""Adapters in peft's format, the one people exchange: a folder with `adapter_config.json` (peft's `LoraConfig`) and
`adapter_model.safetensors`, named as peft names them on transformers' DeepSeek models.

Names (peft 0.21 on transformers 5, read in `peft/tuners/lora/layer.py::ParamWrapper` and checked by saving real
peft adapters: tests/lora/test_peft.py):
- a linear layer at module path P: `base_model.model.model.P.lora_A.weight` (r, K) and `.lora_B.weight` (N, r);
- routed experts, transformers 5's fused 3D `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I), are peft
  `target_parameters` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): each a `ParamWrapper`, the second
  wrapping the first, so the down adapter is `P.lora_A.weight` (E*r, I), `P.lora_B.weight` (D, r*E) and the
  gate_up adapter `P.base_layer.lora_A.weight` (E*r, D), `P.base_layer.lora_B.weight` (2I, r*E) (one of them
  alone: `P.lora_*`). Expert e's A is rows e*r..(e+1)*r of lora_A; its B is columns e, E + e, 2E + e, ... of
  lora_B (`lora_B.reshape(N, r, E)[:, :, e]`): peft's own reshape;
- routers and norms trained in full: peft's `modules_to_save`, stored under their own names (`P.weight`).
Also read: the per-expert layout of adapters trained on transformers 4 or DeepSeek's remote code
(`P.experts.{e}.gate_proj.lora_A.weight`, ...): gate and up become one gate_up adapter of rank 2r (A stacked, B
block-diagonal), as peft converts them for transformers 5.

Scales: `lora_alpha / r` (`use_rslora`: / sqrt(r)), with `rank_pattern` / `alpha_pattern` overriding per name as
peft matches them. Not read (refused naming the field): DoRA, LoRA biases, `fan_in_fan_out`, and other peft methods.

Note on peft 0.21 with transformers 5: peft maps any `target_modules` entry named `gate_proj`, `up_proj` or
`down_proj` onto the fused experts (its transformers 4 -> 5 conversion, `_MOE_TARGET_MODULE_MAPPING`), so peft itself
cannot put adapters on a DeepSeek's dense or shared-expert MLPs: an adapter of ours on those families loads in
qiusuo (and names them as vLLM and transformers 4 do), but peft on transformers 5 drops them.

Checked on reading, with one line naming the tensor: every tensor must belong to a layer of this model that takes
an adapter (a wrong base or a wrong target name), with the layer's input and output sizes and its expert count (a
wrong base), and A and B of equal rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qiusuo.families import FAMILIES as MODEL_FAMILIES
from qiusuo.io import CheckpointError, atomic_dir
from qiusuo.lora.apply import extra_trainable, lora_paths, scale_of, target_modules, wrap
from qiusuo.lora.layers import LoraExperts, LoraLayer, expert_dims
from qiusuo.model.moe import Router

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXPERT_PARAMS = {"gate_up": "gate_up_proj", "down": "down_proj"}
# peft config fields that change the math in ways this reader does not implement, with the value that is fine
REFUSED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none", "layer_replication": None,
           "use_qalora": False}


def prefix(model: nn.Module) -> str:
    """What peft puts before a module path of our model: its wrapper, the CausalLM's `model.` and the family's
    text-model prefix (Kimi-K2.5's `language_model.`)."""
    return f"base_model.model.{MODEL_FAMILIES[model.cfg.model_type].prefix}model."


# ---------------------------------------------------------------- writing

def adapter_state(model: nn.Module, index: int = 0, extras: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """peft name -> tensor for adapter `index` of every adapter layer (and `extras`: fully trained tensors by
    their parameter name)."""
    pre, out = prefix(model), {}
    extras = dict(extras or {})
    for name in list(extras):  # peft's modules_to_save stores a router whole: its selection bias too
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        bias = getattr(owner, "e_score_correction_bias", None)
        if isinstance(owner, Router) and bias is not None:
            extras[name.rpartition(".")[0] + ".e_score_correction_bias"] = bias
    for path, layer in lora_paths(model).items():
        pairs = layer.pairs()
        for pair, A, B, _ in pairs:
            a, b = A[index].detach(), B[index].detach()
            if isinstance(layer, LoraExperts):
                E, r, K = a.shape
                key = f"{pre}{path}.base_layer" if pair == "gate_up" and len(pairs) == 2 else f"{pre}{path}"
                out[f"{key}.lora_A.weight"] = a.reshape(E * r, K)
                out[f"{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E)
            else:
                out[f"{pre}{path}.lora_A.weight"] = a
                out[f"{pre}{path}.lora_B.weight"] = b
    for name, t in extras.items():
        out[pre + name] = t.detach()
    return {k: v.float().contiguous().cpu() for k, v in out.items()}


def adapter_config(model: nn.Module, index: int = 0, base: str | None = None, modules_to_save: list[str] | None = None,
                   dropout: float = 0.0) -> dict:
    """peft's `LoraConfig` for adapter `index`: `r` and `lora_alpha` from the linear layers (or the experts'
    down_proj), the experts' gate_up through `rank_pattern` / `alpha_pattern` as peft writes it."""
    ranks: dict[str, tuple[int, float]] = {}  # name peft matches (leaf or mlp.experts.param) -> (rank, scale)
    modules, params = set(), set()
    for path, layer in lora_paths(model).items():
        for pair, A, _, s in layer.pairs():
            if isinstance(layer, LoraExperts):
                key = f"mlp.experts.{EXPERT_PARAMS[pair]}"
                params.add(key)
            else:
                key = path.rpartition(".")[2]
                modules.add(key)
            ranks.setdefault(key, (A.shape[-2], float(s[index])))
    main = next((v for k, v in ranks.items() if not k.endswith("gate_up_proj")), next(iter(ranks.values())))
    r, alpha = main[0], main[1] * main[0]
    rank_pattern, alpha_pattern = {}, {}
    for key, (rk, sc) in ranks.items():
        if (rk, sc * rk) != (r, alpha):
            rank_pattern[rf".*\.{re.escape(key)}"] = rk
            alpha_pattern[rf".*\.{re.escape(key)}"] = sc * rk
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(modules), "target_parameters": sorted(params) or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": modules_to_save or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter(model: nn.Module, folder: Path, index: int = 0, base: str | None = None,
                  extras: dict[str, torch.Tensor] | None = None, dropout: float = 0.0) -> None:
    """Adapter `index`'s two peft files into an existing `folder` (a checkpoint being written); `extras`:
    parameters trained in full (routers, norms), saved as peft's `modules_to_save`."""
    names = sorted({n.rpartition(".")[0].rpartition(".")[2] for n in extras or {}})
    save_file(adapter_state(model, index, extras), str(folder / WEIGHTS), metadata={"format": "pt"})
    cfg = adapter_config(model, index, base, names, dropout)
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def save_adapter(model: nn.Module, folder: str | Path, index: int = 0, base: str | None = None,
                 extras: dict[str, torch.Tensor] | None = None, dropout: float = 0.0) -> Path:
    """`write_adapter` as the folder `folder`, atomically (replacing one already there)."""
    with atomic_dir(Path(folder)) as tmp:
        write_adapter(model, tmp, index, base, extras, dropout)
    return Path(folder)


# ---------------------------------------------------------------- reading

def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft folder; `CheckpointError` naming what is missing or unsupported."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found; an adapter folder holds {CONFIG} and {WEIGHTS} (peft's format)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are read")
    for field, ok in REFUSED.items():
        if cfg.get(field, ok) not in (ok, None, False) and cfg.get(field) != ok:
            raise CheckpointError(f"{cfg_path}: {field}={cfg[field]!r} is not supported (plain LoRA only)")
    if not w_path.is_file():
        bin_path = folder / "adapter_model.bin"
        hint = f" ({bin_path.name} is a pickle: re-save it with peft's safe_serialization)" if bin_path.is_file() else ""
        raise CheckpointError(f"{w_path}: not found{hint}")
    return cfg, load_file(str(w_path))


def _pattern(patterns: dict, key: str, default):
    """peft's `get_pattern_key`: the first pattern p with `(.*\\.)?(p)$` matching `key`."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def _scale(cfg: dict, key: str) -> tuple[int, float]:
    """(rank, scale) that peft gives the module or parameter named `key`."""
    r = _pattern(cfg.get("rank_pattern"), key, cfg.get("r", 8))
    alpha = _pattern(cfg.get("alpha_pattern"), key, cfg.get("lora_alpha", 8))
    return int(r), scale_of(float(alpha), int(r), bool(cfg.get("use_rslora", False)))


class Parsed:
    """One adapter read against a model: per adapted layer path, per pair, (A, B, scale) with A (r, K) / B (N, r),
    or for experts A (E, r, K) / B (E, N, r); and the fully trained tensors by parameter name."""

    def __init__(self):
        self.pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.extras: dict[str, torch.Tensor] = {}


def parse(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], where: str = "adapter") -> Parsed:
    """Map a peft adapter's tensors onto `model`'s layers (those `target_modules` can wrap, or already wrap),
    checking names, sizes, expert counts and ranks; `ValueError` naming the first tensor that does not fit."""
    pre = prefix(model)
    layers = {**{p: model.get_submodule(p) for p in target_modules(model)}, **lora_paths(model)}
    full = {n: p for n, p in _named_full(model).items()}
    targeted = set(cfg.get("target_parameters") or [])
    both = any(t.endswith("gate_up_proj") for t in targeted) and any(t.endswith("down_proj") for t in targeted)
    only = "down" if any(t.endswith("down_proj") for t in targeted) else "gate_up"
    out = Parsed()
    raw: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer path, pair) -> {"A": .., "B": ..}
    per_expert: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key = name.removeprefix("base_model.model.")
        key = key.removeprefix(MODEL_FAMILIES[model.cfg.model_type].prefix).removeprefix("model.")
        key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)
        m = re.fullmatch(r"(.+?)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(lora_[AB])\.weight", key)
        if m and f"{m[1]}.experts" in layers:
            per_expert.setdefault((f"{m[1]}.experts", int(m[2]), m[3]), {})[m[4][-1]] = t
            continue
        m = re.fullmatch(r"(.+?)(\.base_layer)?\.(lora_[AB])\.weight", key)
        if m and m[1] in layers:
            layer = layers[m[1]]
            if _is_experts(layer):
                pair = "gate_up" if m[2] else ("down" if both else only)
            elif m[2]:
                raise ValueError(f"{where}: tensor {name!r}: {m[1]} is not an expert bank (only experts nest)")
            else:
                pair = "lora"
            raw.setdefault((m[1], pair), {})[m[3][-1]] = t
            continue
        if key in full:
            if tuple(t.shape) != tuple(full[key].shape):
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, but this model's {key} is "
                                 f"{tuple(full[key].shape)}: the adapter was trained on another base")
            out.extras[key] = t
            continue
        if key.endswith("e_score_correction_bias"):  # saved with a router by modules_to_save, this model has none
            continue
        raise ValueError(f"{where}: tensor {name!r} matches no layer of this model that takes an adapter (layers "
                         f"like {pre}{next(iter(layers), '?')}.lora_A.weight): wrong base model or target name")
    for (path, pair), ab in raw.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {pre}{path}: lora_{'B' if 'A' in ab else 'A'} is missing")
        A, B = ab["A"], ab["B"]
        key = f"model.{path}.{EXPERT_PARAMS[pair]}" if pair in EXPERT_PARAMS else f"model.{path}"
        r_cfg, scale = _scale(cfg, key)
        layer = layers[path]
        if _is_experts(layer):
            E, D, I = expert_dims(layer.base_layer if isinstance(layer, LoraLayer) else layer)
            K, N = (D, 2 * I) if pair == "gate_up" else (I, D)
            # the expert count shows only against the configured rank (E * r rows could be E' * r' rows)
            if A.dim() != 2 or A.shape != (E * r_cfg, K) or B.dim() != 2 or B.shape != (N, r_cfg * E):
                held = f" (lora_A holds {A.shape[0] // r_cfg} experts at rank {r_cfg})" \
                    if A.dim() == 2 and A.shape[0] % r_cfg == 0 and A.shape[0] != E * r_cfg else ""
                raise ValueError(f"{where}: {pre}{path}{'.base_layer' if pair == 'gate_up' and both else ''}: lora_A "
                                 f"{tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit {E} experts' "
                                 f"{EXPERT_PARAMS[pair]} ({N} x {K}) at rank {r_cfg} ({CONFIG}){held}: the adapter "
                                 f"was trained on another base, or its ranks disagree")
            r = r_cfg
            A3 = A.reshape(E, r, K)
            B3 = B.reshape(N, r, E).permute(2, 0, 1)  # (E, N, r)
            out.pairs.setdefault(path, {})[pair] = (A3, B3, scale)
        else:
            base = layer.base_layer if isinstance(layer, LoraLayer) else layer
            K, N = base.in_features, base.out_features
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != K or B.shape[0] != N or A.shape[0] != B.shape[1]:
                raise ValueError(f"{where}: {pre}{path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                                 f"fit this model's {path} ({N} x {K}): the adapter was trained on another base, or "
                                 f"its ranks disagree")
            r = A.shape[0]
            out.pairs.setdefault(path, {})["lora"] = (A, B, scale)
        if r != r_cfg:
            raise ValueError(f"{where}: {pre}{path}: rank {r} in the tensors, {r_cfg} in {CONFIG} (r / rank_pattern)")
    for (path, e, proj), ab in sorted(per_expert.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {path}.{e}.{proj}: lora_{'B' if 'A' in ab else 'A'} is missing")
    _fuse_per_expert(model, cfg, per_expert, layers, out, where)
    return out


def _is_experts(layer: nn.Module) -> bool:
    from qiusuo.model.moe import Experts

    return isinstance(layer, (Experts, LoraExperts))


def _named_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a peft adapter may carry in full (`modules_to_save`): routers' and norms' weights, and the routers'
    selection bias stored with them (balancing moves it while a router trains: read back, a run resumes exactly)."""
    full = dict(extra_trainable(model, router=True, norms=True))
    for path, m in model.named_modules():
        if isinstance(m, Router) and getattr(m, "e_score_correction_bias", None) is not None:
            full[f"{path}.e_score_correction_bias"] = m.e_score_correction_bias
    return full


def _fuse_per_expert(model, cfg, per_expert, layers, out: Parsed, where: str) -> None:
    """transformers 4's per-expert adapters -> the fused 3D pairs: gate and up (rank r each) become gate_up of rank
    2r with A stacked and B block-diagonal; down as it is; an expert without an adapter gets zeros."""
    banks = sorted({path for path, _, _ in per_expert})
    for path in banks:
        E, D, I = expert_dims(layers[path].base_layer if isinstance(layers[path], LoraLayer) else layers[path])
        for pair, projs, (K, N) in (("gate_up", ("gate_proj", "up_proj"), (D, 2 * I)), ("down", ("down_proj",), (I, D))):
            got = {(e, p): ab for (b, e, p), ab in per_expert.items() if b == path and p in projs}
            if not got:
                continue
            for (e, p), ab in got.items():
                k_want, n_want = (D, I) if p != "down_proj" else (I, D)
                if e >= E or ab["A"].shape[1] != k_want or ab["B"].shape[0] != n_want or ab["A"].shape[0] != ab["B"].shape[1]:
                    raise ValueError(f"{where}: {path}.{e}.{p}: lora_A {tuple(ab['A'].shape)}, lora_B "
                                     f"{tuple(ab['B'].shape)} do not fit this model ({E} experts, {n_want} x {k_want})")
            r = max(ab["A"].shape[0] for ab in got.values())
            scales = {p: _scale(cfg, f"model.{path}.0.{p}")[1] for p in projs}
            A = torch.zeros(E, r * len(projs), K)
            B = torch.zeros(E, N, r * len(projs))
            for (e, p), ab in got.items():
                j = projs.index(p)
                rr = ab["A"].shape[0]
                A[e, j * r: j * r + rr] = ab["A"].float()
                B[e, j * (N // len(projs)): (j + 1) * (N // len(projs)), j * r: j * r + rr] = ab["B"].float() * scales[p]
            out.pairs.setdefault(path, {})[pair] = (A, B, 1.0)  # the scales are folded into B


# ---------------------------------------------------------------- onto a model

@torch.no_grad()
def attach(model: nn.Module, folders: dict[str, str | Path], *, dropout: float = 0.0) -> list[str]:
    """Wrap `model`'s layers with a bank of every adapter in `folders` ({name: peft folder}), ranks padded to the
    largest per layer, and fill it: adapter i is `list(folders)[i]`. An adapter without a layer the others adapt
    adds zero there. Fully trained tensors (routers, norms) cannot differ per request, so they are refused.
    Returns the adapter names in bank order."""
    names = list(folders)
    parsed = []
    for name in names:
        cfg, tensors = read_adapter(folders[name])
        p = parse(model, cfg, tensors, where=f"adapter {name!r} ({folders[name]})")
        if p.extras:
            raise ValueError(f"adapter {name!r} ({folders[name]}) also trains {next(iter(p.extras))} in full "
                             f"(modules_to_save): it changes the base for every request; merge it instead "
                             f"(qiusuo convert --merge-lora)")
        parsed.append(p)
    _wrap_parsed(model, parsed, dropout)
    return names


def _wrap_parsed(model: nn.Module, parsed: list[Parsed], dropout: float = 0.0) -> None:
    """Wrap every layer any of `parsed` adapts with a bank of len(parsed) adapters and fill it."""
    paths = [p for p in target_modules(model) if any(p in x.pairs for x in parsed)]
    for path in paths:
        ranks = {}
        for x in parsed:
            for pair, (A, _, _) in x.pairs.get(path, {}).items():
                ranks[pair] = max(ranks.get(pair, 1), A.shape[-2])
        base = model.get_submodule(path)
        layer = wrap(model, path, len(parsed), {**({"gate_up": 1, "down": 1} if _is_experts(base) else {"lora": 1}),
                                               **ranks}, dropout)
        for i, x in enumerate(parsed):
            _fill(layer, i, x.pairs.get(path, {}))


@torch.no_grad()
def merge_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Bake the peft adapter in `folder` into `model` (W + scale B A in each base's own format: `merge_lora`),
    and copy in what it trained in full (routers, norms). Returns the plain model, its names unchanged."""
    from qiusuo.lora.apply import merge_lora

    cfg, tensors = read_adapter(folder)
    parsed = parse(model, cfg, tensors, where=str(folder))
    _wrap_parsed(model, [parsed])
    full = _named_full(model)
    for k, t in parsed.extras.items():
        full[k].copy_(t)
    return merge_lora(model)


@torch.no_grad()
def _fill(layer: LoraLayer, index: int, pairs: dict, scales: bool = True) -> None:
    """Adapter `index` of `layer` from parsed pairs (zero where absent); `scales=False` keeps the layer's own (a
    resumed run's, set from its config: alpha / r written to JSON and divided again need not round-trip)."""
    for pair, A, B, s in layer.pairs():
        A[index].zero_(), B[index].zero_()
        if pair not in pairs:
            s[index] = 0.0
            continue
        a, b, scale = pairs[pair]
        r = a.shape[-2]
        A[index][..., :r, :].copy_(a)
        B[index][..., :r].copy_(b)
        if scales:
            s[index] = scale


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path, index: int = 0) -> dict[str, torch.Tensor]:
    """Fill adapter `index` of a model that already carries adapters (a run resuming) from a peft folder, exactly:
    the same layers, ranks and scales, or `CheckpointError` naming the difference. Also copies fully trained
    tensors into their parameters. Returns those."""
    cfg, tensors = read_adapter(folder)
    try:
        p = parse(model, cfg, tensors, where=str(folder))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    have = lora_paths(model)
    if set(p.pairs) != set(have):
        extra, missing = sorted(set(p.pairs) - set(have)), sorted(set(have) - set(p.pairs))
        raise CheckpointError(f"{folder}: its adapters are on other layers than this run's (only in the folder: "
                              f"{extra[:3]}, only in the run: {missing[:3]}); resume with the run's own run.toml")
    for path, layer in have.items():
        for pair, A, B, s in layer.pairs():
            a, b, _ = p.pairs[path][pair]
            if a.shape != A[index].shape:
                raise CheckpointError(f"{folder}: {path} {pair}: rank {a.shape[-2]}, the run's is {A.shape[-2]}")
        _fill(layer, index, p.pairs[path], scales=False)
    full = _named_full(model)
    for k, t in p.extras.items():
        full[k].copy_(t)
    return p.extras
