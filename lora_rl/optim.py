"""AdamW that keeps a float32 master copy of every 16-bit parameter (`train.master_weights`).

Why: with bf16 weights, an update smaller than half a bf16 step of the weight is rounded away. A weight
of 0.02 has steps of 2^-13 (about 1.2e-4), so at RL learning rates (1e-6 for a full fine-tune, 1e-5 for
LoRA) AdamW's update - about lr per element - changes almost nothing: ten steps at lr 1e-6 move about 2%
of a bf16 matrix (tests/test_optim.py). Mixed-precision training (Megatron's fp32 main params, FSDP2 with
float32 shards) keeps the weights in float32 for the optimizer and computes in bf16; this does the same
without changing what the model holds: the parameters stay bf16 for the forward and backward, the
optimizer state holds a float32 master copy and float32 moments, steps the masters, and copies them back.

Float32 parameters are stepped in place (no copy): the optimizer is then plain AdamW. The masters live in
the optimizer state, so checkpoints (`state_dict`, FSDP2's sharded optimizer state) carry them and a
resumed run continues from the float32 values, not from the rounded weights.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _float32_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The moments and the update are float32, so 16-bit gradients are widened first: into views of one
    flat buffer with one multi-tensor copy, not a cast kernel per tensor (a LoRA model has hundreds)."""
    narrow = [i for i, g in enumerate(grads) if g.dtype != torch.float32]
    if not narrow:
        return grads
    flat = torch.empty(sum(grads[i].numel() for i in narrow), dtype=torch.float32, device=grads[narrow[0]].device)
    wide = [v.view(grads[i].shape) for i, v in zip(narrow, flat.split([grads[i].numel() for i in narrow]), strict=True)]
    torch._foreach_copy_(wide, [grads[i] for i in narrow])
    out = list(grads)
    for i, w in zip(narrow, wide, strict=True):
        out[i] = w
    return out


class _KeepsFused:
    """A checkpoint's param groups carry the `fused` flag of the machine that wrote them, and torch's loader
    restores it: a CPU checkpoint resumed on a GPU would step unfused and ignore `found_inf`, applying a
    non-finite update the engine meant to skip. The flag is this optimizer's, chosen for this device."""

    def load_state_dict(self, state_dict: dict) -> None:
        fused = [group["fused"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, fused, strict=True):
            group["fused"] = flag
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:  # the fused kernel reads it on the device, the foreach path on the host
                    state["step"] = state["step"].to(device=p.device if flag else "cpu", dtype=torch.float32)


class AdamW(_KeepsFused, torch.optim.AdamW):
    pass


class MasterAdamW(_KeepsFused, torch.optim.Optimizer):
    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, fused: bool = False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused))

    def _state(self, p: torch.Tensor, fused: bool) -> dict:
        state = self.state[p]
        if not state:
            master = p if p.dtype == torch.float32 else p.detach().float()
            state["master"] = master
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            # The fused kernel reads the step count on the device; the foreach path wants it on the host.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            states = [self._state(p, group["fused"]) for p in live]
            # AdamW is elementwise, so each rank steps its own shards: FSDP2's DTensors are opened to
            # their local tensors (the state keeps the DTensors, which sharded checkpoints need).
            masters = [_local(s["master"]) for s in states]
            grads = _float32_grads([_local(p.grad) for p in live])
            # found_inf (set by the engine, fused kernel only): a non-finite gradient skips the update on
            # the device, so the host need not wait for the backward to finish before launching the step.
            found_inf = getattr(self, "found_inf", None) if group["fused"] else None
            adamw(masters, grads, [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states],
                  [], [s["step"] for s in states], foreach=None if group["fused"] else True,
                  fused=group["fused"] or None, found_inf=found_inf, amsgrad=False, beta1=group["betas"][0],
                  beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                  maximize=False)
            narrow = [(_local(p), m) for p, m in zip(live, masters, strict=True) if p.dtype != torch.float32]
            if narrow:
                # Round each master to the parameter's dtype: one multi-tensor copy for all of them.
                torch._foreach_copy_([p for p, _ in narrow], [m for _, m in narrow])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader casts every floating-point state tensor to its parameter's dtype, which would
        # round the float32 masters and moments back to bf16: put the saved values back after it.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            if i not in saved:
                continue
            state = self.state[p]
            if p.dtype == torch.float32:
                state["master"] = p  # stepped in place, as before the save
                continue
            for key in ("master", "exp_avg", "exp_avg_sq"):
                state[key] = saved[i][key].to(device=p.device, dtype=torch.float32)
            # The parameter may have been restored from a rounded copy: the master is the truth.
            p.detach().copy_(state["master"])

def make_optimizer(params: list[torch.Tensor], train, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer every backend uses. On GPUs the fused AdamW kernel is one launch for all tensors:
    hundreds of small LoRA tensors otherwise cost more in launches than in arithmetic."""
    fused = device.type == "cuda"
    if train.master_weights:
        return MasterAdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused)
    return AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused)
