"""The Megatron training backend: megatron-core with LoRA from megatron-bridge.

megatron-bridge's `AutoBridge` turns the Hugging Face model folder into a Megatron `GPTModel` built from
the local (non-transformer-engine) layer spec; `megatron.bridge.peft.lora.LoRA` adds the adapters.
Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`, and its LoRA puts one adapter on a
fused layer (one A, one stacked B). The adapter is exported in standard PEFT format - HF names, A copied
per projection - so vLLM, SGLang and PEFT load it like any FSDP2 adapter.

Two models live here:
- `self.megatron`: the Megatron module that trains (tensor parallel over `backend.tensor_parallel`
  processes; the rest are data parallel).
- `self.model`: the adapter as the rollout engines will receive it - the Hugging Face architecture with
  a PEFT adapter of the trained shape, on the meta device (no memory). Engines check it before they start
  and `save_adapter` writes its PEFT files from it, filled with Megatron's exported tensors.

Departures from a Megatron training script: torch AdamW on the adapter's parameters (Megatron's
optimizer hard-codes CUDA and its distributed-optimizer buffers buy nothing for a few MB of LoRA), and no
DDP wrapper: the adapter's gradients are summed over data-parallel ranks by hand before the step.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lora_rl import distributed
from lora_rl.backends import megatron_compat
from lora_rl.backends.base import check_saved_shapes
from lora_rl.batching import TokenBatch, logits_to_logprobs
from lora_rl.config import Config, ConfigError
from lora_rl.lora import megatron_target_names, save_adapter
from lora_rl.models import DTYPES, has_dropout, set_training
from lora_rl.optim import make_optimizer


_COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")  # their adapters' A split the rank over tensor-parallel ranks


def check_parallel(tensor_parallel: int, world: int, bridge_version: str, lora_rank: int | None = None,
                   targets: tuple[str, ...] = _COLUMN_PARALLEL) -> None:
    """Refuse layouts this backend would train wrongly, or that Megatron would refuse with a bare assertion.
    `targets`: the adapted layers in Megatron's names."""
    if lora_rank is not None and lora_rank % tensor_parallel and set(targets) & set(_COLUMN_PARALLEL):
        # megatron-bridge splits the rank dimension of a column-parallel layer's A over the tensor-parallel
        # ranks (a row-parallel layer's A splits its input instead); Megatron's own refusal is
        # "AssertionError: 4 is not divisible by 8".
        up = -(-lora_rank // tensor_parallel) * tensor_parallel
        raise ConfigError(f"lora.lora_rank={lora_rank} is not a multiple of backend.tensor_parallel={tensor_parallel}: "
                          f"megatron-bridge splits each adapter's rank over the tensor-parallel ranks. Use "
                          f"lora.lora_rank={up}, or a tensor_parallel that divides {lora_rank}")
    if world % tensor_parallel:
        raise ConfigError(f"backend.tensor_parallel={tensor_parallel} does not divide the {world} processes: run a "
                          f"multiple of {tensor_parallel} processes (torchrun --nproc-per-node)")
    major_minor = tuple(int(x) for x in bridge_version.split(".")[:2])
    if tensor_parallel > 1 and not torch.cuda.is_available() and major_minor < (0, 6):
        raise ConfigError(f"backend.tensor_parallel={tensor_parallel} on the CPU with megatron-bridge {bridge_version}: "
                          "its tensor-parallel LoRA gives wrong results there (exact from 0.6 on, FIELD_NOTES "
                          "section 5). Use backend.tensor_parallel=1 on the CPU, or GPUs")


_BUILT_ON: list = [None]  # the default process group Megatron's parallel state was last built on


def _init_parallel(mc: megatron_compat.Megatron, tensor_parallel: int, seed: int) -> None:
    import torch.distributed as dist

    ps = mc.parallel_state
    if ps.model_parallel_is_initialized():
        # A run that ended destroyed its process group (distributed.shutdown); Megatron's groups were built
        # on it and are stale for the next run in the same process (notebooks, sweeps, the tests).
        if ps.get_tensor_model_parallel_world_size() == tensor_parallel and _BUILT_ON[0] is dist.group.WORLD:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=1)
    _BUILT_ON[0] = dist.group.WORLD
    # Megatron keeps named RNG states for tensor-parallel regions; the inference tracker is the one that
    # works without CUDA graphs and on the CPU.
    mc.tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def release_parallel_state() -> None:
    """Forget Megatron's process groups (distributed.release_groups, after the default group is destroyed):
    megatron-core's parallel_state and _BUILT_ON kept them, and with them their gloo threads, alive."""
    mc = sys.modules.get("megatron.core.parallel_state")
    if mc is not None and mc.model_parallel_is_initialized():
        mc.destroy_model_parallel()
    _BUILT_ON[0] = None


