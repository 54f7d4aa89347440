"""Model configuration: one dataclass with the Hugging Face DeepSeek field names, its validation, and the registry
of named sizes.

Field names are exactly those of `config.json` in DeepSeek-V2/V3/V4 checkpoints so that a real config loads as is,
and what is not a model config is refused rather than filled with defaults. Reading and writing config files
(`ModelConfig.from_hf`, `from_deepseek_inference`, `to_hf`) is `qiusuo.hf.config_json`'s work: other families on
DeepSeek's architecture (Kimi-K2 and K2.5, GLM-4.7-Flash, Sarvam, Youtu, GLM-5) are rows of `qiusuo.families`,
whose spellings it translates both ways; `model_type` keeps the family's name and `arch` says which DeepSeek
architecture it runs as. Every size the project talks about lives in `PRESETS`; code never branches on a width.
A leaf: it imports nothing of the model, only the `qiusuo.families` table (parameter and cache-bytes counting live in
`qiusuo.model.count`; the config.json translations import this module, lazily in the other direction).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qiusuo.families import CSA, FAMILIES, HCA, SLIDING, family

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
V4_ATTENTION_KINDS = (SLIDING, CSA, HCA)
V4_MLP_KINDS = ("hash_moe", "moe")
INDEXER_TYPES = ("full", "shared")  # GLM-5's per-layer indexer: its own top-k, or the previous full layer's


@dataclass
class ModelConfig:
    """A DeepSeek-V2/V3 architecture. Defaults are a small V3-style model."""

    model_type: str = "deepseek_v3"  # a row of `qiusuo.families.FAMILIES`: the checkpoint family, whose `arch` sets
    # the math and the routing defaults (kimi_k2, kimi_k25, glm4_moe_lite, sarvam_mla, youtu: V3; glm_moe_dsa: V3.2)
    vocab_size: int = 8192
    hidden_size: int = 256  # residual width D
    intermediate_size: int = 768  # width of the dense MLP in the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 128  # width of one routed (and one shared) expert
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP instead of MoE
    moe_layer_freq: int = 1  # MoE every n-th layer after the dense ones (DeepSeek uses 1)
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # unused by MLA; kept so configs round-trip
    q_lora_rank: int | None = None  # None/0: plain q_proj; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 64  # width of the cached latent c_kv
    qk_nope_head_dim: int = 32  # per-head query/key part without rotary
    qk_rope_head_dim: int = 16  # per-head rotary part (the key's is shared by all heads)
    v_head_dim: int = 32
    n_routed_experts: int | None = 16  # None: no MoE at all (dense model)
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 4
    n_group: int | None = 4
    topk_group: int | None = 2
    topk_method: str | None = None  # None: "noaux_tc" for V3, "greedy" for V2
    scoring_func: str | None = None  # None: "sigmoid" for V3, "softmax" for V2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # rotary on interleaved pairs, as in DeepSeek's checkpoints
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # MTP depth D
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    swiglu_limit: float | None = None  # clamp SwiGLU's gate (above) and up (both sides) pre-activations; V4: 10
    # V4's recipe on any family (qiusuo's switches; V4 itself always has mHC): mHC streams instead of the plain
    # residual, and per-layer MLP kinds (`mlp_layer_types`: "dense" | "moe" | "hash_moe") instead of
    # first_k_dense_replace. A V2/V3 model with them is ours alone: transformers cannot load it.
    use_mhc: bool | None = None  # None: True for V4, False otherwise; the hc_* fields below size it
    # ---- DeepSeek-V4 (model_type "deepseek_v4"); defaults are transformers' (the V4-Flash shapes)
    head_dim: int = 512  # width of the one shared key = value head; rotary on its last qk_rope_head_dim dims
    sliding_window: int = 128  # every V4 layer attends to the last `sliding_window` tokens (itself included)
    layer_types: list[str] | None = None  # per layer: one of V4_ATTENTION_KINDS (None: V4-Pro's default schedule)
    compress_rates: dict | None = None  # {CSA: m, HCA: m'}; default {CSA: 4, HCA: 128}
    compress_rope_theta: float = 160000.0  # rotary base of CSA/HCA layers (they alone get `rope_scaling`)
    mlp_layer_types: list[str] | None = None  # per layer: "hash_moe" (tid2eid table) or "moe"; V4's None: 3 hash
    hc_mult: int = 4  # mHC: residual streams per token
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    o_groups: int = 8  # grouped low-rank output projection: head groups
    o_lora_rank: int = 1024  # ... and each group's intermediate width
    index_n_heads: int = 64  # lightning indexer (CSA layers)
    index_head_dim: int = 128
    index_topk: int = 512  # compressed entries each query keeps
    # ---- DeepSeek-V3.2's indexer variants (GLM-5, `glm_moe_dsa`): the same index_* fields, and
    index_rope_interleave: bool = False  # rotary on interleaved pairs in the indexer (GLM-5); False: V3.2's halves
    indexer_types: list[str] | None = None  # per layer "full" | "shared" (reuse the previous full layer's top-k)
    # ---- a multimodal wrapper's own config.json keys (Kimi-K2.5's vision_config, media token ids), written back
    # around this text config on export; qiusuo runs the text model only
    wrapper: dict | None = None

    def __post_init__(self) -> None:
        v3 = self.arch in ("deepseek_v3", "deepseek_v32", "deepseek_v4")
        if self.topk_method is None:
            self.topk_method = "noaux_tc" if v3 else "greedy"
        if self.scoring_func is None:
            self.scoring_func = "sqrtsoftplus" if self.is_v4 else "sigmoid" if v3 else "softmax"
        if self.use_mhc is None:
            self.use_mhc = self.is_v4
        if self.mlp_layer_types is not None:
            self.mlp_layer_types = list(self.mlp_layer_types)
        if self.indexer_types is not None:
            self.indexer_types = list(self.indexer_types)
        if self.is_v4:
            n = self.num_hidden_layers
            if self.compress_rates is None:
                self.compress_rates = {CSA: 4, HCA: 128}
            if self.layer_types is None:  # transformers' default: V4-Pro's 2 HCA layers, then CSA/HCA alternating
                self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
            if self.mlp_layer_types is None:
                self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
            self.layer_types, self.mlp_layer_types = list(self.layer_types), list(self.mlp_layer_types)
            if self.num_key_value_heads is None:
                self.num_key_value_heads = 1
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        if self.n_routed_experts == 0:
            self.n_routed_experts = None
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def arch(self) -> str:
        """The DeepSeek architecture this family runs as (`qiusuo.families.ARCHS`)."""
        return FAMILIES[self.model_type].arch if self.model_type in FAMILIES else "deepseek_v3"

    @property
    def is_v4(self) -> bool:
        return self.arch == "deepseek_v4"

    @property
    def is_v32(self) -> bool:
        """DeepSeek-V3.2 (and GLM-5): V3 with sparse attention (the `dsa` attention kind)."""
        return self.arch == "deepseek_v32"

    def shares_topk(self, layer_idx: int) -> bool:
        """Layer `layer_idx` reuses the previous full layer's top-k (GLM-5's "shared" indexer layers; MTP blocks,
        past num_hidden_layers, run their own)."""
        types = self.indexer_types
        return bool(types) and layer_idx < len(types) and types[layer_idx] == "shared"

    def compress_rate(self, kind: str) -> int:
        """Tokens pooled into one compressed entry by a V4 layer of `kind` (CSA or HCA)."""
        return int(self.compress_rates[kind])

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) uses MoE; MTP blocks (i >= num_hidden_layers) follow the same rule (`mlp_layer_types`,
        when set, decides instead: `qiusuo.model.block.mlp_kind`)."""
        return self.is_moe and (self.is_v4 or i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0)

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by the absorbed path: the latent plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if rs and (rs.get("type") or rs.get("rope_type")) == "yarn":
            return rs
        return None

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale^2 when YaRN is on (DeepSeek-V3 inference/model.py)."""
        scale = self.qk_head_dim**-0.5
        rs = self.yarn
        if rs is not None:
            mscale_all_dim = rs.get("mscale_all_dim", 0) or 0
            if mscale_all_dim:
                m = yarn_get_mscale(rs["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model_type not in FAMILIES:
            try:
                family(self.model_type)
            except ValueError as e:
                raise bad("model_type", str(e).removeprefix("config.json ")) from None
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.qk_nope_head_dim < 0:
            raise bad("qk_nope_head_dim", "must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (rotary works on pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank < 0:
            raise bad("q_lora_rank", "must be None, 0 or positive")
        if self.first_k_dense_replace < 0:
            raise bad("first_k_dense_replace", "must be >= 0")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"unknown; use one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"unknown; use one of {SCORING_FUNCS}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type") or self.rope_scaling.get("rope_type")
            if kind not in ("yarn", "default", None):
                raise bad("rope_scaling", f"type {kind!r} is not supported; use 'yarn' or none")
            if kind == "yarn" and not self.rope_scaling.get("factor", 0) > 0:
                raise bad("rope_scaling", "yarn needs a positive 'factor'")
        if self.intermediate_size <= 0 and self.first_k_dense_replace > 0:
            raise bad("intermediate_size", "must be positive when there are dense layers")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise bad("swiglu_limit", "must be positive, or None for no clamp")
        if self.is_v4:
            self._validate_v4(bad)
        else:
            self._validate_recipe(bad)
        if self.is_v32:
            for name in ("index_n_heads", "index_head_dim", "index_topk", "q_lora_rank"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise bad(name, "must be a positive integer (DeepSeek-V3.2's indexer)")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise bad("index_head_dim", f"must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
            types = self.indexer_types
            if types is not None:
                if len(types) != self.num_hidden_layers or any(t not in INDEXER_TYPES for t in types):
                    raise bad("indexer_types", f"needs one of {INDEXER_TYPES} per layer ({self.num_hidden_layers})")
                if types and types[0] != "full":
                    raise bad("indexer_types", "the first layer must be 'full': a 'shared' layer reuses the top-k of "
                                               "the full layer before it")
        elif self.indexer_types is not None or self.index_rope_interleave:
            raise bad("indexer_types" if self.indexer_types is not None else "index_rope_interleave",
                      "is a DeepSeek-V3.2 indexer setting; this model has no indexer")
        if not self.is_moe:
            return
        e = self.n_routed_experts
        if e < 0:
            raise bad("n_routed_experts", "must be positive or None")
        if not self.moe_intermediate_size or self.moe_intermediate_size <= 0:
            raise bad("moe_intermediate_size", "must be positive for a MoE model")
        k = self.num_experts_per_tok
        if not k or k <= 0:
            raise bad("num_experts_per_tok", "must be a positive integer")
        if k > e:
            raise bad("num_experts_per_tok", f"cannot exceed n_routed_experts={e}")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise bad("n_shared_experts", "must be >= 0")
        if self.routed_scaling_factor <= 0:
            raise bad("routed_scaling_factor", "must be positive")
        if self.moe_layer_freq <= 0:
            raise bad("moe_layer_freq", "must be positive")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            g, tg = self.n_group, self.topk_group
            if not g or g <= 0:
                raise bad("n_group", f"must be positive for topk_method={self.topk_method!r}")
            if e % g:
                raise bad("n_group", f"n_routed_experts={e} is not divisible by n_group={g}")
            if not tg or tg <= 0 or tg > g:
                raise bad("topk_group", f"must be in 1..n_group={g}")
            if k > tg * (e // g):
                raise bad("num_experts_per_tok", f"{k} experts cannot be picked from {tg} groups of {e // g}")
            if self.topk_method == "noaux_tc" and e // g < 2:
                raise bad("n_group", "noaux_tc ranks groups by their top-2 scores: each group needs >= 2 experts")

    def _validate_recipe(self, bad) -> None:
        """V4's recipe switches on a V2/V3 model."""
        if self.use_mhc:
            for name in ("hc_mult", "hc_sinkhorn_iters"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise bad(name, "must be a positive integer when use_mhc is on")
        kinds = self.mlp_layer_types
        if kinds is None:
            return
        if len(kinds) != self.num_hidden_layers:
            raise bad("mlp_layer_types", f"has {len(kinds)} entries; num_hidden_layers={self.num_hidden_layers} "
                                         "needs one per layer")
        for i, k in enumerate(kinds):
            if k not in ("dense",) + V4_MLP_KINDS:
                raise bad("mlp_layer_types", f"entry {i} is {k!r}; each must be 'dense', 'moe' or 'hash_moe'")
            if k != "dense" and not self.is_moe:
                raise bad("mlp_layer_types", f"entry {i} is {k!r} but the model has no experts (n_routed_experts)")
            if k == "dense" and self.intermediate_size <= 0:
                raise bad("intermediate_size", "must be positive when there are dense layers")

    def _validate_v4(self, bad) -> None:
        n, P = self.num_hidden_layers, self.qk_rope_head_dim
        for name in ("head_dim", "sliding_window", "hc_mult", "hc_sinkhorn_iters", "o_groups", "o_lora_rank",
                     "index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        if not self.q_lora_rank:
            raise bad("q_lora_rank", "DeepSeek-V4 needs a query LoRA rank (its indexer reads the query latent)")
        if not self.use_mhc:
            raise bad("use_mhc", "DeepSeek-V4's residual is mHC: leave it on (None or True)")
        if self.num_key_value_heads not in (None, 1):
            raise bad("num_key_value_heads", "DeepSeek-V4 attention has one shared key/value head: use 1")
        for name, width in (("head_dim", self.head_dim), ("index_head_dim", self.index_head_dim)):
            if width < P or width % 2:
                raise bad(name, f"must be even and >= qk_rope_head_dim={P} (rotary runs on its last {P} dims)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups or self.num_attention_heads % self.o_groups:
            raise bad("o_groups", f"must divide num_attention_heads={self.num_attention_heads}")
        if not self.is_moe:
            raise bad("n_routed_experts", "DeepSeek-V4's every layer is MoE: set a positive expert count")
        if self.first_k_dense_replace:
            raise bad("first_k_dense_replace", "DeepSeek-V4 has no dense layers: use 0")
        if self.n_group not in (None, 1) or self.topk_group not in (None, 1):
            raise bad("n_group", "DeepSeek-V4 routes without expert groups: use n_group = topk_group = 1")
        if not isinstance(self.compress_rates, dict) or set(self.compress_rates) - {CSA, HCA}:
            raise bad("compress_rates", f"must map {CSA!r} and {HCA!r} to a compression rate")
        for kind in (CSA, HCA):
            r = self.compress_rates.get(kind)
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise bad("compress_rates", f"the rate of {kind!r} must be a positive integer, got {r!r}")
        for name, allowed in (("layer_types", V4_ATTENTION_KINDS), ("mlp_layer_types", V4_MLP_KINDS)):
            kinds = getattr(self, name)
            if len(kinds) != n:
                raise bad(name, f"has {len(kinds)} entries; num_hidden_layers={n} needs one per layer")
            for i, k in enumerate(kinds):
                if k not in allowed:
                    raise bad(name, f"entry {i} is {k!r}; each must be one of {allowed}")

    # ---------------------------------------------------------------- config.json (`qiusuo.hf.config_json`)
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """A Hugging Face `config.json` dict of any family in `qiusuo.families` (`qiusuo.hf.config_json.from_hf`:
        what it accepts and what it refuses)."""
        from qiusuo.hf.config_json import from_hf

        return from_hf(d)

    @classmethod
    def from_deepseek_inference(cls, d: dict[str, Any]) -> "ModelConfig":
        """DeepSeek's own inference config (`dim`, `n_layers`, ...: `qiusuo.hf.config_json.from_deepseek_inference`)."""
        from qiusuo.hf.config_json import from_deepseek_inference

        return from_deepseek_inference(d)

    def to_hf(self) -> dict[str, Any]:
        """`config.json` as the family ships it (`qiusuo.hf.config_json.to_hf`)."""
        from qiusuo.hf.config_json import to_hf

        return to_hf(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ------------------------------------------------------------------ named sizes
_V3 = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840, num_nextn_predict_layers=1,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    bos_token_id=0, eos_token_id=1,
)

# V4-Flash's config.json (284B total, 13B active): its compress_ratios are 0, 0, (4, 128) x 20, 4 (+ 0 for MTP)
_V4_FLASH = dict(
    model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
    num_attention_heads=64, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="noaux_tc",
    first_k_dense_replace=0, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
    swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128,
    index_topk=512, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
    compress_rope_theta=160000.0, compress_rates={CSA: 4, HCA: 128},
    layer_types=[SLIDING, SLIDING] + [CSA, HCA] * 20 + [CSA], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                  "beta_slow": 1},
    max_position_embeddings=1048576, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
)

_BENCH = dict(
    model_type="deepseek_v3", vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=None, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=2048,
)

_V4_TINY = dict(
    model_type="deepseek_v4", vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
    routed_scaling_factor=1.5, swiglu_limit=10.0, sliding_window=16, o_groups=2, o_lora_rank=16,
    index_n_heads=4, index_head_dim=16, index_topk=4, hc_mult=2, layer_types=[SLIDING, CSA, HCA, CSA],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], compress_rates={CSA: 4, HCA: 16},
    max_position_embeddings=512, num_nextn_predict_layers=1,
)

# V4-Pro's (1.6T total, 49B active): compress_ratios 128, 128, (4, 128) x 29, 4 (+ 0 for MTP)
_V4_PRO = dict(
    _V4_FLASH, hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61, num_attention_heads=128,
    q_lora_rank=1536, n_routed_experts=384, routed_scaling_factor=2.5, o_groups=16, index_topk=1024,
    layer_types=[HCA, HCA] + [CSA, HCA] * 29 + [CSA], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58,
)

PRESETS: dict[str, dict[str, Any]] = {
    # runs a training step in well under a second on 2 CPU cores; the test suite's workhorse
    "tiny": dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=512,
        num_nextn_predict_layers=1,
    ),
    # the configuration every benchmark runs on (`qiusuo bench`; docs/performance.md)
    "bench": _BENCH,
    # `qiusuo demo`: the lowest held-out bits per byte in 5 minutes on 2 CPU cores (sweep in presets/pretrain-demo.toml)
    "demo": dict(
        model_type="deepseek_v3", vocab_size=8192, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=6, q_lora_rank=None, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v3": _V3,
    # DeepSeek-V3.2(-Exp): V3 plus the lightning indexer (64 heads of 128, top-2048 tokens) on every layer
    "deepseek-v3.2": dict(_V3, model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048),
    # V3.2 at the `bench` size (with a query LoRA, which its indexer reads): `qiusuo bench context`'s sparse MLA
    "v32-bench": dict(_BENCH, model_type="deepseek_v32", q_lora_rank=64, index_n_heads=8, index_head_dim=32,
                      index_topk=256),
    # DeepSeek-V4 at test size: every attention kind, a hash layer, mHC with 2 streams, MTP
    "v4-tiny": _V4_TINY,
    # DeepSeek-V4 at the `bench` size (hidden 256, 4 layers, 16 experts top-4): `qiusuo bench context`'s V4 side
    "v4-bench": dict(
        _V4_TINY, vocab_size=8192, hidden_size=256, moe_intermediate_size=128, num_attention_heads=8, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=64, n_routed_experts=16, num_experts_per_tok=4, sliding_window=128,
        o_groups=4, o_lora_rank=64, index_n_heads=8, index_head_dim=32, index_topk=64, hc_mult=4,
        compress_rates={CSA: 4, HCA: 128}, max_position_embeddings=2048, num_nextn_predict_layers=0),
    "deepseek-v4-flash": _V4_FLASH,
    "deepseek-v4-pro": _V4_PRO,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named size from the registry, with field overrides."""
    if name not in PRESETS:
        import difflib

        near = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown model size {name!r}{hint}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})

