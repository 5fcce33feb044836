"""The fast training path against plain PEFT on the CPU: adapters in the model dtype and the sliced
log-prob head must give the same log-probs and gradients as peft's defaults with full logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import lora_rl.batching
from lora_rl.batching import make_batch, token_logprobs
from lora_rl.config import LoRAConfig
from lora_rl.lora import inject_lora


def _models(model_dir):
    torch.manual_seed(0)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ours = inject_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoRAConfig(lora_rank=8, lora_alpha=16))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same non-zero adapter in both
        for (name, p), (_, q) in zip(plain.named_parameters(), ours.named_parameters(), strict=True):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
                q.copy_(p)
    return plain, ours


def test_adapters_off_is_the_base_model_and_leaves_training_state_alone(random_model_dir):
    """The reference pass's context: peft's base-model output exactly, every adapter tensor still
    trainable inside and after it (peft's own context toggles requires_grad), and the layers' switches
    restored after an error too."""
    from lora_rl.lora import adapters_off

    _, model = _models(random_model_dir)
    ids = torch.tensor([[5, 6, 7, 9, 11]])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with adapters_off(model):
            assert torch.equal(model(input_ids=ids).logits, reference)
            assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
        assert torch.equal(model(input_ids=ids).logits, adapted)
        with pytest.raises(RuntimeError), adapters_off(model):
            raise RuntimeError("a failing reference pass")
        assert torch.equal(model(input_ids=ids).logits, adapted)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable and len(trainable) > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sliced_head_matches_plain_peft(random_model_dir, temperature, monkeypatch):
    plain, ours = _models(random_model_dir)
    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 7 * plain.config.vocab_size)  # 7-token slices
    batch = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], 0)
    out = {}
    for name, model, chunked in (("plain", plain, False), ("ours", ours, True)):
        logp, entropy = token_logprobs(model, batch, temperature, with_entropy=True, chunked=chunked)
        (logp * batch.completion_mask).sum().backward()
        grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (logp.detach(), entropy, grads)
    # Stated tolerance: float32 on the CPU; the sliced head computes log p as z - logsumexp(z) and the
    # entropy as logsumexp(z) - sum(p z), which changes only rounding.
    torch.testing.assert_close(out["ours"][0], out["plain"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["ours"][1], out["plain"][1], atol=1e-6, rtol=1e-6)
    assert sorted(out["ours"][2]) == sorted(out["plain"][2]) and len(out["ours"][2]) > 0
    for name, grad in out["plain"][2].items():
        torch.testing.assert_close(out["ours"][2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_small_logits_skip_the_slices(random_model_dir, monkeypatch):
    """Below one slice the plain path runs (no recompute cost); above it, the sliced head."""
    _, ours = _models(random_model_dir)
    calls = []
    monkeypatch.setattr(lora_rl.batching, "_chunked_token_logprobs", lambda *a: calls.append(1) or (None, None))
    batch = make_batch([[5, 6, 7]], [[8, 9]], 0)
    token_logprobs(ours, batch)
    assert calls == []
    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 2)
    token_logprobs(ours, batch)
    assert calls == [1]


def test_generation_with_the_adapter_merged_leaves_the_base_exact(random_model_dir):
    """Merged sampling gives the same tokens and log-probs, and the frozen base comes back bit for bit."""
    from lora_rl.lora import merged_for_generation
    from lora_rl.rollout.base import SamplingParams
    from lora_rl.rollout.embedded import sample

    _, ours = _models(random_model_dir)
    ours = ours.to(torch.bfloat16)  # where an unmerge by subtraction would leave rounding in the base
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    params = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=3)
    plain = sample(ours, [[5, 6, 7]], params, eos_id=2, pad_id=0)
    with merged_for_generation(ours):
        merged = sample(ours, [[5, 6, 7]], params, eos_id=2, pad_id=0)
    for a, b in zip(plain, merged, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)
    for name, p in ours.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name


@pytest.mark.parametrize("dora", [False, True])
def test_merging_for_generation_folds_in_the_adapter_and_undoes_it(random_model_dir, dora, monkeypatch):
    """Merged, the model computes what the unmerged adapter computes; plain layers fold in with one GEMM
    each and never enter peft's merge, others (DoRA here) go through it; afterwards the base weights are
    back bit for bit and peft's layers report themselves unmerged."""
    from peft.tuners.lora import Linear

    from lora_rl.lora import merged_for_generation

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(random_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    merges = []
    merge = Linear.merge
    monkeypatch.setattr(Linear, "merge", lambda self, *a, **k: merges.append(1) or merge(self, *a, **k))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with merged_for_generation(model):
            merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(merges) == (len(layers) if dora else 0)
    assert not any(m.merged for m in layers)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_lora_matches_peft_forward_and_gradients(random_model_dir, dtype, tolerance):
    """train.fused_lora (one fused op per LoRA linear) against peft's own forward: log-probs, input and
    adapter gradients. Stated tolerance: 1e-6 in float32 on the CPU (only the order of the additions
    changes); 2e-2 relative in bf16, where the two paths round to bf16 at different points (peft the
    scaled low-rank product and the sum, the fused path the low-rank term before the base GEMM
    accumulates onto it)."""
    from lora_rl.fused_lora import fuse_lora

    _, peft_model = _models(random_model_dir)
    _, fused = _models(random_model_dir)
    peft_model, fused = peft_model.to(dtype), fused.to(dtype)
    assert fuse_lora(fused) == 7 * fused.config.num_hidden_layers
    batch = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], 0)
    out = {}
    for name, model in (("peft", peft_model), ("fused", fused)):
        logp, _ = token_logprobs(model, batch, 1.0, chunked=False)
        (logp * batch.completion_mask).sum().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (logp.detach(), grads)
    torch.testing.assert_close(out["fused"][0], out["peft"][0], atol=tolerance * 10, rtol=tolerance)
    assert sorted(out["fused"][1]) == sorted(out["peft"][1]) and all("lora_" in n for n in out["peft"][1])
    for name, grad in out["peft"][1].items():
        error = (out["fused"][1][name] - grad).norm() / grad.norm()
        assert error < tolerance, (name, float(error))


