"""Model configs as files: Hugging Face `config.json` of every family in `qiusuo.families`, and DeepSeek's own
inference configs, read into `qiusuo.config.ModelConfig` and written back.

The schema and its validation stay in `qiusuo.config`, which knows no file format; `ModelConfig.from_hf`,
`from_deepseek_inference` and `to_hf` call the functions here. Each family's spelling (Kimi, GLM, V4's older
`compress_ratios`, `num_hash_layers`, nested `rope_parameters`, ...) is its row of `qiusuo.families`, never a
branch here. Imports only the schema and the family table: the loader, `inspect` and the exporter all read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qiusuo.config import ModelConfig
from qiusuo.families import FAMILIES, family

# a Hugging Face config.json of each family must name these: a missing one would silently take our small defaults
REQUIRED_HF = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts")
REQUIRED_HF_MOE = ("moe_intermediate_size", "num_experts_per_tok")
REQUIRED_HF_V4 = ("hidden_size", "num_hidden_layers", "num_attention_heads")  # the rest: transformers' V4 defaults

# fields a V2/V3 config.json leaves out unless this model uses them (transformers' V3 would take `head_dim` as its
# own): V4's, and the V3.2 indexer variants' and wrappers' (`to_hf`'s `used`)
V4_ONLY = ("head_dim", "sliding_window", "layer_types", "compress_rates", "compress_rope_theta", "mlp_layer_types",
           "hc_mult", "hc_sinkhorn_iters", "hc_eps", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim",
           "index_topk", "swiglu_limit", "indexer_types", "index_rope_interleave", "wrapper")


# DeepSeek-V3's inference/model.py `ModelArgs` (commit 9b4e978): every key its configs may set, with its default
_INFERENCE_DEFAULTS: dict[str, Any] = dict(
    max_batch_size=8, max_seq_len=4096 * 4, dtype="bf16", scale_fmt=None, vocab_size=102400, dim=2048,
    inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64,
    n_shared_experts=2, n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
    route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    original_seq_len=4096, rope_theta=10000.0, rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0)
_INFERENCE_KEYS = {"dim", "n_layers", "n_heads", "inter_dim", "moe_inter_dim", "n_activated_experts"}


def config_from_json(d: dict[str, Any]) -> ModelConfig:
    """A `config.json` in either format a user may hold: Hugging Face's, or DeepSeek's inference configs."""
    if isinstance(d, dict) and "model_type" not in d and _INFERENCE_KEYS & d.keys():
        return from_deepseek_inference(d)
    return from_hf(d)


def from_hf(d: dict[str, Any]) -> ModelConfig:
    """Read a Hugging Face `config.json` dict of any family in `qiusuo.families.FAMILIES`: the family's spelling
    is translated by its row (`rename`, then `fill` with its transformers defaults), then the hub form
    (`rope_theta` + `rope_scaling`) or the transformers-5 form (`rope_parameters`). Unknown keys
    (`architectures`, `quantization_config`, ...) are ignored. Refused with a ValueError naming what is wrong: a
    dict that is not a model config (no `model_type`; an unknown or `REFUSED` one, with the reason), one whose
    shape fields are missing (they would silently take `ModelConfig`'s small defaults; `REQUIRED_HF`, V4:
    `REQUIRED_HF_V4` with transformers' defaults for the rest), and DeepSeek's own inference configs (`dim`,
    `n_layers`, ...: read those with `from_deepseek_inference`)."""
    if not isinstance(d, dict):
        raise ValueError(f"a Hugging Face config.json is a JSON object, got {type(d).__name__}")
    if "model_type" not in d:
        if _INFERENCE_KEYS & d.keys():
            raise ValueError("this is DeepSeek's inference config (inference/configs/*.json of the DeepSeek-V3 "
                             "repository: dim, n_layers, ...), not a Hugging Face config.json; use the config.json "
                             "of the Hugging Face checkpoint, or ModelConfig.from_deepseek_inference() for this "
                             "format")
        raise ValueError("config.json has no model_type: not a Hugging Face model config (qiusuo reads "
                         f"{', '.join(FAMILIES)}); pass the checkpoint's own config.json")
    mt = d["model_type"]
    fam = family(mt)
    d = fam.rename(dict(d))
    required = REQUIRED_HF_V4 if fam.arch == "deepseek_v4" else REQUIRED_HF + (
        REQUIRED_HF_MOE if d.get("n_routed_experts") else ())
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"config.json (model_type={mt!r}) lacks {', '.join(missing)}: a {mt} config.json names "
                         f"them all; is this the checkpoint's complete config.json?")
    d = fam.fill(d)
    rp = d.pop("rope_parameters", None)
    if rp:
        rp = dict(rp)
        d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default":
            rp["type"] = kind
            rp.pop("rope_type", None)
            d["rope_scaling"] = rp
    rs = d.get("rope_scaling")
    if rs:
        rs = dict(rs)
        kind = rs.pop("rope_type", None) or rs.get("type")
        if kind in (None, "default"):
            rs = None
        else:
            rs["type"] = kind
            rs.pop("partial_rotary_factor", None)  # checked by the family (GLM: must be 1)
        d["rope_scaling"] = rs
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(kwargs.get(tok), list):  # some configs list several eos ids; keep the first
            kwargs[tok] = kwargs[tok][0]
    if fam.arch == "deepseek_v2" and d.get("topk_method") == "noaux_tc":
        kwargs["scoring_func"] = kwargs.get("scoring_func") or "sigmoid"
    if fam.arch != "deepseek_v4":  # V4 fields other families' configs spell for themselves (a derived head_dim,
        kwargs.pop("head_dim", None)  # GLM-5's layer_types naming its attention), which mean nothing here
        kwargs.pop("layer_types", None)
    kwargs["model_type"] = mt
    return ModelConfig(**kwargs)



def from_deepseek_inference(d: dict[str, Any]) -> ModelConfig:
    """DeepSeek's own inference config (`inference/configs/config_{16B,236B,671B,v3.1}.json` of the DeepSeek-V3
    repository, read by its `ModelArgs`: `dim`, `n_layers`, `n_activated_experts`, ...) as the same model in
    Hugging Face terms. What `ModelArgs` leaves implicit is made explicit as DeepSeek's code does it: sigmoid
    scores are the V3 family (`noaux_tc`, weights renormalised), softmax the V2 family (`group_limited_greedy`
    when there are expert groups, else `greedy`; weights not renormalised); YaRN with `rope_factor` over
    `original_seq_len` (on, since `max_seq_len` exceeds it), `mscale` for both of transformers' mscales; no MTP
    module (DeepSeek's inference model has none). Unknown keys raise, naming them."""
    unknown = sorted(d.keys() - _INFERENCE_DEFAULTS.keys())
    if unknown:
        raise ValueError(f"DeepSeek inference config: unknown key(s) {', '.join(unknown)}; its keys are those of "
                         f"ModelArgs in DeepSeek-V3's inference/model.py ({', '.join(_INFERENCE_DEFAULTS)})")
    a = {**_INFERENCE_DEFAULTS, **d}
    if a["score_func"] not in ("softmax", "sigmoid"):
        raise ValueError(f"DeepSeek inference config: score_func={a['score_func']!r}; use 'softmax' or 'sigmoid'")
    v3 = a["score_func"] == "sigmoid"
    groups = a["n_expert_groups"]
    return ModelConfig(
        model_type="deepseek_v3" if v3 else "deepseek_v2", vocab_size=a["vocab_size"], hidden_size=a["dim"],
        intermediate_size=a["inter_dim"], moe_intermediate_size=a["moe_inter_dim"], num_hidden_layers=a["n_layers"],
        first_k_dense_replace=a["n_dense_layers"], num_attention_heads=a["n_heads"],
        q_lora_rank=a["q_lora_rank"] or None, kv_lora_rank=a["kv_lora_rank"],
        qk_nope_head_dim=a["qk_nope_head_dim"], qk_rope_head_dim=a["qk_rope_head_dim"],
        v_head_dim=a["v_head_dim"], n_routed_experts=a["n_routed_experts"], n_shared_experts=a["n_shared_experts"],
        num_experts_per_tok=a["n_activated_experts"], n_group=groups, topk_group=a["n_limited_groups"],
        topk_method="noaux_tc" if v3 else "group_limited_greedy" if groups > 1 else "greedy",
        scoring_func=a["score_func"], norm_topk_prob=v3, routed_scaling_factor=float(a["route_scale"]),
        rope_theta=float(a["rope_theta"]), max_position_embeddings=int(a["original_seq_len"] * a["rope_factor"]),
        rope_scaling={"type": "yarn", "factor": a["rope_factor"],
                      "original_max_position_embeddings": a["original_seq_len"], "beta_fast": a["beta_fast"],
                      "beta_slow": a["beta_slow"], "mscale": a["mscale"], "mscale_all_dim": a["mscale"]},
        num_nextn_predict_layers=0)



def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`config.json` as the family ships it (its row's `write`, its own `model_type` and `architectures`), from
    the hub form of its DeepSeek architecture (what DeepSeek ships), loadable by transformers 5 as well."""
    fam = FAMILIES[cfg.model_type]
    if cfg.is_v4:
        d = _v4_to_hf(cfg)
    else:
        # V4-only fields stay out, except the recipe switches this model uses (then it is ours alone)
        used = {"swiglu_limit": cfg.swiglu_limit is not None, "mlp_layer_types": cfg.mlp_layer_types is not None,
                **{k: bool(cfg.use_mhc) for k in ("hc_mult", "hc_sinkhorn_iters", "hc_eps")},
                **{k: cfg.is_v32 for k in ("index_n_heads", "index_head_dim", "index_topk")},
                "indexer_types": cfg.indexer_types is not None,
                "index_rope_interleave": cfg.index_rope_interleave, "wrapper": cfg.wrapper is not None}
        d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in V4_ONLY or used.get(k)}
        if not cfg.use_mhc:
            d.pop("use_mhc")
        d["num_key_value_heads"] = cfg.num_key_value_heads or cfg.num_attention_heads
        d["n_routed_experts"] = cfg.n_routed_experts
    d["architectures"] = [fam.architectures]
    return fam.write(d)

def _v4_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "head_dim", "q_lora_rank", "qk_rope_head_dim", "n_routed_experts", "n_shared_experts",
            "num_experts_per_tok", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps",
            "rope_theta", "rope_scaling", "compress_rope_theta", "max_position_embeddings", "tie_word_embeddings",
            "num_nextn_predict_layers", "hidden_act", "initializer_range", "bos_token_id", "eos_token_id",
            "pad_token_id", "swiglu_limit", "sliding_window", "layer_types", "compress_rates", "mlp_layer_types",
            "hc_mult", "hc_sinkhorn_iters", "hc_eps", "o_groups", "o_lora_rank", "index_n_heads",
            "index_head_dim", "index_topk")
    d = {k: getattr(cfg, k) for k in keys}
    d.update(model_type=cfg.model_type, num_key_value_heads=1,  # mHC implied
             partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim)
    h = cfg.mlp_layer_types.count("hash_moe")
    if cfg.mlp_layer_types == ["hash_moe"] * h + ["moe"] * (cfg.num_hidden_layers - h):
        d["num_hash_layers"] = h  # DeepSeek's own spelling, which llama.cpp's converter reads
    return d