def _rope_theta(hf_config) -> float:
    """RoPE's base as the HF config states it. transformers 5 moved it into `rope_parameters`, where
    megatron-bridge 0.3.1 does not look (it silently builds with 10000: SmolLM2's is 100000)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}  # its type: backends.check_backend_config
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def build_megatron(base_model_path: Path, config: Config) -> tuple[object, list[torch.nn.Module], int]:
    """(bridge, model chunks, HF vocabulary size): the HF folder as a Megatron model with LoRA adapters."""
    mc = megatron_compat.load()
    check_parallel(config.backend.tensor_parallel, distributed.world_size(), mc.bridge_version,
                   config.lora.lora_rank if config.lora.use_lora else None,
                   tuple(megatron_target_names(config.lora.target_modules)))
    distributed.ensure_group()
    _init_parallel(mc, config.backend.tensor_parallel, config.run.seed)
    dtype = DTYPES[config.model.dtype]
    bridge = mc.AutoBridge.from_hf_pretrained(str(base_model_path))
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.rotary_base = _rope_theta(bridge.hf_pretrained.config)
    provider.transformer_layer_spec = mc.local_layer_spec  # transformer-engine is not installed
    provider.tensor_model_parallel_size = config.backend.tensor_parallel
    provider.pipeline_model_parallel_size = 1
    provider.sequence_parallel = False
    provider.params_dtype = provider.pipeline_dtype = dtype
    provider.bf16, provider.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    provider.parallel_output = False  # full-vocabulary logits on every tensor-parallel rank
    # The fused kernels behind these flags come from transformer-engine or apex.
    for flag in ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion", "persist_layer_norm"):
        setattr(provider, flag, False)
    if config.backend.activation_checkpointing:  # CUDA only: backends.check_backend_config
        provider.recompute_granularity, provider.recompute_method, provider.recompute_num_layers = "full", "uniform", 1
    provider.finalize()
    lora = config.lora
    adapter = mc.LoRA(target_modules=megatron_target_names(lora.target_modules), dim=lora.lora_rank,
                      alpha=lora.lora_alpha, dropout=lora.lora_dropout)
    with megatron_compat.cpu_device_calls():
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, mixed_precision_wrapper=None,
                                                    use_cpu_initialization=not torch.cuda.is_available())
        chunks = adapter(chunks, training=True)
    return bridge, chunks, bridge.hf_pretrained.config.vocab_size


def peft_key(hf_name: str) -> str:
    """An exported adapter tensor's HF name as a PeftModel parameter name (adapter "default")."""
    return "base_model.model." + hf_name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