def test_fused_lora_leaves_the_reference_and_merged_paths_to_peft(random_model_dir):
    """Disabled adapters (the reference policy) and merged weights (sampling) take peft's forward, so
    they give the base model's and the merged model's outputs exactly as before."""
    from lora_rl import fused_lora, fused_mlp, fused_qkv
    from lora_rl.lora import adapters_off, merged_for_generation

    _, model = _models(random_model_dir)
    ids = torch.tensor([[5, 6, 7, 9, 11]])
    with torch.no_grad():
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        fused_lora.fuse_lora(model)
        calls = []
        originals = fused_lora.lora_linear, fused_mlp._LoRAMLPFunction.apply, fused_qkv._LoRAQKVFunction.apply
        fused_lora.lora_linear = lambda *a: calls.append("linear") or originals[0](*a)
        fused_mlp._LoRAMLPFunction.apply = lambda *a: calls.append("mlp") or originals[1](*a)
        fused_qkv._LoRAQKVFunction.apply = lambda *a: calls.append("qkv") or originals[2](*a)
        try:
            with adapters_off(model):  # what the engines' reference() uses
                assert torch.equal(model(input_ids=ids).logits, reference) and not calls
            with merged_for_generation(model):
                torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
            assert not calls
            torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-6, rtol=0)
            layers = model.config.num_hidden_layers  # q, k, v as one op, o, and one MLP op per layer
            assert sorted(calls) == ["linear"] * layers + ["mlp"] * layers + ["qkv"] * layers
        finally:
            fused_lora.lora_linear, fused_mlp._LoRAMLPFunction.apply, fused_qkv._LoRAQKVFunction.apply = originals


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("in_forward", [False, True])
def test_sliced_head_backward_is_the_exact_gradient(temperature, in_forward, monkeypatch):
    """The sliced head's hand-written backward against numerical derivatives (float64), over several
    slices: hidden states, a trainable head weight (full fine-tuning) and a bias; and for a frozen head
    (LoRA), the hidden states' gradient formed in the forward."""
    from lora_rl.batching import _SlicedHead

    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 3 * 11)  # 3-row slices of an 11-word vocabulary
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=not in_forward)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=not in_forward)
    targets = torch.randint(0, 11, (7,), generator=g)
    inputs = (hidden,) if in_forward else (hidden, weight, bias)

    def head(h, w=weight, b=bias):
        return _SlicedHead.apply(h, w, b, targets, temperature, False, False, in_forward)[0]

    assert torch.autograd.gradcheck(head, inputs)
    logp, entropy = _SlicedHead.apply(hidden, weight, bias, targets, temperature, True, False, in_forward)
    reference = torch.log_softmax((hidden @ weight.t() + bias) / temperature, -1)
    torch.testing.assert_close(logp, reference.gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the mixed-dtype GEMM runs on GPUs")])])
def test_head_weight_gradient_accumulates_unrounded_products(device):
    """A trainable head's weight gradient sums its slices' bf16 x bf16 products into float32 without
    rounding any product to bf16 (the old `acc += a @ b` was ~1e-3 off here), and leaves no copy of
    the accumulator behind: the sum is written into the accumulator itself."""
    from lora_rl.batching import _add_product

    g = torch.Generator().manual_seed(0)
    acc = torch.randn(64, 48, generator=g).to(device)
    start, pointer = acc.clone(), acc.data_ptr()
    pairs = [(torch.randn(64, 40, generator=g).to(device, torch.bfloat16),
              torch.randn(40, 48, generator=g).to(device, torch.bfloat16)) for _ in range(3)]
    for a, b in pairs:
        _add_product(acc, a, b)
    exact = start.double() + sum(a.double() @ b.double() for a, b in pairs)
    assert acc.data_ptr() == pointer and acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), exact, atol=1e-4, rtol=1e-5)


