"""The full model: embedding, blocks, final norm, output head, MTP modules; losses; a greedy reference decoder.

One class serves training and inference, for V2/V3 and V4 alike (the layers' kinds come from the config). Parameter
names mirror transformers' without the `model.` prefix (`embed_tokens`, `layers.N.self_attn.kv_b_proj`,
`layers.N.attn_hc.fn`, `hc_head.hc_fn`, ...); MTP modules live under `mtp.K`. `qiusuo.hf` maps names.

The residual state between blocks is (B, T, D), or V4's N mHC streams (B, T, N, D); `collapse` turns it into the
final hidden states (B, T, D) (V4: the `hc_head` collapse) before the last norm and the output head.

State travels in arguments and return values: the cache (the protocol of `qiusuo.cache.spec`) is passed in and advanced
here; a packed batch's documents come as `doc_ids`; the routers' decisions come back in `LossOutput.load` for the
train step to balance with (`qiusuo.train.step`), and the balance-loss weight is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.block import Block, layer_cache_specs
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.cache.precision import CacheDtype
from qiusuo.cache.spec import LayerCacheSpec
from qiusuo.model.compressed_attention import CompressedAttention
from qiusuo.model.compressor import Compressor
from qiusuo.model.head_loss import IGNORE_INDEX, linear_cross_entropy
from qiusuo.model.mhc import HyperConnection, HyperHead, expand_streams, residual_kind
from qiusuo.model.moe import Experts, HashRouter, Router, Routing, moe_routers, routing_load, sequence_balance_loss
from qiusuo.model.mtp import make_mtp
from qiusuo.model.rope import RMSNorm, RopeAt, Rotary, rotaries

# parameters DeepSeek-V4 keeps in fp32 whatever the model's dtype (transformers' `_keep_in_fp32_modules_strict`):
# the mHC maps, the attention sinks and the compressors' position biases, small and read in fp32 anyway
FP32_PARAMETERS = ("attn_hc.", "ffn_hc.", "hc_head.", ".sinks", ".position_bias")


@dataclass
class LossOutput:
    """`loss` is what to backpropagate: ce + mtp_weight * mean(mtp depth losses) + balance_alpha * balance +
    indexer. The parts are reported separately (detached values are for logging; `loss` carries the graph).
    `load` (num_routers, E): tokens each router sent to each expert in this forward (main layers, then MTP
    modules), what the aux-loss-free bias update needs; empty for a dense model. `indexer`: the mean of V4's CSA
    indexer losses (0 without CSA layers); it reaches only the indexers' parameters."""

    loss: torch.Tensor
    ce: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    load: torch.Tensor
    indexer: torch.Tensor | None = None


