"""DeepSeek-V4's hub names: the table from our names (transformers' in-memory ones without `model.`) to the names
DeepSeek ships in deepseek-ai/DeepSeek-V4-Flash and -Pro, with how the hub stores each tensor. `qiusuo.hf.names`
builds both directions from it, so save and load cannot drift apart.

Where the names come from, checked rather than assumed: the 82 distinct name patterns of V4-Flash's
`model.safetensors.index.json` (as a public SGLang-based V4 loader's tests quote them; tests/hf/test_v4_checkpoints.py
compares our FP8 + FP4 export against all 82), DeepSeek's `inference/model.py` (which tensors are FP8 / FP4 /
float32 / int32, as public ports of it show) and transformers 5.24's `conversion_mapping.py` "deepseek_v4" entry,
which reads exactly these names (the tests load our exports in `DeepseekV4ForCausalLM.from_pretrained`). The hub
has no `model.` prefix: `embed.weight`, `layers.N.attn.wq_a.weight`, `head.weight`, `mtp.K.e_proj.weight`.

Stored as (the third column): FP8 = e4m3 with 128x128 block scales in an FP8 export (V4-Flash: the attention's
wq_a / wq_b / wkv / wo_a / wo_b, the indexer's wq_b, the shared experts, MTP's e_proj / h_proj); routed experts are
FP8 or, with `expert_dtype: "fp4"` (Flash), FP4. The compressors' wkv / wgate, weights_proj, the router, embedding,
head and norms stay in the model dtype; the mHC maps, attention sinks, compressor position biases (`ape`) and the
routing bias are float32 and tid2eid int32 whatever the model's dtype, as DeepSeek's `inference/model.py` declares them.

`save_pretrained` of transformers 5.24 writes yet another spelling, which the loader also reads (`SAVED`).
"""

from __future__ import annotations

import re

import torch

PLAIN: dict = {}
FP8 = {"quant": "fp8"}
F32 = {"dtype": torch.float32}
I32 = {"dtype": torch.int32}

_COMPRESSOR = [  # inside a compressor: ours, hub, stored as
    ("kv_proj.weight", "wkv.weight", PLAIN),
    ("gate_proj.weight", "wgate.weight", PLAIN),
    ("position_bias", "ape", F32),
    ("kv_norm.weight", "norm.weight", PLAIN),
]

# inside a block (`layers.N.` / `mtp.K.block.` ours, `layers.N.` / `mtp.K.` the hub's): ours, hub, stored as
BLOCK: dict[str, tuple[str, dict]] = {ours: (hub, how) for ours, hub, how in [
    ("input_layernorm.weight", "attn_norm.weight", PLAIN),
    ("post_attention_layernorm.weight", "ffn_norm.weight", PLAIN),
    *[(f"{site}_hc.{p}", f"hc_{site}_{p}", F32) for site in ("attn", "ffn") for p in ("fn", "base", "scale")],
    ("self_attn.sinks", "attn.attn_sink", F32),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight", FP8),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight", PLAIN),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight", FP8),
    ("self_attn.kv_proj.weight", "attn.wkv.weight", FP8),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight", PLAIN),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight", FP8),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight", FP8),
    *[("self_attn.compressor." + o, "attn.compressor." + h, how) for o, h, how in _COMPRESSOR],
    *[("self_attn.compressor.indexer." + o, "attn.indexer.compressor." + h, how) for o, h, how in _COMPRESSOR],
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight", FP8),
    ("self_attn.compressor.indexer.scorer.weights_proj.weight", "attn.indexer.weights_proj.weight", PLAIN),
    ("mlp.gate.weight", "ffn.gate.weight", PLAIN),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias", F32),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid", I32),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight", FP8),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight", FP8),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight", FP8),
]}
# routed expert j of a block, split out of `mlp.experts.gate_up_proj` (E, 2I, D) / `down_proj` (E, D, I)
EXPERTS = ("ffn.experts.{j}.w1.weight", "ffn.experts.{j}.w3.weight", "ffn.experts.{j}.w2.weight")  # gate, up, down

_HEAD = {f"hc_head.hc_{p}": (f"hc_head_{p}", F32) for p in ("fn", "base", "scale")}
TOP: dict[str, tuple[str, dict]] = {
    "embed_tokens.weight": ("embed.weight", PLAIN), "norm.weight": ("norm.weight", PLAIN),
    "lm_head.weight": ("head.weight", PLAIN), **_HEAD}
MTP: dict[str, tuple[str, dict]] = {  # module K's own tensors, `mtp.K.` on both sides
    "enorm.weight": ("enorm.weight", PLAIN), "hnorm.weight": ("hnorm.weight", PLAIN),
    "e_proj.weight": ("e_proj.weight", FP8), "h_proj.weight": ("h_proj.weight", FP8),
    "norm.weight": ("norm.weight", PLAIN), **_HEAD}

# `DeepseekV4ForCausalLM.save_pretrained` (transformers 5.24) reverses its conversion mapping on the in-memory names,
# `model.` prefix included: its `^`-anchored renames (embed, norm, hc_head) then never match, and `.kv_norm.` comes
# back as `.norm.` (the mapping folds both spellings into kv_norm on load). It writes no MTP modules.
SAVED = [(re.compile(p), r) for p, r in [
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"^layers\.(\d+)\.attn\.kv_norm\.", r"layers.\1.attn.norm."),
    (r"^layers\.", "model.layers."),
]]


def saved_name(hub: str) -> str:
    """The hub name `hub` as transformers' save_pretrained spells it."""
    for pattern, repl in SAVED:
        hub = pattern.sub(repl, hub)
    return hub