def test_frozen_head_skips_the_logits_recompute(random_model_dir, monkeypatch):
    """A LoRA model's frozen head forms the hidden states' gradient in its forward: the backward runs
    no head GEMM (counted), and the gradients equal those of the recomputing path."""
    import torch.nn.functional as F

    _, model = _models(random_model_dir)
    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # 7-token slices
    batch = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], 0)
    calls, linear, head = [], F.linear, model.get_output_embeddings().weight
    monkeypatch.setattr(F, "linear", lambda x, w, *a: (w is head and calls.append(1)) or linear(x, w, *a))
    out = {}
    for in_forward in (False, True):
        monkeypatch.setattr(lora_rl.batching, "FROZEN_HEAD_GRAD_IN_FORWARD", in_forward)
        model.zero_grad()
        calls.clear()
        logp, _ = token_logprobs(model, batch, 0.7)
        forward_calls = len(calls)
        (logp * batch.completion_mask).sum().backward()
        out[in_forward] = (logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                           forward_calls, len(calls) - forward_calls)
    assert out[True][2] == out[False][2] == 2  # 2 x 7 rows in slices of 7
    assert out[False][3] == 2 and out[True][3] == 0  # head GEMMs in the backward
    torch.testing.assert_close(out[True][0], out[False][0], atol=0, rtol=0)
    assert sorted(out[True][1]) == sorted(out[False][1]) and len(out[True][1]) > 0
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("bias, input_grad", [(True, True), (False, True), (True, False)])
def test_lora_linear_backward_is_the_exact_gradient(bias, input_grad):
    """The fused LoRA linear's hand-written backward against numerical derivatives (float64), with and
    without a bias and an input gradient (the first layer's input needs none under LoRA), and its
    output against the plain formula."""
    from lora_rl.fused_lora import lora_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=input_grad)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g) if bias else None
    lora_a = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    lora_b = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(t[0] if input_grad else x, weight, b, *t[-2:], 1.5),
                                    (x, lora_a, lora_b) if input_grad else (lora_a, lora_b))
    plain = x @ weight.t() + (b if bias else 0) + 1.5 * (x @ lora_a.t()) @ lora_b.t()
    torch.testing.assert_close(lora_linear(x, weight, b, lora_a, lora_b, 1.5), plain)
    # The two operators torch.compile sees as opaque calls: schemas and fake (shape) functions. Their
    # autograd is the Function above, which compile traces around them.
    x2, a, bb = x.detach().reshape(6, 5), lora_a.detach(), lora_b.detach()
    torch.library.opcheck(torch.ops.lora_rl.lora_linear, (x2, weight, b, a, bb, 1.5))
    xa = x2 @ a.t()
    torch.library.opcheck(torch.ops.lora_rl.lora_linear_backward,
                          (torch.randn(6, 4, dtype=torch.float64, generator=g), x2, weight, a, bb, xa, 1.5, input_grad))


