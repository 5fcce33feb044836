"""An attention's q, k and v projections with plain LoRA adapters as one LoRA linear (`train.fused_qkv`).

The three projections read the same input. Through three `fused_lora.lora_linear` calls each reads it
for its own rank-r product and its own frozen GEMM, forward and backward, and with grouped-query
attention k and v are GEMMs with few outputs (256 at 1.5B), which run at a third of the q projection's
rate on an H100 (benchmarks/results/gemm_ceiling_h100_1.5b.json: 190-231 against 538-558 TFLOP/s).
Here the three are one `lora_linear`:

    [q | k | v] = x [W_q; W_k; W_v]^T + (x [A_q; A_k; A_v]^T) blockdiag(s_q B_q, s_k B_k, s_v B_v)^T

one frozen GEMM with all the outputs, one rank-(r_q + r_k + r_v) product, and in the backward one input
gradient GEMM and one A-gradient GEMM over x. The weights are concatenated per call (frozen, a few MB
per layer, and under FSDP2 they exist unsharded only inside the layer's forward), and again in the
backward rather than kept. B's gradients are the diagonal blocks of the
block-diagonal matrix's gradient; its off-diagonal blocks cost reads of tensors the GEMM reads anyway.

Routing: the attention module's forward computes the three outputs and hands them to its projections'
forwards for the duration of its own forward, which the model's code runs unchanged. A projection
takes the handed output only when it is called with the very tensor they were computed from, so a
model that calls them differently gets them computed as before.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import nn

from lora_rl.fused_lora import _LIB, _backward_impl, _forward_impl, _fused_forward


# Two operators beside `lora_linear`'s, opaque to torch.compile: they build the concatenated frozen
# weight, A and the block-diagonal B themselves (and in the backward the outputs' concatenated gradient).
# Traced as plain torch ops, the forward's and the backward's concatenations were one node to the compiled
# graph's partitioner, which then kept them from the forward to the backward as saved activations.
_LIB.define("lora_qkv(Tensor x, Tensor w_q, Tensor w_k, Tensor w_v, Tensor? bias, Tensor a_q, Tensor b_q, Tensor a_k,"
            " Tensor b_k, Tensor a_v, Tensor b_v, float s_q, float s_k, float s_v) -> (Tensor, Tensor)")
_LIB.define("lora_qkv_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor w_q, Tensor w_k,"
            " Tensor w_v, Tensor a_q, Tensor b_q, Tensor a_k, Tensor b_k, Tensor a_v, Tensor b_v, Tensor xa,"
            " float s_q, float s_k, float s_v, bool need_input) -> (Tensor, Tensor, Tensor)")


def _concatenated(w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v):
    """The one linear's frozen weight, A and B (block-diagonal, the scalings on it)."""
    return (torch.cat([w_q, w_k, w_v]), torch.cat([a_q, a_k, a_v]),
            torch.block_diag(b_q * s_q, b_k * s_k, b_v * s_v))


def _qkv_impl(x, w_q, w_k, w_v, bias, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v):
    weight, lora_a, lora_b = _concatenated(w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v)
    return _forward_impl(x, weight, bias, lora_a, lora_b, 1.0)


def _qkv_backward_impl(grad_q, grad_k, grad_v, x, w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, xa, s_q, s_k, s_v,
                       need_input):
    """The input's gradient, the concatenated A's and the block-diagonal B's (unscaled: the caller takes
    each B's block times its scaling)."""
    weight, lora_a, lora_b = _concatenated(w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v)
    return _backward_impl(torch.cat([grad_q, grad_k, grad_v], dim=1), x, weight, lora_a, lora_b, xa, 1.0, need_input)


# The Python bodies serve every device; on GPUs `fused_lora.load_native` registers C++ ones
# (csrc/lora_linear.cpp) that take precedence.
_LIB.impl("lora_qkv", _qkv_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_qkv_backward", _qkv_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lora_rl::lora_qkv", lib=_LIB)
def _(x, w_q, w_k, w_v, bias, a_q, b_q, a_k, b_k, a_v, b_v, s_q, s_k, s_v):
    rank = a_q.shape[0] + a_k.shape[0] + a_v.shape[0]
    return x.new_empty(x.shape[0], w_q.shape[0] + w_k.shape[0] + w_v.shape[0]), x.new_empty(x.shape[0], rank)


@torch.library.register_fake("lora_rl::lora_qkv_backward", lib=_LIB)
def _(grad_q, grad_k, grad_v, x, w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v, xa, s_q, s_k, s_v, need_input):
    rank, outs = a_q.shape[0] + a_k.shape[0] + a_v.shape[0], w_q.shape[0] + w_k.shape[0] + w_v.shape[0]
    return x.new_empty(x.shape if need_input else (0,)), a_q.new_empty(rank, x.shape[1]), b_q.new_empty(outs, rank)


