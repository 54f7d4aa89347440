"""The checkpoint families qiusuo loads, one row each: model_type -> the DeepSeek architecture it runs as, how its
config.json is spelled (read and written back), how its checkpoint names its tensors, and its chat encoding.

A family is a row of `FAMILIES`, never a branch in the loader, the engine or the trainer: code asks the row
(`family(model_type)`) or the config built from it (`ModelConfig.arch`). Each row names the published checkpoint
it describes and the transformers class its math was checked against (tests/hf/test_families.py: logits equal in
both directions on tiny random configs).

- Spelling (`rename`, `fill`, `write`): `rename` maps the family's config.json onto DeepSeek's field names
  (`ModelConfig`'s) without inventing values, so `ModelConfig.from_hf` can refuse a config that lacks a shape field;
  `fill` then adds what the family's transformers config class defaults (GLM's eps 1e-5, GLM-5's 32 indexer heads);
  `write` turns our DeepSeek-spelled config.json back into the family's own, `model_type` and all, so the family's
  tools read an export.
- Names: `prefix` is put before every hub tensor name of the text model (Kimi-K2.5's `language_model.`); tensors
  under `skip` (a vision tower) belong to parts qiusuo does not run and are skipped with a logged line.
- `chat`: the chat encoding (`qiusuo.data.deepseek_encoding`) for a folder whose tokenizer has no `chat_template`
  (DeepSeek-V3.2 and V4 ship none: DeepSeek publishes Python encoders instead).

`REFUSED` names the families that look like DeepSeek's (MLA, DeepSeekMoE) but compute something else: loading them
as DeepSeek would give wrong logits with no error, so they are refused with the reason.

A leaf: imports nothing of qiusuo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ARCHS = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
# per-layer kinds in transformers' names (DeepSeek-V4 `layer_types`, `mlp_layer_types`)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_CONFIG_META = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "model_type",
                "quantization_config", "_name_or_path")


def _same(d: dict[str, Any]) -> dict[str, Any]:
    return d


@dataclass(frozen=True)
class Family:
    """One checkpoint family (module docstring). `arch`: one of ARCHS, the math qiusuo runs; `architectures`: the
    class name an export writes in config.json; `example`: a published checkpoint; `reference`: the transformers
    class the parity tests hold it against."""

    model_type: str
    arch: str
    architectures: str
    example: str
    reference: str
    rename: Callable[[dict], dict] = _same
    fill: Callable[[dict], dict] = _same
    write: Callable[[dict], dict] = _same
    prefix: str = ""
    skip: tuple[str, ...] = ()
    chat: str | None = None


# ---------------------------------------------------------------- spellings
def _dense_then_sparse(d: dict[str, Any], family: str) -> dict[str, Any]:
    """transformers' `mlp_layer_types` ("dense" then "sparse") is DeepSeek's `first_k_dense_replace`; any other
    order has no DeepSeek spelling and is refused."""
    kinds = d.pop("mlp_layer_types", None)
    if kinds is not None:
        dense = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
        if any(k != "sparse" for k in kinds[dense:]):
            raise ValueError(f"config.json mlp_layer_types {kinds}: {family} has dense layers, then sparse ones")
        d["first_k_dense_replace"] = dense
    return d


def _write_mlp_layer_types(d: dict[str, Any]) -> dict[str, Any]:
    n, k = d["num_hidden_layers"], d.get("first_k_dense_replace") or 0
    d["mlp_layer_types"] = ["dense"] * min(k, n) + ["sparse"] * max(n - k, 0)
    return d


def _fill_v32(d: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3.2: the indexer's defaults are transformers' (64 heads of 128, top-2048)."""
    return _dense_then_sparse({"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, **d}, "DeepSeek-V3.2")


def _fill_v4(d: dict[str, Any]) -> dict[str, Any]:
    """A DeepSeek-V4 `config.json` in any published spelling -> our field names: `layer_types` or `compress_ratios`,
    `compress_rates` or top-level `compress_rate_csa`/`_hca`, `mlp_layer_types` or `num_hash_layers`,
    `compress_rope_theta` with `rope_scaling` or transformers' nested `rope_parameters` (`main`/`compress`),
    `partial_rotary_factor` or `qk_rope_head_dim`. transformers' defaults fill what is absent (`DeepseekV4Config`)."""
    d = {"swiglu_limit": 10.0, "routed_scaling_factor": 1.5, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
         "q_lora_rank": 1024, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
         "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
         "vocab_size": 129280, "max_position_embeddings": 1048576, "bos_token_id": 0, "eos_token_id": 1, **d}
    d.update(first_k_dense_replace=0, n_group=1, topk_group=1, topk_method="noaux_tc")
    n = d["num_hidden_layers"]
    rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
    for key, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if d.get(key) is not None:
            rates[kind] = d[key]
    d["compress_rates"] = rates
    ratios = d.get("compress_ratios")
    if d.get("layer_types") is None and ratios is not None:
        if not isinstance(ratios, list) or len(ratios) not in (n, n + int(d["num_nextn_predict_layers"] or 0)):
            raise ValueError(f"config.json compress_ratios has {len(ratios) if isinstance(ratios, list) else ratios!r}"
                             f" entries; num_hidden_layers={n} needs one per layer (plus one per MTP layer)")
        by_rate = {0: SLIDING, 1: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
        bad = [r for r in ratios[:n] if r not in by_rate]
        if bad:
            raise ValueError(f"config.json compress_ratios holds {bad[0]!r}: each must be 0 (sliding window only), "
                             f"{rates[CSA]} (compress_rate_csa) or {rates[HCA]} (compress_rate_hca)")
        d["layer_types"] = [by_rate[r] for r in ratios[:n]]
    if d.get("mlp_layer_types") is None and d.get("num_hash_layers") is not None:
        h = d["num_hash_layers"]
        d["mlp_layer_types"] = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
    if d.get("qk_rope_head_dim") is None:
        d["qk_rope_head_dim"] = int(d.get("head_dim", 512) * (d.get("partial_rotary_factor") or 64 / 512))
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict):  # transformers 5: {"main": ..., "compress": ...}
        d["rope_theta"] = rp["main"].get("rope_theta", d.get("rope_theta", 10000.0))
        d["compress_rope_parameters"] = rp.get("compress") or {}
        d.pop("rope_parameters")
    crp = d.pop("compress_rope_parameters", None)
    if isinstance(crp, dict):
        crp = dict(crp)
        d["compress_rope_theta"] = crp.pop("rope_theta", d.get("compress_rope_theta", 160000.0))
        crp.pop("partial_rotary_factor", None)
        crp.pop("attention_factor", None)  # V4 always uses 1 (`rotaries`); transformers writes it out
        if crp.get("rope_type", crp.get("type", "default")) != "default":
            d["rope_scaling"] = crp
    return d


def _full_rotary(d: dict[str, Any], family: str) -> None:
    """GLM's configs may name a `partial_rotary_factor` (of `qk_rope_head_dim`); MLA rotates all of it."""
    factors = {d.get("partial_rotary_factor"), (d.get("rope_parameters") or {}).get("partial_rotary_factor")}
    if factors - {None, 1, 1.0}:
        raise ValueError(f"config.json partial_rotary_factor={sorted(factors - {None})[0]}: {family} would rotate "
                         f"part of qk_rope_head_dim; qiusuo's MLA rotates all of it (1.0, as published)")


def _fill_glm4_moe_lite(d: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.7-Flash: transformers' `Glm4MoeLiteConfig` defaults; its router is always sigmoid with the selection
    bias (`Glm4MoeLiteTopkRouter` reads no topk_method or scoring_func)."""
    _full_rotary(d, "glm4_moe_lite")
    d = {"n_group": 1, "topk_group": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-5, "routed_scaling_factor": 1.8,
         "first_k_dense_replace": 1, **d, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}
    return _dense_then_sparse(d, "glm4_moe_lite")


def _fill_glm_moe_dsa(d: dict[str, Any]) -> dict[str, Any]:
    """GLM-5: DeepSeek-V3.2 whose indexer rotates interleaved pairs (`index_rope_interleave`) and whose "shared"
    layers reuse the previous full layer's top-k (`indexer_types`, or transformers' derivation from
    `index_topk_pattern` / `index_topk_freq` / `index_skip_topk_offset`); defaults of `GlmMoeDsaConfig`."""
    d = {"index_n_heads": 32, "index_head_dim": 128, "index_topk": 2048, "rms_norm_eps": 1e-5, "n_group": 1,
         "topk_group": 1, "first_k_dense_replace": 3, **d, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
         "index_rope_interleave": True}
    if d.get("indexer_types") is None:
        n, pattern = d["num_hidden_layers"], d.get("index_topk_pattern")
        if pattern is not None:
            d["indexer_types"] = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
        else:
            freq, offset = max(d.get("index_topk_freq", 1), 1), d.get("index_skip_topk_offset", 2)
            d["indexer_types"] = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    return _dense_then_sparse(d, "glm_moe_dsa")


def _write_glm_moe_dsa(d: dict[str, Any]) -> dict[str, Any]:
    d.pop("index_rope_interleave", None)  # the family's own rotary; transformers' GlmMoeDsaIndexer implies it
    return _write_mlp_layer_types(d)


_SARVAM_NAMES = {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
                 "num_mtp_layers": "num_nextn_predict_layers"}


def _rename_sarvam(d: dict[str, Any]) -> dict[str, Any]:
    """Sarvam-105B's original config (written for its remote code): `num_experts`, `num_shared_experts`,
    `num_mtp_layers`, rope type "deepseek_yarn" (YaRN), `head_dim` / `q_head_dim` derived sizes (dropped), as
    transformers' `SarvamMLAConfig` translates them."""
    for old, new in _SARVAM_NAMES.items():
        if old in d:
            d.setdefault(new, d.pop(old))
    d.pop("head_dim", None)
    d.pop("q_head_dim", None)
    for key in ("rope_scaling", "rope_parameters"):
        rs = d.get(key)
        if isinstance(rs, dict) and "deepseek_yarn" in (rs.get("type"), rs.get("rope_type")):
            d[key] = {k: v for k, v in rs.items() if k not in ("type", "rope_type")} | {"type": "yarn"}
    return d


def _fill_sarvam(d: dict[str, Any]) -> dict[str, Any]:
    return {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, **d}


_MOE_FIELDS = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "topk_method",
               "scoring_func", "norm_topk_prob", "routed_scaling_factor", "moe_intermediate_size",
               "first_k_dense_replace", "moe_layer_freq", "num_nextn_predict_layers")


def _rename_youtu(d: dict[str, Any]) -> dict[str, Any]:
    """Youtu-LLM: MLA with a dense SwiGLU MLP in every layer (no experts: `YoutuConfig` removes them)."""
    d = {k: v for k, v in d.items() if k not in _MOE_FIELDS}
    d["n_routed_experts"] = None
    return d


def _fill_youtu(d: dict[str, Any]) -> dict[str, Any]:
    return {"tie_word_embeddings": True, **d}


def _write_youtu(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _MOE_FIELDS}


def _rename_kimi_k25(d: dict[str, Any]) -> dict[str, Any]:
    """Kimi-K2.5 / K2.6: a vision wrapper around DeepSeek-V3 (`text_config`, whose model_type may say kimi_k2 or
    deepseek_v3). The text model is the config; the wrapper's own keys (vision_config, media token ids) are kept in
    `wrapper` for the export. Tying follows the top-level `tie_word_embeddings`, as transformers' `Kimi_K25Config`
    (default True) decides it."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("config.json (model_type='kimi_k25') has no text_config: Kimi-K2.5's text model is "
                         "described there; is this the checkpoint's complete config.json?")
    wrapper = {k: v for k, v in d.items() if k not in ("text_config", "tie_word_embeddings", *_CONFIG_META)}
    return {**{k: v for k, v in text.items() if k not in _CONFIG_META}, "wrapper": wrapper,
            "tie_word_embeddings": d.get("tie_word_embeddings", True)}


def _write_kimi_k25(d: dict[str, Any]) -> dict[str, Any]:
    wrapper, outer = d.pop("wrapper", None) or {}, d.pop("architectures")
    text = {**d, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
    return {**wrapper, "model_type": "kimi_k25", "architectures": outer, "text_config": text,
            "tie_word_embeddings": d["tie_word_embeddings"]}


# ---------------------------------------------------------------- the table
FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", "deepseek-ai/DeepSeek-V2", "DeepseekV2ForCausalLM"),
    Family("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", "deepseek-ai/DeepSeek-V3", "DeepseekV3ForCausalLM"),
    Family("deepseek_v32", "deepseek_v32", "DeepseekV32ForCausalLM", "deepseek-ai/DeepSeek-V3.2",
           "DeepseekV32ForCausalLM", fill=_fill_v32, chat="deepseek_v32"),
    Family("deepseek_v4", "deepseek_v4", "DeepseekV4ForCausalLM", "deepseek-ai/DeepSeek-V4-Flash",
           "DeepseekV4ForCausalLM", fill=_fill_v4, chat="deepseek_v4"),
    # Moonshot ships `model_type: kimi_k2` with `architectures: ["DeepseekV3ForCausalLM"]`: V3's weights and math
    Family("kimi_k2", "deepseek_v3", "DeepseekV3ForCausalLM", "moonshotai/Kimi-K2-Instruct", "DeepseekV3ForCausalLM"),
    Family("kimi_k25", "deepseek_v3", "KimiK25ForConditionalGeneration", "moonshotai/Kimi-K2.5",
           "Kimi_K25ForConditionalGeneration", rename=_rename_kimi_k25, write=_write_kimi_k25,
           prefix="language_model.", skip=("vision_tower.", "mm_projector.")),
    Family("glm4_moe_lite", "deepseek_v3", "Glm4MoeLiteForCausalLM", "zai-org/GLM-4.7-Flash",
           "Glm4MoeLiteForCausalLM", fill=_fill_glm4_moe_lite, write=_write_mlp_layer_types),
    Family("sarvam_mla", "deepseek_v3", "SarvamMLAForCausalLM", "sarvamai/sarvam-105b", "DeepseekV3ForCausalLM",
           rename=_rename_sarvam, fill=_fill_sarvam),
    Family("youtu", "deepseek_v3", "YoutuForCausalLM", "tencent/Youtu-LLM-2B", "YoutuForCausalLM",
           rename=_rename_youtu, fill=_fill_youtu, write=_write_youtu),
    Family("glm_moe_dsa", "deepseek_v32", "GlmMoeDsaForCausalLM", "zai-org/GLM-5", "GlmMoeDsaForCausalLM",
           fill=_fill_glm_moe_dsa, write=_write_glm_moe_dsa),
]}

# DeepSeek-shaped families whose math differs: loading them as DeepSeek would be silently wrong
REFUSED: dict[str, str] = {
    "mistral3": "Mistral Large 3 (model_type mistral3) routes with a softmax over experts and scales queries by "
                "position (Llama-4 attention temperature), which DeepSeek-V3 does not",
    "mistral4": "Mistral 4 scales queries by position (Llama-4 attention temperature), which DeepSeek-V3 does not",
    "mistral_large4": "Mistral Large 4 scales queries by position (Llama-4 attention temperature), which "
                      "DeepSeek-V3 does not",
    "longcat_flash": "LongCat-Flash has zero-computation (identity) experts and two attention sublayers per layer",
    "minicpm3": "MiniCPM3 scales its embeddings, residuals and logits (scale_emb, scale_depth, dim_model_base)",
    "kimi_linear": "Kimi-Linear runs linear attention (Kimi Delta Attention) in most layers, MLA in a few",
}


def family(model_type: Any) -> Family:
    """The row of `model_type`; a ValueError saying why for a refused or unknown one."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    loads = ", ".join(FAMILIES)
    if model_type in REFUSED:
        raise ValueError(f"config.json model_type={model_type!r} is not supported: {REFUSED[model_type]}, so loading "
                         f"it as DeepSeek would give wrong logits; qiusuo loads {loads}")
    raise ValueError(f"config.json model_type={model_type!r} is not supported; qiusuo loads {loads}")
