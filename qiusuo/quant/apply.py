"""Which weights are stored how: a weight format per tensor family, applied to a model from outside.

Families (DESIGN.md section 7), found by the model's own module types, never by names of published models:
- `experts`: the routed experts of every MoE layer (`Experts`), main layers and MTP blocks;
- `shared`: the shared experts' MLP of every MoE layer;
- `dense`: the dense layers' MLPs (DeepSeek's first `first_k_dense_replace` layers);
- `attention`: the attention's linear layers (MLA's, V3.2's indexer, V4's compressed attention); MLA's `kv_b_proj`
  in the absorbed decoding path's layout (`qiusuo.quant.latent`), packed after loading (`pack_latents`); V4's
  grouped output projection (`GroupedLinear`, packed as `QuantGroupedLinear`) included;
- `head`: the output projection (not when tied to the embedding).
Never quantised: embeddings, norms, routers and their bias, MTP's `eh_proj`, mHC maps, sinks, position biases.

A spec maps families to formats: `int4` (every family), `experts=int4:32,attention=int8` (the rest unchanged), or
`native`: keep each tensor as the checkpoint stores it (FP8 weights stay fp8, FP4 experts mxfp4, the rest in the
model dtype); what serving loads by default, so a published checkpoint never exists in bf16 in memory.
"""

from __future__ import annotations

from torch import nn

from qiusuo.model.compressed_attention import GroupedLinear
from qiusuo.model.mla import MLA, LatentProjection
from qiusuo.model.moe import MLP, DenseMLP, Experts, MoE
from qiusuo.quant import kernels
from qiusuo.quant.formats import Format, parse
from qiusuo.quant.latent import QuantLatent
from qiusuo.quant.modules import QuantExperts, QuantGroupedLinear, QuantLinear

FAMILIES = ("experts", "shared", "dense", "attention", "head")
NATIVE = "native"


def parse_spec(spec: str | dict | None) -> dict[str, Format] | str | None:
    """`None`/"" (nothing quantised), "native", a format for every family ("int4:64"), or "family=format,..."
    -> {family: Format} (or "native"). ValueError naming the bad part and the choices."""
    if spec is None or spec == {} or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        spec = spec.strip()
        if spec.lower() == NATIVE:
            return NATIVE
        if "=" not in spec:
            fmt = parse(spec)
            return {f: fmt for f in FAMILIES}
        items = []
        for part in spec.split(","):
            fam, eq, fmt = part.partition("=")
            if not eq:
                raise ValueError(f"--quantize {spec!r}: {part!r} must look like family=format (families: "
                                 f"{', '.join(FAMILIES)})")
            items.append((fam.strip(), fmt.strip()))
    out = {}
    for fam, fmt in items:
        if fam not in FAMILIES:
            raise ValueError(f"--quantize: unknown tensor family {fam!r}; use {', '.join(FAMILIES)}")
        out[fam] = parse(fmt)
    return out


def _linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or isinstance(m, (QuantLinear, GroupedLinear))