_NATIVE_CHECK = """
import torch
from lora_rl import fused_lora as f
import lora_rl.fused_mlp

has = lambda: torch._C._dispatch_has_kernel_for_dispatch_key("lora_rl::lora_linear", "CPU")
assert not has(), "a CPU kernel was registered before the build"
g = torch.Generator().manual_seed(0)
cases = []
for dtype in (torch.float32, torch.bfloat16):
    for bias in (True, False):
        x, w = torch.randn(6, 5, generator=g).to(dtype), torch.randn(4, 5, generator=g).to(dtype)
        b = torch.randn(4, generator=g).to(dtype) if bias else None
        a, lb, grad = (torch.randn(2, 5, generator=g).to(dtype), torch.randn(4, 2, generator=g).to(dtype),
                       torch.randn(6, 4, generator=g).to(dtype))
        cases.append((x, w, b, a, lb, grad))
python = [(f._forward_impl(x, w, b, a, lb, 1.5), [f._backward_impl(grad, x, w, a, lb, x @ a.t(), 1.5, need)
                                                  for need in (True, False)]) for x, w, b, a, lb, grad in cases]
assert f.load_native("CPU") and has()
for (x, w, b, a, lb, grad), (forward, backward) in zip(cases, python):
    native = torch.ops.lora_rl.lora_linear.default(x, w, b, a, lb, 1.5)
    assert all(torch.equal(n, p) for n, p in zip(native, forward)), "forward differs"
    for need, expected in zip((True, False), backward):
        out = torch.ops.lora_rl.lora_linear_backward.default(grad, x, w, a, lb, x @ a.t(), 1.5, need)
        assert all(n.shape == p.shape and torch.equal(n, p) for n, p in zip(out, expected)), "backward differs"
mlp_cases = []
for dtype in (torch.float32, torch.bfloat16):
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    mlp_cases.append((dtype, r(6, 4), r(4, 9), r(2, 9), r(4, 2), r(6, 2), r(6, 9), r(6, 9), r(6, 4), r(9, 4), r(2, 4),
                      r(9, 2), r(9, 4), r(2, 4), r(9, 2)))
assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_rl::{op}", "CPU")
           for op in ("lora_mlp_down_forward", "lora_mlp_down_backward", "lora_mlp_gate_up_backward"))
python_mlp = []
for _, grad, wd, ad, bd, xad, gg, gu, x, wg, ag, bg, wu, au, bu in mlp_cases:
    python_mlp.append((lora_rl.fused_mlp._down_backward_impl(grad, wd, bd, xad, 2.0),
                       [lora_rl.fused_mlp._gate_up_backward_impl(gg, gu, x, wg, ag, bg, wu, au, bu, 1.5, 0.5, need)
                        for need in (True, False)]))
for (_, grad, wd, ad, bd, xad, gg, gu, x, wg, ag, bg, wu, au, bu), (down, gate_up) in zip(mlp_cases, python_mlp):
    native = torch.ops.lora_rl.lora_mlp_down_backward.default(grad, wd, bd, xad, 2.0)
    assert all(torch.equal(n, p) for n, p in zip(native, down)), "down backward differs"
    for bias in (None, grad[0]):
        native = torch.ops.lora_rl.lora_mlp_down_forward.default(gg, wd, bias, xad, bd, 2.0)
        assert torch.equal(native, lora_rl.fused_mlp._down_forward_impl(gg, wd, bias, xad, bd, 2.0)), \
            "down forward differs"
    for need, expected in zip((True, False), gate_up):
        out = torch.ops.lora_rl.lora_mlp_gate_up_backward.default(gg, gu, x, wg, ag, bg, wu, au, bu, 1.5, 0.5, need)
        assert all(n.shape == p.shape and torch.equal(n, p) for n, p in zip(out, expected)), "gate/up differs"
from lora_rl import fused_qkv
for dtype in (torch.float32, torch.bfloat16):
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    x, ws, grads = r(6, 5), (r(4, 5), r(2, 5), r(2, 5)), (r(6, 4), r(6, 2), r(6, 2))
    lora, scalings = (r(2, 5), r(4, 2), r(1, 5), r(2, 1), r(3, 5), r(2, 3)), (1.5, 0.5, 2.0)
    for bias in (None, r(8)):
        native = torch.ops.lora_rl.lora_qkv.default(x, *ws, bias, *lora, *scalings)
        expected = fused_qkv._qkv_impl(x, *ws, bias, *lora, *scalings)
        assert all(torch.equal(n, p) for n, p in zip(native, expected)), "qkv differs"
    for need in (True, False):
        xa = r(6, 6)
        out = torch.ops.lora_rl.lora_qkv_backward.default(*grads, x, *ws, *lora, xa, *scalings, need)
        expected = fused_qkv._qkv_backward_impl(*grads, x, *ws, *lora, xa, *scalings, need)
        assert all(n.shape == p.shape and torch.equal(n, p) for n, p in zip(out, expected)), "qkv backward differs"
print("native ok")
"""


def test_native_operators_equal_the_python_ones(tmp_path):
    """The C++ bodies compiled layers call on GPUs (csrc/lora_linear.cpp), built here for the CPU in a
    separate process (the registration is process-wide): same GEMMs, so bit-identical results to the
    Python bodies, forward and backward, with and without a bias and an input gradient."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run([sys.executable, "-c", _NATIVE_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "native ok" in done.stdout, done.stderr[-3000:]


def test_compiled_paths_equal_the_eager_ones(random_model_dir, monkeypatch):
    """What backend.compile runs on GPUs, compiled here on the CPU: the fused LoRA op inside a compiled
    decoder layer (its fake shapes, its autograd under AOT) and the sliced head's compiled slice kernels
    give the eager log-probs, entropies and adapter gradients (float32; only rounding may differ)."""
    from lora_rl.backends.fsdp2 import compile_layers
    from lora_rl.fused_lora import fuse_lora

    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 7 * 320)  # 7-row slices of the 320-word vocabulary
    batch = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], 0)
    out = []
    for compiled in (False, True):
        _, model = _models(random_model_dir)
        fuse_lora(model)
        if compiled:
            compile_layers(model, graphs=2)
        logp, entropy = token_logprobs(model, batch, 0.7, with_entropy=True, compiled=compiled)
        (logp * batch.completion_mask).sum().backward()
        out.append((logp.detach(), entropy, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_logp, eager_entropy, eager_grads), (logp, entropy, grads) = out
    torch.testing.assert_close(logp, eager_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, eager_entropy, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(eager_grads) and len(grads) == 14 * model.config.num_hidden_layers
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


_BUDGET_RUN = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from lora_rl.backends.fsdp2 import compile_layers
from lora_rl.batching import make_batch, token_logprobs
from lora_rl.config import LoRAConfig
from lora_rl.fused_lora import fuse_lora
from lora_rl.lora import inject_lora

model_dir, budget, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = inject_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoRAConfig(lora_rank=4))
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.05)
fuse_lora(model)
compile_layers(model, graphs=2, memory_budget=budget)
model.train()
params = {q.untyped_storage().data_ptr() for q in model.parameters()}
saved = {}
def pack(t):  # by storage: a saved view keeps its whole buffer
    storage = t.untyped_storage()
    if storage.data_ptr() not in params:
        saved[storage.data_ptr()] = storage.nbytes()
    return t
batch = make_batch([[5, 6, 7, 8, 9, 10, 11, 12]] * 4, [[13, 14, 15, 16, 17, 18, 19, 20]] * 4, 0)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    logp, _ = token_logprobs(model, batch, 1.0, chunked=False, compiled=True)
(logp * batch.completion_mask).sum().backward()
torch.save({"saved_bytes": sum(saved.values()), "logp": logp.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}, out)
"""


