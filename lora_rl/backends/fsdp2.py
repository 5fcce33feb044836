"""The FSDP2 training backend (PyTorch `fully_shard`).

In this version it runs in a single process, where FSDP2 sharding is the identity and the model
is used as a plain module; multi-process sharding across ranks is not built yet and is refused
with a clear error. Everything the GRPO loop needs - log-probs with and without the adapter,
backward, clipped optimizer step, adapter export, checkpoint state - is here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from lora_rl.batching import TokenBatch, token_logprobs
from lora_rl.config import Config, ConfigError
from lora_rl.lora import save_adapter


class FSDP2Engine:
    name = "fsdp2"

    def __init__(self, model: torch.nn.Module, config: Config, base_model_path: Path):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ConfigError(f"backend.name=fsdp2 with WORLD_SIZE={world}: multi-process FSDP2 sharding is not "
                              "built in this version yet; run a single process")
        self.model = model
        self.config = config
        self.base_model_path = base_model_path
        self.use_lora = config.lora.use_lora
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.train.lr, weight_decay=config.train.weight_decay)

    def logprobs(self, batch: TokenBatch, temperature: float, with_grad: bool,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.set_grad_enabled(with_grad):
            return token_logprobs(self.model, batch, temperature, with_entropy)

    def reference(self) -> contextlib.AbstractContextManager:
        if not self.use_lora:
            raise RuntimeError("the reference policy needs LoRA: with full fine-tuning there is no frozen base")
        return self.model.disable_adapter()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        max_norm = self.config.train.max_grad_norm
        # clip_grad_norm_ with max_norm=inf measures without clipping.
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def save_adapter(self, out_dir: Path) -> Path:
        if not self.use_lora:
            raise RuntimeError("no adapter to save: lora.use_lora is false")
        return save_adapter(self.model, out_dir, self.base_model_path)

    def state_dict(self) -> dict:
        return {"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
