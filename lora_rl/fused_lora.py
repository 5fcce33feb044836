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
merged weights while sampling) takes peft's own forward unchanged.

`SegmentLoRAFunction` is the same for a batch whose consecutive row segments go through different
adapters (multi-LoRA jobs, `lora.adapter_rows`): one base GEMM over all rows, then each segment's
low-rank product accumulated into its own rows of the output and of the input gradient.
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


class SegmentLoRAFunction(torch.autograd.Function):
    """LoRALinearFunction over consecutive row segments of x [B, T, in], each with its own adapter.

    segments: ((rows, scaling), ...) in row order for the segments that have an adapter here, and
    (rows, None) for those that have none; lora: A, B of each segment with a scaling, in order. An
    adapter named in two segments is passed twice; autograd sums its two gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, segments, *lora):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        per_row = x2.shape[0] // shape[0]  # tokens per batch row
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        saved, spans, start, i = [], [], 0, 0
        for rows, scaling in segments:
            lo, hi = start * per_row, (start + rows) * per_row
            start += rows
            if scaling is None:
                continue
            a, b = lora[i], lora[i + 1]
            i += 2
            xa = x2[lo:hi] @ a.t()
            out[lo:hi].addmm_(xa, b.t(), alpha=scaling)  # contiguous rows: a view the GEMM writes into
            saved.append(xa)
            spans.append((lo, hi, scaling))
        ctx.save_for_backward(x2, weight, *lora, *saved)
        ctx.spans, ctx.shape = spans, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, *rest = ctx.saved_tensors
        n = len(ctx.spans)
        lora, saved = rest[:2 * n], rest[2 * n:]
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grads = []
        for k, (lo, hi, s) in enumerate(ctx.spans):
            a, b = lora[2 * k], lora[2 * k + 1]
            gb = g[lo:hi] @ b
            if grad_x is not None:
                grad_x[lo:hi].addmm_(gb, a, alpha=s)
            grads += [(gb.t() @ x2[lo:hi]).mul_(s), (g[lo:hi].t() @ saved[k]).mul_(s)]
        return (None if grad_x is None else grad_x.view(ctx.shape)), None, None, None, *grads


def plain_base(layer) -> bool:
    """Whether the fused functions can stand in for this peft LoRA layer's base: a frozen nn.Linear."""
    base = layer.base_layer
    return type(base) is nn.Linear and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def plain_adapter(layer, name: str, dtype: torch.dtype) -> bool:
    """Whether adapter `name` of the layer is plain LoRA (no dropout, no DoRA-like variant) in `dtype`."""
    return (name not in layer.lora_variant and isinstance(layer.lora_dropout[name], nn.Identity)
            and layer.lora_A[name].weight.dtype == dtype)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [name for name in self.active_adapters if name in self.lora_A]
    base = self.base_layer
    plain = (not args and not kwargs and not self.disable_adapters and not self.merged and len(active) == 1
             and plain_base(self) and x.dtype == base.weight.dtype and plain_adapter(self, active[0], x.dtype))
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

