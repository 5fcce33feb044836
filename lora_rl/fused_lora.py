"""Each LoRA linear layer as one autograd function with a hand-written backward (`train.fused_lora`).

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`. Besides the two small GEMMs that is a
full-size multiply and a full-size add in the forward, and their mirrors in the backward (the output
gradient times the scaling, the sum of two input gradients): four memory-bound passes over
[tokens, features] tensors per linear layer, as costly as the low-rank GEMMs themselves, and several
Python-level module calls. Here the scaling rides on the GEMMs' alpha and the low-rank product is
accumulated into the base output (forward) and the base input gradient (backward) by `addmm_`, so
each layer is three GEMM launches forward and five backward. The frozen base weight gets no gradient,
as in peft. The function saves the same tensors peft's path does (the input and the rank-r product).

Only the plain case is routed here - one active adapter, no dropout, not merged, a frozen nn.Linear
base, same dtypes, no extra arguments; anything else (disabled adapters for the reference policy,
merged weights while sampling, mixed-adapter batches) takes peft's own forward unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2 @ lora_a.t()  # [N, r]
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, lora_b.t(), alpha=scaling)  # + scaling * (x A^T) B^T, accumulated in the GEMM
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.shape = scaling, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ lora_b  # [N, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight  # the frozen base contributes an input gradient only
            grad_x.addmm_(gb, lora_a, alpha=s)
            grad_x = grad_x.view(ctx.shape)
        grad_a = (gb.t() @ x2).mul_(s)  # [r, in]
        grad_b = (g.t() @ xa).mul_(s)  # [out, r]
        return grad_x, None, None, grad_a, grad_b, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    base = self.base_layer
    plain = (not args and not kwargs and not self.disable_adapters and not self.merged and len(active) == 1
             and active[0] not in self.lora_variant and isinstance(self.lora_dropout[active[0]], nn.Identity)
             and type(base) is nn.Linear and not base.weight.requires_grad
             and (base.bias is None or not base.bias.requires_grad)
             and x.dtype == base.weight.dtype == self.lora_A[active[0]].weight.dtype)
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    return LoRALinearFunction.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                    self.scaling[name])


def fuse_lora(model: nn.Module) -> int:
    """Route `model`'s peft LoRA linear layers through LoRALinearFunction; returns how many."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    return len(layers)