class MegatronEngine:
    name = "megatron"

    def __init__(self, model: torch.nn.Module, config: Config, base_model_path: Path):
        if not config.lora.use_lora or not hasattr(model, "peft_config"):
            raise ConfigError("backend.name=megatron trains LoRA adapters only: set lora.use_lora=true, or use "
                              "backend.name=fsdp2 for full fine-tuning")
        self.config = config
        self.base_model_path = base_model_path
        self.model = model  # the PEFT adapter's shape on the meta device (see the module docstring)
        self.bridge, self.chunks, self.vocab = build_megatron(base_model_path, config)
        (self.megatron,) = self.chunks  # one chunk: no pipeline parallelism
        self.drops_inputs = has_dropout(self.megatron)
        self.device = distributed.device()
        self.params = [p for p in self.megatron.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, config.train, self.device)
        ps = megatron_compat.load().parallel_state
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.tp_group, self.dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._not_duplicate = megatron_compat.load().tensor_parallel.param_is_not_tensor_parallel_duplicate

    def logprobs(self, batch: TokenBatch, temperature: float, with_grad: bool,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Train mode only for the gradient pass (LoRA dropout, recompute); scoring passes stay exact.
        set_training(self.megatron, with_grad)
        batch = batch.to(self.device)
        rows, width = batch.input_ids.shape
        positions = torch.arange(width, device=self.device).expand(rows, width)
        # Right padding: a causal mask keeps every real token from seeing pads (True = masked out).
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).triu(1)[None, None]
        with torch.set_grad_enabled(with_grad), megatron_compat.cpu_device_calls():
            logits = self.megatron(input_ids=batch.input_ids, position_ids=positions, attention_mask=causal)
        # Megatron may pad the vocabulary (to a multiple for tensor parallelism): those rows are not tokens.
        return logits_to_logprobs(logits[..., :self.vocab], batch.input_ids, temperature, with_entropy)

    @contextlib.contextmanager
    def reference(self):
        """The base model: every LoRA wrapper passes its input through unchanged."""
        wrappers = [m for m in self.megatron.modules() if hasattr(m, "disable_adapter_layers")]
        for m in wrappers:
            m.disable_adapter_layers()
        try:
            yield
        finally:
            for m in wrappers:
                m.enable_adapter_layers()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is this rank's share of a global token mean, and gradients are summed over data-parallel
        # ranks in optimizer_step. The global token count is summed over every process, but the
        # tensor-parallel ranks of one replica hold the same sequences: it counted them tp times.
        with megatron_compat.cpu_device_calls():
            (loss * self.tp_size).backward()

    def optimizer_step(self) -> float:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.dp_size > 1:
            for g in grads:
                dist.all_reduce(g, group=self.dp_group)
        # Global norm: tensor-parallel shards count once each, replicated tensors once per replica.
        squares = sum(float(g.double().pow(2).sum()) for p, g in zip(self.params, grads, strict=True)
                      if self._not_duplicate(p))
        total = torch.tensor(squares, dtype=torch.float64, device=self.device)
        if self.tp_size > 1:
            dist.all_reduce(total, group=self.tp_group)
        norm = float(total.sqrt())
        finite = norm == norm and norm != float("inf")
        max_norm = self.config.train.max_grad_norm
        if finite:
            scale = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0  # 1e-6: no division by zero
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g * scale if scale < 1.0 else g
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """This rank's adapter tensors under Megatron's names (its tensor-parallel shard)."""
        return {name: p.detach().clone() for name, p in self.megatron.named_parameters() if p.requires_grad}

    def exported_adapter(self) -> dict[str, torch.Tensor]:
        """Collective over tensor-parallel ranks: the full adapter under PEFT's parameter names."""
        with megatron_compat.cpu_device_calls():
            exported = self.bridge.export_adapter_weights(self.chunks, cpu=True, show_progress=False)
            state = {peft_key(name): tensor.detach().clone() for name, tensor in exported}
        expected = {name for name, _ in self.model.named_parameters() if ".lora_" in name}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:4], sorted(set(state) - expected)[:4]
            raise RuntimeError(f"megatron-bridge exported an adapter that does not match the PEFT layout: missing "
                               f"{missing}, unexpected {extra}")
        return state

    def save_adapter(self, out_dir: Path) -> Path:
        """Collective: every rank exports (tensor-parallel shards are gathered), rank 0 writes the PEFT folder."""
        state = self.exported_adapter()
        if distributed.is_main():
            save_adapter(self.model, out_dir, self.base_model_path, state_dict=state)
        distributed.barrier()
        return out_dir

    def _state_file(self, folder: Path) -> Path:
        return folder / f"megatron-tp{self.tp_rank}-of-{self.tp_size}.pt"

    def save_state(self, folder: Path) -> None:
        """Collective. One file per tensor-parallel rank (data-parallel replicas hold the same state)."""
        if self.dp_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict()},
                       self._state_file(folder))
        distributed.barrier()

    def load_state(self, folder: Path) -> None:
        path = self._state_file(folder)
        if not path.is_file():
            have = sorted(p.name for p in folder.glob("megatron-tp*.pt")) if folder.is_dir() else []
            raise ConfigError(f"checkpoint {folder} has no {path.name} (it holds {have}): resume with the "
                              "backend.tensor_parallel it was saved with")
        state = torch.load(path, map_location="cpu", weights_only=True)
        named = dict(self.megatron.named_parameters())
        check_saved_shapes(named, state["trainable"], folder)
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