def families(model: nn.Module) -> dict[str, str]:
    """Module path -> family for every module a spec can quantise: `Experts` banks and linear layers (plain or
    already packed)."""
    out: dict[str, str] = {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, MoE):
            if isinstance(m.experts, Experts):
                out[prefix + "experts"] = "experts"
            if isinstance(m.shared_experts, MLP):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{prefix}shared_experts.{name}"] = "shared"
        elif isinstance(m, DenseMLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{prefix}{name}"] = "dense"
        elif path.endswith("self_attn"):
            for sub, child in m.named_modules():
                if _linear(child) and not (isinstance(m, MLA) and sub == "kv_b_proj"):
                    out[f"{prefix}{sub}"] = "attention"
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    if _linear(head) and (embed is None or getattr(head, "weight", None) is not embed.weight):
        out["lm_head"] = "head"
    return out


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def quantize_model(model: nn.Module, spec: dict[str, Format]) -> nn.Module:
    """Replace the modules of each family in `spec` by their packed twins (`quantize_modules`), MLA's `kv_b_proj`
    with the attention's format (`pack_latents`). Returns the model."""
    quantize_modules(model, {path: spec[fam] for path, fam in families(model).items() if fam in spec})
    return pack_latents(model, spec.get("attention"))


def pack_latents(model: nn.Module, fmt: Format | None) -> nn.Module:
    """Every MLA `kv_b_proj` still in float packed as `fmt` in the absorbed path's layout (`QuantLatent`), layer by
    layer (the float weight plus one packed layer at a time). Separate from loading: checkpoints store the matrix
    in another layout, so the loader fills the float layer and this packs it afterwards. None, or a format the
    shapes do not allow: left in float; so is a layer on a GPU, for the CPU kernels only. Returns the model."""
    if fmt is None:
        return model
    for path, m in list(model.named_modules()):
        if type(m) is LatentProjection and m.weight.device.type == "cpu":  # a GPU's float bmm is fast as it is
            try:
                _swap(model, path, QuantLatent.from_projection(m, fmt))
            except ValueError:
                continue
    return model


def quantize_modules(model: nn.Module, formats: dict[str, Format]) -> nn.Module:
    """Replace each module path in `formats` (an `Experts` bank or a linear layer) by its packed twin, quantising
    the weights it holds; on the meta device only the packed buffers are made, for a loader to fill. A module the
    format cannot hold (int4 groups on an odd width, fp8 experts whose width is not whole blocks) stays as it is.
    Returns the model."""
    for path, fmt in formats.items():
        m = model.get_submodule(path)
        if isinstance(m, (QuantExperts, QuantLinear)):
            continue  # already packed (a checkpoint's own format): re-quantising packed codes would compound errors
        meta = next(m.parameters()).is_meta
        try:
            if isinstance(m, Experts):
                E, two_i, D = m.gate_up_proj.shape
                new = QuantExperts(E, D, two_i // 2, fmt, m.limit, device="meta") if meta else \
                    QuantExperts.from_experts(m, fmt)
            elif isinstance(m, GroupedLinear):
                new = QuantGroupedLinear(m.in_features, m.out_features, m.groups, fmt, device="meta",
                                         dtype=m.weight.dtype) if meta else QuantGroupedLinear.from_linear(m, fmt)
            else:
                new = QuantLinear(m.in_features, m.out_features, fmt, m.bias is not None, device="meta",
                                  dtype=m.weight.dtype) if meta else QuantLinear.from_linear(m, fmt)
        except ValueError:
            continue
        _swap(model, path, new)
    return model


def set_activations(model: nn.Module, act: str, kernel_rows: int | None = None) -> nn.Module:
    """Every packed layer decodes with activation arithmetic `act`: "q8" (x quantised to int8 per block of 32, the
    default where a format allows it; bf16, fp8 and int4 groups below 32 keep "fp32") or "fp32" (float32 x
    everywhere, the exact sum of the stored weights times x). `kernel_rows`: calls of up to this many rows run
    through the kernels (default: decoding-sized ones); a large value puts a whole evaluation through the
    decoding arithmetic, to measure what it costs. Returns the model."""
    if act not in kernels.ACTS:
        raise ValueError(f"--activations {act!r}: one of {', '.join(kernels.ACTS)}")
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts, QuantLatent)):
            m.act = kernels.default_act(m.fmt.name, m.fmt.group) if act == "q8" else "fp32"
            if kernel_rows is not None:
                m.kernel_rows = kernel_rows
    return model


def packed_targets(model: nn.Module) -> dict[str, tuple[Format, str, str]]:
    """State-dict name of every packed matrix (what the checkpoint layouts map a hub weight to) -> (its format,
    its codes' name, its scales' name)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{path}.weight"] = (m.fmt, f"{path}.weight", f"{path}.scale")
        elif isinstance(m, QuantExperts):
            for w in ("gate_up_proj", "down_proj"):
                out[f"{path}.{w}"] = (m.fmt, f"{path}.{w}", f"{path}.{w}_scale")
    return out


def formats_of(model: nn.Module) -> dict[str, str]:
    """Family -> the formats its modules are stored in now, e.g. {"experts": "int4", "attention": "bfloat16"}."""
    out: dict[str, set[str]] = {}
    for path, fam in families(model).items():
        m = model.get_submodule(path)
        fmt = str(m.fmt) if isinstance(m, (QuantLinear, QuantExperts)) else \
            str((m.gate_up_proj if isinstance(m, Experts) else m.weight).dtype).removeprefix("torch.")
        out.setdefault(fam, set()).add(fmt)
    return {k: ",".join(sorted(v)) for k, v in out.items()}
