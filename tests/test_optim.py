"""train.master_weights: AdamW over float32 masters of 16-bit weights (lora_rl/optim.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lora_rl.config import load_config
from lora_rl.optim import AdamW, MasterAdamW, make_optimizer


def _weights(dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter((torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype))


def _grads(steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 64, generator=g) + 0.5).to(dtype) for _ in range(steps)]


def _run(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        param.grad = grad.to(param.dtype)  # the float32 reference sees the same bf16 gradients, widened
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_bf16_weights_follow_the_float32_trajectory_at_rl_learning_rates():
    """At lr 1e-6 pure bf16 AdamW rounds most updates away; with masters the bf16 weights are the
    float32 run's weights, rounded."""
    lr, grads = 1e-6, _grads(100, torch.bfloat16)
    reference = torch.nn.Parameter(_weights(torch.bfloat16).detach().float())
    _run(reference, torch.optim.AdamW([reference], lr=lr, weight_decay=0.0), grads)

    pure = _weights(torch.bfloat16)
    _run(pure, torch.optim.AdamW([pure], lr=lr, weight_decay=0.0), grads)
    mastered = _weights(torch.bfloat16)
    optimizer = MasterAdamW([mastered], lr=lr)
    _run(mastered, optimizer, grads)

    start = _weights(torch.bfloat16).detach()
    moved = lambda w: (w.detach() != start).float().mean().item()  # noqa: E731
    assert moved(reference.to(torch.bfloat16)) > 0.3  # 100 steps of ~1e-6 cross many bf16 rounding points
    assert moved(pure) < 0.5 * moved(reference.to(torch.bfloat16))  # pure bf16 loses most of them
    master = optimizer.state[mastered]["master"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, reference.detach(), rtol=0, atol=1e-9)
    assert torch.equal(mastered.detach(), master.to(torch.bfloat16))


def test_float32_weights_step_exactly_as_torch_adamw():
    grads = _grads(5, torch.float32)
    ours, theirs = _weights(torch.float32), _weights(torch.float32)
    optimizer = MasterAdamW([ours], lr=1e-2, weight_decay=0.1)
    _run(ours, optimizer, grads)
    _run(theirs, torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1), grads)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
    assert optimizer.state[ours]["master"] is ours  # no copy for float32 weights


def test_resume_restores_the_float32_masters_not_the_rounded_weights():
    grads = _grads(6, torch.bfloat16)
    straight = _weights(torch.bfloat16)
    straight_opt = MasterAdamW([straight], lr=1e-6)
    _run(straight, straight_opt, grads)

    first = _weights(torch.bfloat16)
    first_opt = MasterAdamW([first], lr=1e-6)
    _run(first, first_opt, grads[:3])
    saved = copy.deepcopy(first_opt.state_dict())
    assert saved["state"][0]["master"].dtype == torch.float32
    # A fresh run: the weights come back from the checkpoint (bf16), the optimizer from its state.
    second = torch.nn.Parameter(first.detach().clone())
    second_opt = MasterAdamW([second], lr=1e-6)
    second_opt.load_state_dict(saved)
    state = second_opt.state[second]
    assert {state[k].dtype for k in ("master", "exp_avg", "exp_avg_sq")} == {torch.float32}
    _run(second, second_opt, grads[3:])
    assert torch.equal(second_opt.state[second]["master"], straight_opt.state[straight]["master"])
    assert torch.equal(second.detach(), straight.detach())


@pytest.mark.parametrize("master_weights, kind", [(True, MasterAdamW), (False, AdamW)])
def test_config_switch_picks_the_optimizer(master_weights, kind):
    config = load_config(None, [f"train.master_weights={master_weights}"])
    assert type(make_optimizer([_weights(torch.bfloat16)], config.train, torch.device("cpu"))) is kind


@pytest.mark.parametrize("kind", [MasterAdamW, AdamW])
def test_a_checkpoint_from_an_unfused_optimizer_resumes_fused(kind):
    """A CPU run's checkpoint (unfused) resumed on a GPU (fused): the optimizer keeps its own kernel, so a
    step the engine flags with found_inf is skipped, not applied (torch's loader restored the saved flag)."""
    weights = _weights(torch.bfloat16)
    cpu = kind([weights], lr=1e-3, fused=False)
    weights.grad = torch.ones_like(weights)
    cpu.step()
    gpu_weights = weights.detach().clone().requires_grad_()
    gpu = kind([gpu_weights], lr=1e-3, fused=True)  # torch's fused AdamW runs on the CPU too
    gpu.load_state_dict(copy.deepcopy(cpu.state_dict()))
    assert gpu.param_groups[0]["fused"] is True
    before = gpu_weights.detach().clone()
    gpu_weights.grad = torch.full_like(gpu_weights, float("nan"))
    gpu.found_inf = torch.ones(())
    gpu.step()
    assert torch.equal(gpu_weights.detach(), before)
    gpu_weights.grad, gpu.found_inf = torch.ones_like(gpu_weights), torch.zeros(())
    gpu.step()
    assert torch.isfinite(gpu_weights).all() and not torch.equal(gpu_weights.detach(), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused AdamW kernel runs on GPUs")
def test_engine_skips_a_non_finite_step_on_the_device(random_model_dir):
    """On a GPU the engine launches the step without waiting for the norm (found_inf): a NaN gradient
    must still leave weights, masters, moments and step counts as they were, and finite ones step as
    the CPU's foreach AdamW does."""
    from transformers import AutoModelForCausalLM

    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.lora import inject_lora

    config = load_config(None, ["lora.lora_rank=4", "model.dtype=bfloat16", "backend.compile=false"])
    model = inject_lora(AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.bfloat16), config.lora)
    engine = FSDP2Engine(model.cuda(), config, random_model_dir)
    reference = [torch.nn.Parameter(p.detach().cpu()) for p in engine.params]
    reference_opt = MasterAdamW(reference, lr=config.train.lr)
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype)
             for i, p in enumerate(reference)]

    def step(params, poison=False):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.device)
        if poison:
            params[0].grad[0, 0] = float("nan")

    step(engine.params)
    engine.optimizer_step()
    step(reference)
    torch.nn.utils.clip_grad_norm_(reference, config.train.max_grad_norm)
    reference_opt.step()
    before = [p.detach().clone() for p in engine.params]
    state = [{k: v.clone() for k, v in engine.optimizer.state[p].items()} for p in engine.params]
    step(engine.params, poison=True)
    assert math.isnan(engine.optimizer_step())  # the norm is returned as measured
    assert all(torch.equal(p.detach(), b) for p, b in zip(engine.params, before, strict=True))
    for p, saved in zip(engine.params, state, strict=True):
        assert all(torch.equal(engine.optimizer.state[p][k], v) for k, v in saved.items())
    step(engine.params)
    engine.optimizer_step()
    step(reference)
    torch.nn.utils.clip_grad_norm_(reference, config.train.max_grad_norm)
    reference_opt.step()
    for p, q in zip(engine.params, reference, strict=True):
        torch.testing.assert_close(engine.optimizer.state[p]["master"].cpu(), reference_opt.state[q]["master"],
                                   rtol=1e-5, atol=1e-7)