def document_positions_and_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (several documents per row, `doc_ids` (B, T), padding its own id): positions that restart at
    0 for each document (B, T), and a mask (B, 1, T, T) causal within a document only, so one forward treats
    each document as if it were alone (same rotary positions, no attention across documents)."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(start, t, 0), dim=1).values  # (B, T) index of the document's first token
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return t - first, (same & (t[None, :, None] >= t[None, None, :]))[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.hc_head = HyperHead(cfg) if residual_kind(cfg) == "mhc" else None
        self.mtp = nn.ModuleList(make_mtp(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotaries = nn.ModuleDict(rotaries(cfg))
        self.num_routers = len(moe_routers(self))
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def cast(self, dtype: torch.dtype) -> "Transformer":
        """Parameters to `dtype` except `FP32_PARAMETERS`; buffers (rotary tables, routing bias, hash tables)
        keep theirs. Works on the meta device (the loader casts before allocating)."""
        for name, p in self.named_parameters():
            if not any(k in "." + name for k in FP32_PARAMETERS):
                p.data = p.data.to(dtype)
        return self

    @property
    def rotary(self) -> Rotary:
        """The "main" rotary table (the only one of V2/V3)."""
        return self.rotaries["main"]

    def collapse(self, state: torch.Tensor) -> torch.Tensor:
        """The residual state -> final hidden states (B, T, D), before the last norm."""
        return state if self.hc_head is None else self.hc_head(state)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix (mHC maps included), ones for norms and mHC scales,
        zeros for biases, the routing bias, attention sinks and compressor position biases (transformers' V4
        init); hash tables drawn at random (`HashRouter.reset_table`)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Experts):
                m.gate_up_proj.copy_(torch.randn(m.gate_up_proj.shape, generator=gen) * std)
                m.down_proj.copy_(torch.randn(m.down_proj.shape, generator=gen) * std)
            elif isinstance(m, Router):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, HashRouter):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                m.reset_table(seed or 0)
            elif isinstance(m, (HyperConnection, HyperHead)):
                fn, base, scale = (m.fn, m.base, m.scale) if isinstance(m, HyperConnection) else (
                    m.hc_fn, m.hc_base, m.hc_scale)
                fn.copy_(torch.randn(fn.shape, generator=gen) * std)
                base.zero_()
                scale.fill_(1.0)
            elif isinstance(m, CompressedAttention):
                m.sinks.zero_()
            elif isinstance(m, Compressor):
                m.position_bias.zero_()

    def cache_specs(self, draft: bool = False) -> list[LayerCacheSpec]:
        """What each layer caches per token (its attention kind's cache kind): what every cache is built from.
        `draft`: one more layer for the first MTP module, the drafter of speculative decoding."""
        return layer_cache_specs(self.cfg, draft)

    def _check_inputs(self, input_ids: torch.Tensor, start: int) -> None:
        """Ids in the vocabulary and positions within the limit, with errors that say so. The id check reads
        values (a host sync), so a compiled forward skips it and stays one graph: there inductor's own bounds
        check on the embedding's indices raises instead, and the trainer has checked the data's vocabulary."""
        if (input_ids.numel() and not torch.compiler.is_compiling()
                and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size)):
            raise ValueError(f"input_ids hold values in [{int(input_ids.min())}, {int(input_ids.max())}] but the "
                             f"vocabulary has {self.cfg.vocab_size} entries (ids 0..{self.cfg.vocab_size - 1})")
        end = start + input_ids.shape[1]
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {end} positions exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}; shorten the input or raise the limit (with YaRN)")

    def _run(self, input_ids: torch.Tensor, cache=None, absorb: bool | None = None,
             doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Routing], list[torch.Tensor]]:
        """The last residual state, the routing of every score-routed MoE layer and the attention layers'
        auxiliary losses (CSA's indexer losses, when gradients are on)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids (packed documents) and a cache cannot be combined; pack for training only")
        B, T = input_ids.shape
        mask = None
        if cache is not None:
            positions = cache.positions(T)  # (B, T)
            end = int(positions.max()) + 1 if T else 0
            self._check_inputs(input_ids, end - T)
            if end > getattr(cache, "max_len", end):
                raise ValueError(f"the cache holds {cache.max_len} tokens per sequence; {end} do not fit")
        elif doc_ids is not None:
            self._check_inputs(input_ids, 0)
            positions, mask = document_positions_and_mask(doc_ids)
        else:
            self._check_inputs(input_ids, 0)
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        if absorb is None:
            absorb = cache is not None and T == 1
        rope = RopeAt(self.rotaries, positions)
        x = expand_streams(self.cfg, self.embed_tokens(input_ids))
        routings, aux = [], []
        for layer in self.layers:
            x, routing, loss = layer(x, rope, cache, absorb, mask, input_ids)
            routings += [routing] if routing is not None else []
            aux += [loss] if loss is not None else []
        if cache is not None:
            cache.advance(T)
        return x, routings, aux

    def states(self, input_ids: torch.Tensor, cache=None, absorb: bool | None = None) -> torch.Tensor:
        """The last residual state (B, T, D) or V4's streams (B, T, N, D): what the MTP modules read."""
        return self._run(input_ids, cache, absorb)[0]

    def hidden(self, input_ids: torch.Tensor, cache=None, absorb: bool | None = None,
               doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D), before the last norm. With a cache, the new tokens' entries are written
        and the cache advanced by T."""
        return self.collapse(self._run(input_ids, cache, absorb, doc_ids)[0])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output logits from final hidden states: lm_head(norm(h)). (..., D) -> (..., vocab)."""
        return self.lm_head(self.norm(h))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache=None,
                absorb: bool | None = None, mtp_weight: float = 0.3, balance_alpha: float = 0.0,
                doc_ids: torch.Tensor | None = None):
        """Without labels: logits (B, T, vocab). With labels (B, T), already aligned (labels[t] is the target at
        position t, -100 ignored): a `LossOutput`. The MTP module k sees the input token k steps ahead and is
        scored on labels k steps ahead; the last k positions, which have no such token, are dropped.
        `balance_alpha`: weight of the sequence-wise balance loss (0: off; DeepSeek-V3 used 1e-4). `doc_ids`
        (B, T): packed documents, each attended as if alone (the MTP loss ignores it: pass mtp_weight=0)."""
        state, routings, aux = self._run(input_ids, cache, absorb, doc_ids)
        h = self.collapse(state)
        if labels is None:
            return self.logits(h)
        ce = self._ce(self.norm(h), labels)
        mtp = h.new_zeros((), dtype=torch.float32)
        if self.mtp and mtp_weight > 0:
            T = input_ids.shape[1]
            rope = RopeAt(self.rotaries, torch.arange(T, device=input_ids.device))
            depth_losses = []
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                ahead = input_ids[:, k:]
                state, routing, _ = module(state[:, : T - k], self.embed_tokens(ahead), rope.narrow(T - k), ahead)
                if routing is not None:
                    routings.append(routing)
                depth_losses.append(self._ce(module.head_input(state), labels[:, k:]))
            if depth_losses:
                mtp = torch.stack(depth_losses).mean()
        B = input_ids.shape[0]
        balance = h.new_zeros((), dtype=torch.float32)
        if balance_alpha > 0:
            for r in routings:
                balance = balance + sequence_balance_loss(r.scores.view(B, -1, r.scores.shape[-1]),
                                                          r.idx.view(B, -1, r.idx.shape[-1]))
            balance = balance_alpha * balance
        with torch.no_grad():
            load = routing_load(routings, self.num_routers, self.cfg.n_routed_experts or 0)
        indexer = torch.stack(aux).mean() if aux else h.new_zeros((), dtype=torch.float32)
        # only the terms that are on: compiled by inductor (torch 2.13), `ce + zeros` returned next to
        # `ce.detach()` came out without a gradient
        loss = ce
        for on, term in ((self.mtp and mtp_weight > 0, mtp_weight * mtp), (balance_alpha > 0, balance), (aux, indexer)):
            loss = loss + term if on else loss
        return LossOutput(loss, ce.detach(), mtp.detach(), balance.detach(), load, indexer.detach())

    def _ce(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE of the head on normed states h (B, T, D): chunked and fused with the head
        (`qiusuo.model.head_loss`) when the head is a plain bias-free Linear, else through full logits."""
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(h, self.lm_head.weight, labels)
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def _absorbed(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens (B, T) through every layer over `cache`, absorbed attention -> the last residual state."""
        rope = RopeAt(self.rotaries, cache.positions(tokens.shape[1]))
        x = expand_streams(self.cfg, self.embed_tokens(tokens))
        for layer in self.layers:
            x = layer(x, rope, cache, True, None, tokens)[0]
        return x

    def decode_logits(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step without advancing the cache: tokens (B, 1) -> next-token logits (B, V), absorbed
        attention, no input checks and no host syncs: the unit `torch.compile` captures whole (advancing mutates
        Python-side state, which a compiled graph must not guard on). Callers validate ids and lengths up front."""
        return self.logits(self.collapse(self._absorbed(tokens, cache))[:, -1])

    def verify_logits(self, tokens: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative decoding's verification: tokens (B, T) (each row's pending token, then its drafts) ->
        (the last residual state (B, T, ...), logits (B, T, V)) at every position, without advancing the cache;
        like `decode_logits`, free of host syncs so `torch.compile` captures it whole."""
        x = self._absorbed(tokens, cache)
        return x, self.logits(self.collapse(x))

    def draft_states(self, state: torch.Tensor, tokens: torch.Tensor, cache, absorb: bool = True) -> torch.Tensor:
        """The first MTP module as a drafter over `cache`'s extra layer (`cache_specs(draft=True)`): at each
        position t, the residual state at t (B, T, ...) and the token at t + 1 (B, T) -> the module's state
        (B, T, ...), whose `draft_logits` predict the token at t + 2; at the positions `cache.positions(T)`, no
        advance. Logits are left to the caller: a drafter needs them at one position per row, and the output
        head is most of a small model's cost."""
        rope = RopeAt(self.rotaries, cache.positions(tokens.shape[1]))
        return self.mtp[0](state, self.embed_tokens(tokens), rope, tokens, cache, absorb)[0]

    def draft_logits(self, state: torch.Tensor) -> torch.Tensor:
        """The first MTP module's state (B, T, D) or streams (B, T, N, D) -> its logits (B, T, V)."""
        return self.lm_head(self.mtp[0].head_input(state))

    def decode_step(self, tokens: torch.Tensor, cache, compiled=None) -> torch.Tensor:
        """`decode_logits` (or its compiled form `compiled`), then advance the cache by the one new token."""
        logits = (compiled or self.decode_logits)(tokens, cache)
        cache.advance(1)
        return logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 kv_cache_dtype: CacheDtype | torch.dtype | str | None = None, compile: bool = False) -> torch.Tensor:
        """Greedy decoding over a contiguous cache (`qiusuo.cache.contiguous`: the engine's cache kinds over a
        private pool): prefill (expanded path), then token by token (absorbed path). Rows advance together.
        What `qiusuo bench decode` times; tests hold it against the forward without a cache. Returns (B, T + new).
        `kv_cache_dtype`: the cache's precision (`CacheDtype.of`: None or "auto" the model's dtype, "bf16", "fp8").
        `compile=True` runs decoding steps through `torch.compile` (worth it past ~100 tokens: compiling takes
        tens of seconds on a CPU)."""
        B, T = input_ids.shape
        self._check_inputs(input_ids, max_new_tokens)  # the whole generation must fit the positions
        dtype = CacheDtype.of(kv_cache_dtype, next(self.parameters()).dtype)
        cache = ContiguousCache(self.cache_specs(), B, T + max_new_tokens, device=input_ids.device, dtype=dtype)
        compiled = torch.compile(self.decode_logits, dynamic=False) if compile else None
        logits = self.logits(self.hidden(input_ids, cache)[:, -1])  # only the last position's logits
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:  # a fixed-shape step (the whole context under a mask), built outside
                logits = self.decode_step(nxt, cache.batch(1), compiled)
        return torch.cat(out, dim=1)