class _LoRAQKVFunction(torch.autograd.Function):
    """q, k, v = split(lora_linear(x, [W_q; W_k; W_v], biases, [A_q; A_k; A_v], blockdiag(s B))). Saves the
    input and the rank-r products, as three LoRA linears do."""

    @staticmethod
    def forward(ctx, x, w_q, w_k, w_v, bias, a_q, b_q, a_k, b_k, a_v, b_v, s_q: float, s_k: float, s_v: float):
        params = (w_q, w_k, w_v, a_q, b_q, a_k, b_k, a_v, b_v)
        out, xa = torch.ops.lora_rl.lora_qkv.default(x, *params[:3], bias, *params[3:], s_q, s_k, s_v)
        ctx.save_for_backward(x, xa, *params)
        ctx.scalings = (s_q, s_k, s_v)
        ctx.ranks = (a_q.shape[0], a_k.shape[0], a_v.shape[0])
        ctx.outs = (w_q.shape[0], w_k.shape[0], w_v.shape[0])
        q, k, v = out.split(ctx.outs, dim=1)
        # A view keeps its whole buffer alive: the attention saves v (and k, where it skips rotary
        # embeddings) for its backward, which would keep all of q, k and v (2,048 columns instead of 256 at
        # 1.5B: +0.8 GiB at 8 x 1024 tokens, measured on an H100). k and v are narrow under grouped-query
        # attention, so copying them costs little; q stays a view because rotary embeddings replace it
        # before anything saves it (test_fused_qkv_keeps_no_more_for_the_backward checks the storages).
        return q, k.clone(), v.clone()

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        x, xa, *params = ctx.saved_tensors
        grads = [g if g is not None else x.new_zeros(x.shape[0], n)
                 for g, n in zip((grad_q, grad_k, grad_v), ctx.outs)]
        need_input = ctx.needs_input_grad[0]
        grad_x, grad_a, grad_b = torch.ops.lora_rl.lora_qkv_backward.default(*grads, x, *params, xa, *ctx.scalings,
                                                                              need_input)
        grad_as = grad_a.split(ctx.ranks)
        grad_bs, row, col = [], 0, 0
        for n, r, s in zip(ctx.outs, ctx.ranks, ctx.scalings):
            grad_bs.append(grad_b[row:row + n, col:col + r] * s)  # d(s B) / dB = s, on B's own block
            row, col = row + n, col + r
        return ((grad_x if need_input else None), None, None, None, None, grad_as[0], grad_bs[0], grad_as[1],
                grad_bs[1], grad_as[2], grad_bs[2], None, None, None)


class _Handed:
    """What an attention's forward hands its projections: the input and the three outputs, or None."""

    def __init__(self):
        self.x = None
        self.outputs = None


def _projection_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    handed, index = self._lora_rl_qkv
    if handed.outputs is not None and handed.x is x and not args and not kwargs:
        return handed.outputs[index]
    return _fused_forward(self, x, *args, **kwargs)


def _qkv_attention_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    from lora_rl.fused_mlp import _active

    projections = (self.q_proj, self.k_proj, self.v_proj)
    names = [_active(p, hidden_states.dtype) for p in projections]
    # the reference pass, merged sampling (plain linears stand in for the projections), ...
    if None in names or len({p.base_layer.bias is None for p in projections}) > 1:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    biases = [p.base_layer.bias for p in projections]
    operands = [p.base_layer.weight for p in projections]
    operands.append(None if biases[0] is None else torch.cat(biases))
    for p, name in zip(projections, names):
        operands += [p.lora_A[name].weight, p.lora_B[name].weight]
    scalings = [float(p.scaling[name]) for p, name in zip(projections, names)]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    outputs = _LoRAQKVFunction.apply(x, *operands, *scalings)
    handed = self._lora_rl_qkv_handed
    handed.x = hidden_states
    handed.outputs = [o.view(*hidden_states.shape[:-1], o.shape[-1]) for o in outputs]
    result = type(self).forward(self, hidden_states, *args, **kwargs)
    handed.x = handed.outputs = None
    return result


@functools.cache
def _projects_hidden_states(cls: type) -> bool:
    """Whether the class's forward takes `hidden_states` first and passes it to q_proj, k_proj and v_proj
    in that order (Llama-family attention: Qwen2, Llama, Mistral, ...)."""
    try:
        source = inspect.getsource(cls.forward)
        first = list(inspect.signature(cls.forward).parameters)[1]
    except (OSError, TypeError, ValueError, IndexError):
        return False
    calls = [source.find(f"self.{p}(hidden_states)") for p in ("q_proj", "k_proj", "v_proj")]
    return first == "hidden_states" and -1 not in calls and calls == sorted(calls)


def fuse_qkv(model: nn.Module) -> int:
    """Route each attention of `model` whose q, k and v projections are peft LoRA linears, called on the
    attention's input, through `_LoRAQKVFunction`; returns how many. The projections keep their own fused
    forward for every call this one leaves alone."""
    from peft.tuners.lora.layer import Linear

    attentions = [m for m in model.modules()
                  if all(isinstance(getattr(m, n, None), Linear) for n in ("q_proj", "k_proj", "v_proj"))
                  and _projects_hidden_states(type(m))]
    for attention in attentions:
        handed = _Handed()
        attention._lora_rl_qkv_handed = handed
        attention.forward = types.MethodType(_qkv_attention_forward, attention)
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            projection = getattr(attention, name)
            projection._lora_rl_qkv = (handed, index)
            projection.forward = types.MethodType(_projection_forward, projection)
    return len(attentions)
