"""bf16 training with fp32 master weights: the forward and backward run on a bf16 copy of the model, the optimizer
steps the model itself in fp32.

Why not autocast: autocast keeps the residual stream, norms and losses in fp32 and casts every matmul's input
(activations, N x D each) to bf16 and its gradient back, per op, in every step. On a small model those casts are
memory traffic of the order of the matmuls themselves (a 192-wide layer does ~2 x 192 FLOPs per element it reads),
which is why bf16 autocast ran at half the fp32 speed on a CPU whose bf16 matmuls are 2.3x faster. Here weights are
cast once per step (O(parameters), not O(tokens x width) per op), activations stay bf16 end to end, and the code
that needs fp32 upcasts itself (RMSNorm's statistics, router scores, the head's logits and loss).

The model (`master`) stays what the optimizer, clipping, balancing, checkpoints, evaluation of exact state and
export see, in fp32, so checkpoints and resume are those of an fp32 run: the bf16 copy is a function of the
masters, re-made after every optimizer step and after a resume. Gradients move to the masters after each
micro-batch's backward and accumulate there in fp32.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ComputeCopy:
    """`ComputeCopy(model, torch.bfloat16)`: `module` is a copy of `model` in `dtype` (the model's `cast`: the
    parameters it keeps in fp32 stay fp32; buffers keep their dtypes: rotary tables, routing biases, hash tables)."""

    def __init__(self, master: nn.Module, dtype: torch.dtype):
        self.master, self.dtype = master, dtype
        self.module = copy.deepcopy(master).cast(dtype)
        # parameters() and buffers() list tied tensors once, in the same order in a deep copy
        self.params = list(zip(master.parameters(), self.module.parameters()))
        self.buffers = list(zip(master.buffers(), self.module.buffers()))

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Add the copy's gradients to the masters' (fp32) and clear them: called after each micro-batch's backward."""
        for m, c in self.params:
            if c.grad is None:
                continue
            g = c.grad.to(m.dtype)
            if m.grad is None:
                m.grad = g if g is not c.grad else g.clone()
            else:
                m.grad += g
            c.grad = None

    @torch.no_grad()
    def sync(self) -> None:
        """The copy from the masters: after an optimizer step (weights, and the routing biases balancing moved) and
        after loading a checkpoint."""
        for m, c in self.params + self.buffers:
            c.copy_(m)