def test_compile_memory_budget_saves_less_and_computes_the_same(random_model_dir, tmp_path):
    """backend.compile_memory_budget below 1: the compiled layers keep fewer activations for the
    backward (recomputing cheap ones) and give the same log-probs and gradients. Each budget compiles in
    its own process: in one process, layers of the same structure share one compiled graph."""
    results = {}
    for budget in ("1.0", "0.9"):
        out = tmp_path / f"{budget}.pt"
        run = subprocess.run([sys.executable, "-c", _BUDGET_RUN, str(random_model_dir), budget, str(out)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        results[budget] = torch.load(out, weights_only=True)
    keep, recompute = results["1.0"], results["0.9"]
    assert recompute["saved_bytes"] < 0.9 * keep["saved_bytes"], (recompute["saved_bytes"], keep["saved_bytes"])
    torch.testing.assert_close(recompute["logp"], keep["logp"], atol=1e-5, rtol=1e-5)
    assert sorted(recompute["grads"]) == sorted(keep["grads"]) and keep["grads"]
    for name, grad in keep["grads"].items():
        torch.testing.assert_close(recompute["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grpo_step_benchmark_runs_both_modes_on_a_tiny_shape(tmp_path):
    """benchmarks/grpo_step.py end to end on the CPU: whole steps, one process per variant or every variant
    in one process in turn; every timing is a real positive number and LoRA rows carry their ratio."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    common = ["--shape", "tiny", "--prompts", "2", "--samples", "2", "--new-tokens", "3", "--prompt-tokens", "4",
              "--variants", "full fine-tuning", "LoRA, merged sampling"]
    for mode in (["--steps", "1", "--warmup", "0", "--micro", "2", "--rounds", "1"], ["--alternate", "2"]):
        out = tmp_path / f"{len(mode)}.json"
        run = subprocess.run([sys.executable, str(root / "benchmarks" / "grpo_step.py"), *common, *mode, "--out", str(out)],
                             capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        assert [r["variant"] for r in rows] == ["full fine-tuning", "LoRA, merged sampling"]
        assert all(r["rollout_s"] > 0 and r["update_s"] > 0 and r["step_vs_full"] > 0 for r in rows)
        assert len(rows[1]["rollouts_s"]) == len(rows[1]["updates_s"]) == (2 if "--alternate" in mode else 1)


@pytest.mark.parametrize("bias, input_grad", [(False, True), (True, True), (False, False)])
def test_fused_mlp_backward_is_the_exact_gradient(bias, input_grad):
    """The fused LoRA MLP (train.fused_mlp) against numerical derivatives (float64): its three GEMM
    operators and the activation's reference body together give every adapter's and the input's
    gradient of down(silu(gate(x)) * up(x)); its output is the plain formula's."""
    from lora_rl.fused_mlp import _LoRAMLPFunction

    g = torch.Generator().manual_seed(0)
    h, i, r = 5, 7, 3

    def rand(*shape, grad=False):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=grad)

    x = rand(6, h, grad=input_grad)
    w = [rand(i, h), rand(i, h), rand(h, i)]
    b = [rand(i) if bias else None, rand(i) if bias else None, rand(h) if bias else None]
    lora = [(rand(r, h, grad=True), rand(i, r, grad=True)), (rand(r, h, grad=True), rand(i, r, grad=True)),
            (rand(r, i, grad=True), rand(h, r, grad=True))]
    s = (1.5, 0.5, 2.0)

    def fused(x, *ab):
        args = [t for k in range(3) for t in (w[k], b[k], ab[2 * k], ab[2 * k + 1])]
        return _LoRAMLPFunction.apply(x, *args, *s)

    def plain(x, *ab):
        lin = [x @ w[k].t() + (b[k] if bias else 0) + s[k] * (x @ ab[2 * k].t()) @ ab[2 * k + 1].t() for k in range(2)]
        hid = torch.nn.functional.silu(lin[0]) * lin[1]
        return hid @ w[2].t() + (b[2] if bias else 0) + s[2] * (hid @ ab[4].t()) @ ab[5].t()

    flat = [t for pair in lora for t in pair]
    assert torch.autograd.gradcheck(lambda *t: fused(x, *t) if not input_grad else fused(*t),
                                    tuple(([x] if input_grad else []) + flat))
    torch.testing.assert_close(fused(x, *flat), plain(x, *flat))
    ops = torch.ops.lora_rl
    grad, xd = rand(6, h), rand(6, r)
    torch.library.opcheck(ops.lora_mlp_down_backward, (grad, w[2], lora[2][1].detach(), xd, 2.0))
    torch.library.opcheck(ops.lora_mlp_gate_up_backward, (rand(6, i), rand(6, i), x.detach(), w[0], lora[0][0].detach(),
                          lora[0][1].detach(), w[1], lora[1][0].detach(), lora[1][1].detach(), 1.5, 0.5, input_grad))
    xa = rand(6, 2 * r)  # gate's and up's rank-r products as training passes them: column slices of one GEMM
    b_g, b_u, a_d = (t.detach() for t in (lora[0][1], lora[1][1], lora[2][0]))
    torch.library.opcheck(ops.silu_mul_lora_forward, (rand(6, i), rand(6, i), xa[:, :r], xa[:, r:], b_g, b_u, a_d,
                                                      1.5, 0.5))
    torch.library.opcheck(ops.silu_mul_lora_backward, (rand(6, i), rand(6, i), rand(6, i), rand(6, r), xa[:, :r],
                                                       xa[:, r:], b_g, b_u, a_d, 1.5, 0.5, 2.0))
    torch.library.opcheck(ops.lora_mlp_down_forward, (rand(6, i), w[2], b[2], xd, lora[2][1].detach(), 2.0))


def test_fused_mlp_runs_only_where_it_is_the_same_function(random_model_dir):
    """fuse_lora routes each SiLU-gated MLP with three plain adapters through the fused op, and with
    mlp=False none; an MLP where one linear carries no adapter stays on the per-linear path."""
    from lora_rl import fused_mlp
    from lora_rl.fused_lora import fuse_lora

    _, model = _models(random_model_dir)
    layers = model.config.num_hidden_layers
    assert fused_mlp.fuse_mlp(model) == layers
    _, model = _models(random_model_dir)
    fuse_lora(model, mlp=False)
    mlps = [m for m in model.modules() if hasattr(m, "gate_proj")]
    assert all("forward" not in vars(m) for m in mlps)
    partial = inject_lora(AutoModelForCausalLM.from_pretrained(random_model_dir),
                          LoRAConfig(lora_rank=8, target_modules=("q_proj", "gate_proj", "up_proj")))
    assert fused_mlp.fuse_mlp(partial) == 0


_KERNEL_CHECK = r"""
import torch
from lora_rl import fused_mlp as fm

g = torch.Generator().manual_seed(0)
size_hint = fm._size_hint
# float16 (the interpreter's bfloat16 dot is not faithful); ragged rows and features, a rank padded to 16,
# several token chunks per feature block and several feature splits per token block
for n, f, r, programs in ((70, 200, 8, 8), (64, 96, 16, 2), (5, 33, 4, 64)):
    t = [torch.randn(n, f, generator=g).half() for _ in range(3)] + [torch.randn(n, r, generator=g).half()]
    xa = torch.randn(n, 2 * r, generator=g).half()
    xa_g, xa_u = xa[:, :r], xa[:, r:]  # strided, as training passes them
    b_g, b_u, a_d = torch.randn(f, r, generator=g).half(), torch.randn(f, r, generator=g).half(), torch.randn(r, f, generator=g).half()
    ref = fm._silu_mul_forward_reference(t[0], t[1], xa_g, xa_u, b_g, b_u, a_d, 1.5, 0.5)
    out = fm.silu_mul_forward_triton(t[0], t[1], xa_g, xa_u, b_g, b_u, a_d, 1.5, 0.5, block_t=16, block_f=32,
                                     num_warps=4, programs=programs)
    for a, b, name in zip(ref, out, ("h", "xa_d")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(b.float(), a.float(), atol=2e-3 * 8, rtol=2e-3, msg=name)
    args = (*t, xa_g, xa_u, b_g, b_u, a_d, 1.5, 0.5, 2.0)
    ref = fm._silu_mul_backward_reference(*args)
    # the launch planned for the actual token count, then for a larger and a smaller one (a compiled graph
    # keeps the plan of the count it was traced at): more chunks than row blocks, and a single chunk
    for first, hint in ((False, None), (True, None), (False, 4096), (False, 1)):
        fm._size_hint = lambda m, _h=hint, _n=n: _h if _h is not None and m == _n else m  # the token count only
        out = fm.silu_mul_backward_triton(*args, block_t=16, block_f=32, num_warps=4, programs=programs,
                                          features_first=first)
        for a, b, name in zip(ref, out, ("grad_g", "grad_u", "sums")):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            # sums: float32 accumulation in another order, so to 1e-4 of the largest sum (g and u are now
            # rebuilt from rank-r terms, and an element of h, dg or du may round the other way)
            atol = 2e-3 * 8 if name != "sums" else 1e-4 * float(a.abs().max())
            torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=2e-3 if name != "sums" else 1e-4, msg=name)
    fm._size_hint = size_hint
print("kernel ok")
"""


def test_triton_silu_mul_kernels_equal_the_references_under_the_interpreter():
    """The fused MLP's two Triton kernels, run by Triton's interpreter on the CPU (a separate process:
    the switch is read at import), against the operators' torch bodies: h, the activation's gradients
    and down's rank-r product to a float16 rounding, the three rank-r sums to float32 rounding."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
def test_triton_silu_mul_kernels_on_the_gpu_in_bfloat16():
    """On a GPU in bf16, what training runs: the operators dispatch to the kernels, whose h and
    gradients match the torch bodies to one bf16 rounding and whose rank-r results match to float32
    accumulation order."""
    from lora_rl import fused_mlp as fm

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, f, r in ((2048, 8960, 16), (333, 1000, 8)):
        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda").bfloat16()

        g0, u0, dh, gb_d, xa = rand(n, f), rand(n, f), rand(n, f), rand(n, r), rand(n, 2 * r)
        b_g, b_u, a_d = rand(f, r) * 0.1, rand(f, r) * 0.1, rand(r, f) * 0.1
        forward = (g0, u0, xa[:, :r], xa[:, r:], b_g, b_u, a_d, 1.5, 0.5)
        ref, out = fm._silu_mul_forward_reference(*forward), torch.ops.lora_rl.silu_mul_lora_forward.default(*forward)
        torch.testing.assert_close(out[0].float(), ref[0].float(), atol=0.05, rtol=1.6e-2, msg="h")
        assert ((out[1].float() - ref[1].float()).norm() / ref[1].float().norm()).item() < 1e-2
        backward = (g0, u0, dh, gb_d, xa[:, :r], xa[:, r:], b_g, b_u, a_d, 1.5, 0.5, 2.0)
        ref, out = fm._silu_mul_backward_reference(*backward), torch.ops.lora_rl.silu_mul_lora_backward.default(*backward)
        for a, b, name in zip(ref, out, ("grad_g", "grad_u")):
            torch.testing.assert_close(b.float(), a.float(), atol=0.05, rtol=1.6e-2, msg=name)
        # sums over n tokens of bf16 products: a few elements of h, dg, du round the other way
        assert ((out[2] - ref[2]).norm() / ref[2].norm()).item() < 1e-3


def test_fused_mlp_kernel_benchmark_runs_under_the_interpreter(tmp_path):
    """benchmarks/fused_mlp_kernel.py end to end on the CPU under Triton's interpreter, at a tiny shape:
    each kernel's default setting is checked against its reference and the tables and JSON are written (the
    timings mean nothing here)."""
    pytest.importorskip("triton")
    out = tmp_path / "kernel.json"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "fused_mlp_kernel.py"), "--tokens", "40",
                           "--features", "100", "--rank", "8", "--quick", "--out", str(out)],
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu-interpreter"
    assert len(result["forward_rows"]) == len(result["backward_rows"]) == 1
    assert result["forward_rows"][0]["relative_error"] < 1e-2 and result["backward_rows"][0]["relative_error"] < 1e-3
    assert result["unfused_forward_ms"] > 0 and result["unfused_backward_ms"] > 0


def _tiny_benchmark(script: str, tmp_path) -> dict:
    """A benchmarks/ script run on the CPU at the tiny shape (2 x 32 tokens, 2 repetitions): its JSON."""
    out = tmp_path / "result.json"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--shape", "tiny", "--batch", "2",
                           "--seq", "32", "--reps", "2", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_attention_backends_benchmark_checks_every_backend_against_the_first(tmp_path):
    """benchmarks/attention_backends.py on the CPU at the tiny shape: torch's own choice and each backend
    that accepts the call agree on the query gradient; those that refuse it (no cuDNN on a CPU) carry
    their error, not a time."""
    result = _tiny_benchmark("attention_backends.py", tmp_path)
    rows = {(r["backend"], r["enable_gqa"]): r for r in result["rows"]}
    assert len(rows) == 10 and "error" in rows["cudnn", True]
    timed = [r for r in rows.values() if "ms" in r]
    assert {("default", True), ("math", False)} <= set(rows) and len(timed) >= 4
    assert all(r["ms"] > 0 and r["relative_error"] < 1e-5 for r in timed)


def test_step_floor_benchmark_adds_up_its_parts(tmp_path):
    """benchmarks/step_floor.py on the CPU at the tiny shape: every part is timed, the floor is the sum
    of each part's time times its count per step, and the MLP adapters' rank-r work is not counted
    twice (it is folded into the activation's passes)."""
    result = _tiny_benchmark("step_floor.py", tmp_path)
    rows = {row["part"]: row for row in result["rows"]}
    assert {"base qkv_proj", "rank-r qkv_proj", "rank-r o_proj", "base lm_head", "attention", "activation",
            "norms"} <= set(rows) and "rank-r down_proj" not in rows
    assert rows["norms"]["per_step"] == 5 and rows["base lm_head"]["per_step"] == 1  # tiny: 2 layers
    assert all(row["ms"] > 0 for row in rows.values())
    assert result["bounds"]["sum_of_parts"]["s"] == pytest.approx(sum(r["step_ms"] for r in rows.values()) / 1e3)
    assert result["bounds"]["sustained_sequence"]["s"] > 0 and result["model_flops"] > 0


def test_benchmark_profiles_count_kernels_not_the_gpu_spans_of_annotated_ranges(monkeypatch):
    """The benchmarks' GPU busy and idle times. A record_function range (the optimizer's step, a compiled
    graph's call) has a GPU span from its first kernel to its last: it is not work of its own, and it does
    not close the idle gaps between the kernels it spans."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import report
    import train_step

    def event(name, start_us, end_us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(name=name, key=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start_us, end=end_us))

    events = [event("gemm", 0, 100), event("norm", 150, 200),
              event("Optimizer.step#AdamW.step", 0, 200, annotation=True), event("aten::mm", 90, 160, DeviceType.CPU)]
    assert [e.name for e in report.device_kernels(events)] == ["gemm", "norm"]
    idle_ms, by_host_range = train_step._gpu_idle(events)
    assert idle_ms == pytest.approx(0.05)  # the 50 us between the two kernels
    assert by_host_range == [("aten::mm", pytest.approx(0.05))]  # the host op that spans the gap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
def test_compiled_fused_mlp_launches_its_kernels_from_the_compiled_graph(monkeypatch):
    """Compiled as the decoder layers are (dynamic shapes, C++ wrapper), the fused MLP's forward and
    backward launch the Triton kernels from the compiled code: after the first call no Python body of
    the kernels' operators runs, at another token count too (one graph for both), and the output and
    adapter gradients equal the eager op's to bf16 rounding."""
    from lora_rl import fused_mlp as fm

    hidden, inter, r = 256, 704, 16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, grad=False):
        return (torch.randn(*shape, generator=gen, device="cuda") * 0.1).bfloat16().requires_grad_(grad)

    w = [rand(inter, hidden), rand(inter, hidden), rand(hidden, inter)]
    lora = [rand(r, hidden, grad=True), rand(inter, r, grad=True), rand(r, hidden, grad=True),
            rand(inter, r, grad=True), rand(r, inter, grad=True), rand(hidden, r, grad=True)]

    def mlp(x):
        return fm._LoRAMLPFunction.apply(x, w[0], None, lora[0], lora[1], w[1], None, lora[2], lora[3],
                                         w[2], None, lora[4], lora[5], 1.5, 0.5, 2.0)

    calls = []
    for name in ("silu_mul_forward_triton", "silu_mul_backward_triton"):
        body = getattr(fm, name)
        monkeypatch.setattr(fm, name, lambda *a, _body=body, _name=name, **k: calls.append(_name) or _body(*a, **k))
    compiled = torch.compile(mlp, dynamic=True, options={"cpp_wrapper": True})

    def run(fn, n):
        x = rand(n, hidden, grad=True)
        out = fn(x)
        grads = torch.autograd.grad((out.float() ** 2).sum(), [x, *lora])
        return [out, *grads]

    torch.manual_seed(0)
    run(compiled, 300)  # traces and compiles (the bodies run under the tracer)
    assert calls, "the kernels' bodies were never traced: the compiled graph does not contain the operators"
    for n in (300, 517):
        calls.clear()
        gen.manual_seed(n)
        got = run(compiled, n)
        assert not calls, f"compiled call at {n} tokens ran {calls} in Python (or recompiled)"
        gen.manual_seed(n)
        want = run(mlp, n)
        for a, b in zip(got, want):
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


def _transforming_models():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    return [Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=16, final_logit_softcapping=3.0)),
            GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=8.0))]


