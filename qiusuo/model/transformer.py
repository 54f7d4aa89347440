"""The full model: embedding, blocks, final norm, output head, MTP modules; losses; simple cached generation.

One class serves training and inference. Parameter names mirror Hugging Face's without the `model.` prefix
(`embed_tokens`, `layers.N.self_attn.kv_b_proj`, ...); MTP modules live under `mtp.K`. `qiusuo.hf` maps names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.block import Block
from qiusuo.model.cache import LatentCache
from qiusuo.model.moe import Experts, Router, moe_routers
from qiusuo.model.mtp import MTPModule
from qiusuo.model.rope import RMSNorm, Rotary

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """`loss` is what to backpropagate: ce + mtp_weight * mean(mtp depth losses) + balance. The parts are
    reported separately (detached values are for logging; `loss` carries the graph)."""

    loss: torch.Tensor
    ce: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor


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
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = Rotary(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases and the routing bias."""
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

    def set_balance_alpha(self, alpha: float) -> None:
        """Weight of the sequence-wise balance loss (0 turns it off; DeepSeek-V3 used 1e-4)."""
        for r in moe_routers(self):
            r.balance_alpha = alpha

    def _check_inputs(self, input_ids: torch.Tensor, start: int) -> None:
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"input_ids hold values in [{int(input_ids.min())}, {int(input_ids.max())}] but the "
                             f"vocabulary has {self.cfg.vocab_size} entries (ids 0..{self.cfg.vocab_size - 1})")
        end = start + input_ids.shape[1]
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {end} positions exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}; shorten the input or raise the limit (with YaRN)")

    def hidden(self, input_ids: torch.Tensor, cache=None, absorb: bool | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D), before the last norm."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is None:
            self._check_inputs(input_ids, 0)
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        else:
            positions = cache.positions(T)  # (B, T)
            end = int(positions.max()) + 1 if T else 0
            self._check_inputs(input_ids, end - T)
            if end > getattr(cache, "max_len", end):
                raise ValueError(f"the cache holds {cache.max_len} tokens per sequence; {end} do not fit")
        if absorb is None:
            absorb = cache is not None and T == 1
        rope = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, rope, cache, absorb)
        if cache is not None:
            cache.advance(T)
        return x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache=None,
                absorb: bool | None = None, mtp_weight: float = 0.3):
        """Without labels: logits (B, T, vocab). With labels (B, T), already aligned (labels[t] is the target at
        position t, -100 ignored): a `LossOutput`. The MTP module k sees the input token k steps ahead and is
        scored on labels k steps ahead; the last k positions, which have no such token, are dropped."""
        h = self.hidden(input_ids, cache, absorb)
        if labels is None:
            return self.lm_head(self.norm(h))
        ce = self._ce(self.norm(h), labels)
        mtp = h.new_zeros((), dtype=torch.float32)
        if self.mtp and mtp_weight > 0:
            T = input_ids.shape[1]
            rope = self.rotary(torch.arange(T, device=input_ids.device))
            depth_losses = []
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                h = module(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), tuple(r[: T - k] for r in rope))
                depth_losses.append(self._ce(module.norm(h), labels[:, k:]))
            if depth_losses:
                mtp = torch.stack(depth_losses).mean()
        balance = h.new_zeros((), dtype=torch.float32)
        for r in moe_routers(self):
            if r.balance_loss is not None:
                balance = balance + r.balance_loss
                r.balance_loss = None
        return LossOutput(ce + mtp_weight * mtp + balance, ce.detach(), mtp.detach(), balance.detach())

    def _ce(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def decode_step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step, tokens (B, 1) -> next-token logits (B, V), absorbed attention, no input checks and
        no host syncs: the unit `torch.compile` captures whole. Callers validate ids and lengths up front."""
        rope = self.rotary(cache.positions(1))
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, rope, cache, True)
        cache.advance(1)
        return self.lm_head(self.norm(x[:, -1]))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 cache_dtype: torch.dtype | None = None, compile: bool = False) -> torch.Tensor:
        """Prefill (expanded path) then decode token by token (absorbed path) over a contiguous latent cache.
        Rows advance together; for ragged batches and serving use `qiusuo.infer`. Returns (B, T + new).
        `compile=True` runs decoding steps through `torch.compile` (worth it past ~100 tokens: compiling takes
        tens of seconds on a CPU)."""
        B, T = input_ids.shape
        self._check_inputs(input_ids, max_new_tokens)  # the whole generation must fit the positions
        dtype = cache_dtype or next(self.parameters()).dtype
        cache = LatentCache(self.cfg, B, T + max_new_tokens, device=input_ids.device, dtype=dtype)
        step = torch.compile(self.decode_step, dynamic=False) if compile else self.decode_step
        logits = self.lm_head(self.norm(self.hidden(input_ids, cache)[:, -1]))  # only the last position's logits
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = step(nxt, cache)
        return torch.cat(out, dim=1)
