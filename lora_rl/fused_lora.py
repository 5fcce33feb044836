"""Each LoRA linear layer as one fused op with a hand-written backward (`train.fused_lora`).

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`. Besides the two small GEMMs that is a
full-size multiply and a full-size add in the forward, and their mirrors in the backward (the output
gradient times the scaling, the sum of two input gradients): four memory-bound passes over
[tokens, features] tensors per linear layer, as costly as the low-rank GEMMs themselves, and several
Python-level module calls. Here the scaling rides on the rank-r product and the GEMMs accumulate: the
low-rank term is computed first and the frozen base GEMM adds onto it (beta=1, read in its epilogue),
forward for the output and backward for the input gradient, so each layer is three GEMM launches
forward and five backward and no separate pass touches a full-size tensor. The two halves are custom
ops, opaque to torch.compile (`lora_linear`), with C++ bodies on GPUs (`load_native`) so that compiled layers
call them without entering Python. The frozen base weight gets no gradient, as in peft,
and the saved tensors are the ones peft's path saves (the input and the rank-r product).

Only the plain case is routed here - one active adapter, no dropout, not merged, a frozen nn.Linear
base, same dtypes, no extra arguments; anything else (disabled adapters for the reference policy,
merged weights while sampling) takes peft's own forward unchanged.

`SegmentLoRAFunction` is the same for a batch whose consecutive row segments go through different
adapters (multi-LoRA jobs, `lora.adapter_rows`): one base GEMM over all rows, then each segment's
low-rank product accumulated into its own rows of the output and of the input gradient.
"""

from __future__ import annotations

import functools
import types
import warnings
from pathlib import Path

import torch
from torch import nn


# One LoRA linear as a pair of operators (forward, backward) that torch.compile treats as opaque calls:
# traced, the in-place accumulations below became an out-of-place addmm plus a device-to-device copy of
# the full-size output (14 copies per decoder layer). Their autograd is `_LoRALinearFunction`, which
# compile traces into the graph around them, rather than a registration on the operator: that ran a
# Python autograd wrapper on every call of the compiled forward, even with C++ bodies below it.
_LIB = torch.library.Library("lora_rl", "DEF")
_LIB.define("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling)"
            " -> (Tensor, Tensor)")
_LIB.define("lora_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor xa,"
            " float scaling, bool need_input) -> (Tensor, Tensor, Tensor)")


def _forward_impl(x, weight, bias, lora_a, lora_b, scaling):
    xa = x @ lora_a.t()  # [N, r]
    # The scaling rides on the GEMMs' alpha; beta=0 ignores the (uninitialised) first argument.
    out = torch.addmm(bias if bias is not None else x.new_empty(()), xa, lora_b.t(), beta=1 if bias is not None else 0,
                      alpha=scaling)
    # The big GEMM last, accumulating onto the low-rank term (beta=1): its epilogue reads that term while
    # it is compute-bound, instead of a separate memory-bound pass over the full-size output.
    out.addmm_(x, weight.t())
    return out, xa


def _backward_impl(grad, x, weight, lora_a, lora_b, xa, scaling, need_input):
    none = x.new_empty(())
    gb = grad @ lora_b  # [N, r]
    grad_a = torch.addmm(none, gb.t(), x, beta=0, alpha=scaling)  # [r, in]
    grad_b = torch.addmm(none, grad.t(), xa, beta=0, alpha=scaling)  # [out, r]
    if not need_input:
        return x.new_empty(0), grad_a, grad_b
    grad_x = torch.addmm(none, gb, lora_a, beta=0, alpha=scaling)  # the low-rank term first, then the frozen
    grad_x.addmm_(grad, weight)  # base's input gradient accumulated onto it
    return grad_x, grad_a, grad_b


# The Python bodies serve every device; on GPUs `load_native` registers C++ ones that take precedence.
_LIB.impl("lora_linear", _forward_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_backward", _backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lora_rl::lora_linear", lib=_LIB)
def _(x, weight, bias, lora_a, lora_b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.register_fake("lora_rl::lora_linear_backward", lib=_LIB)
def _(grad, x, weight, lora_a, lora_b, xa, scaling, need_input):
    return (x.new_empty(x.shape if need_input else (0,)), lora_a.new_empty(lora_a.shape),
            lora_b.new_empty(lora_b.shape))


@functools.cache
def load_native(dispatch_key: str = "CUDA") -> bool:
    """Build (once; torch caches the build in the user's cache folder) and load the C++ bodies of the
    two operators for `dispatch_key` (csrc/lora_linear.cpp), so that neither a compiled layer nor an
    eager one enters Python for them. False, with a warning, if the build fails: the Python bodies then
    serve, with the same results, only slower on the host."""
    from torch.utils import cpp_extension

    from lora_rl import fused_mlp, fused_qkv  # noqa: F401  (define the operators the C++ file registers bodies for)

    source = Path(__file__).parent / "csrc" / "lora_linear.cpp"
    try:
        cpp_extension.load(name=f"lora_rl_native_{dispatch_key.lower()}", sources=[str(source)],
                           extra_cflags=["-O2", f"-DLORA_RL_DISPATCH_KEY={dispatch_key}"], is_python_module=False)
    except Exception as error:  # a missing compiler or headers must not stop training
        warnings.warn(f"lora-rl: the C++ LoRA operators did not build, so the Python ones run (same results, "
                      f"more host time per step): {error}", stacklevel=2)
        return False
    return True


class _LoRALinearFunction(torch.autograd.Function):
    """The autograd of the two operators, eager and compiled alike. The frozen base weight and bias get
    no gradient, as in peft; the saved tensors are the ones peft's path saves (input, rank-r product)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        out, xa = torch.ops.lora_rl.lora_linear.default(x, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_input = ctx.needs_input_grad[0]
        grad_x, grad_a, grad_b = torch.ops.lora_rl.lora_linear_backward.default(
            grad, x, weight, lora_a, lora_b, xa, ctx.scaling, need_input)
        return (grad_x if need_input else None), None, None, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """base(x) + scaling * (x A^T) B^T for a frozen base: three GEMMs forward, five backward, no
    separate scale or add pass over a full-size tensor. Saves the input and the rank-r product, as peft."""
    x2 = x.reshape(-1, x.shape[-1])
    out = _LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scaling))
    return out.view(*x.shape[:-1], out.shape[-1])


class SegmentLoRAFunction(torch.autograd.Function):
    """`lora_linear` over consecutive row segments of x [B, T, in], each with its own adapter.

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
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name])


def fuse_lora(model: nn.Module, mlp: bool = True, qkv: bool = True) -> int:
    """Route `model`'s peft LoRA linear layers through `lora_linear`, with `mlp` (`train.fused_mlp`)
    each SiLU-gated MLP whose three linears they are through `fused_mlp`, and with `qkv`
    (`train.fused_qkv`) each attention's q, k and v projections through one `lora_linear`
    (`fused_qkv`); returns how many linears."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    if mlp:
        from lora_rl.fused_mlp import fuse_mlp

        fuse_mlp(model)
    if qkv:
        from lora_rl.fused_qkv import fuse_qkv

        fuse_qkv(model)
    return len(layers)