@pytest.mark.parametrize("index", [0, 1], ids=["gemma2-softcapping", "granite-scaling"])
def test_models_that_transform_their_logits_get_their_own_log_probs(index, monkeypatch, capsys):
    """Gemma's softcapping and Granite's scaling act on the head's output, which the sliced head replaces: the
    log-probs (and their gradient) must still be the model's, as the sampler sees them."""
    import torch.nn.functional as F

    from lora_rl import batching
    from lora_rl.batching import make_batch, token_logprobs

    model = _transforming_models()[index]
    g = torch.Generator().manual_seed(1)
    batch = make_batch([torch.randint(1, 256, (5,), generator=g).tolist() for _ in range(4)],
                       [torch.randint(1, 256, (6,), generator=g).tolist() for _ in range(4)], 0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    truth = F.log_softmax(logits[:, :-1].float() / 0.7, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    monkeypatch.setattr(batching, "_CHUNK_ELEMENTS", 256 * 8)  # as a real vocabulary would slice
    mask = batch.completion_mask.bool()
    for _ in range(2):  # the first call finds out, the second goes straight to the model's own forward
        logp, _ = token_logprobs(model, batch, 0.7, chunked=True)
        assert torch.allclose(logp[mask], truth[mask], atol=1e-5)
    assert capsys.readouterr().err.count("transforms its logits") == 1
    (logp[mask].sum()).backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
