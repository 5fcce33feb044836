"""The training-engine protocol every backend implements.

A backend owns the policy's weights and optimizer. The GRPO update in `lora_rl.trainer` is
written only against these methods, so FSDP2 and Megatron differ only in their own files.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch

from lora_rl.batching import TokenBatch


class TrainEngine(Protocol):
    name: str
    model: torch.nn.Module  # the policy (a PeftModel when lora.use_lora)
    device: torch.device  # where batches must live for `logprobs`
    drops_inputs: bool  # the training pass runs dropout (models.has_dropout): its log-probs are not exact

    def logprobs(self, batch: TokenBatch, temperature: float, with_grad: bool,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target-token log-probs [B, T-1] (and entropies) of the current policy."""

    def reference(self) -> AbstractContextManager:
        """Context in which `logprobs` scores the reference policy (the base model, adapter off)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> float:
        """Clip gradients over all ranks, step, zero grads; returns the pre-clip gradient norm."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (the adapter), gathered in full on this process."""

    def save_adapter(self, out_dir: Path) -> Path:
        """Write the adapter as a standard PEFT folder (never the full model)."""

    def save_state(self, folder: Path) -> None:
        """Collective: adapter + optimizer state for a checkpoint (sharded where the backend shards)."""

    def load_state(self, folder: Path) -> None: ...


def check_saved_shapes(named: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Each saved trainable tensor must fit the model's. The run's config is checked against the saved one,
    but model.path is a folder whose contents can change; copy_ would fail with a bare broadcast error (or,
    for equal sizes, not at all)."""
    from lora_rl.config import ConfigError

    for name, tensor in saved.items():
        have = tuple(named[name].shape) if name in named else None
        if have != tuple(tensor.shape):
            raise ConfigError(f"checkpoint {folder.parent} holds {name} of shape {list(tensor.shape)}, but this "
                              f"model's is {list(have) if have else 'missing'}: the model in model.path is not "
                              "the one the run trained. Restore that model folder, or start a new run.output_dir")
    # The other way round too: a model with more layers (or adapted modules) takes every saved tensor, and
    # only the optimizer's state then fails, as if the checkpoint were damaged.
    unsaved = [name for name, param in named.items() if param.requires_grad and name not in saved]
    if unsaved:
        raise ConfigError(f"checkpoint {folder.parent} holds no {unsaved[0]} ({len(unsaved)} of this model's trainable "
                          f"tensors are not in it): the model in model.path is not the one the run trained. Restore "
                          "that model folder, or start a new run.output_dir")
