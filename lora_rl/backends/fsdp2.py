"""The FSDP2 training backend (PyTorch `fully_shard`).

With one process the model is a plain module. Under torchrun each decoder layer and then the root
are wrapped with `fully_shard`, so frozen base weights and LoRA weights are sharded across ranks
(gloo on CPU, NCCL on GPU); with `model.dtype: bfloat16` parameters compute in bf16 and gradients
reduce in fp32. Everything the GRPO loop needs - log-probs with and without the adapter, backward,
a gradient clip over all ranks, adapter-only export, checkpoint state - is here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lora_rl import distributed
from lora_rl.backends.base import check_saved_shapes
from lora_rl.batching import TokenBatch, token_logprobs
from lora_rl.config import Config, ConfigError
from lora_rl.cuda_graphs import GraphedLayers
from lora_rl.fused_lora import fuse_lora, load_native
from lora_rl.lora import adapters_off, merged_for_generation, save_adapter
from lora_rl.models import has_dropout, set_training
from lora_rl.optim import make_optimizer

# Full (unsharded) tensors on rank 0 only, on the CPU, trainable ones only: the adapter alone,
# never the whole model (that is what AReaL gathers every step).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def initial_tensor(name: str, shape, seed: int, device, std: float = 0.02) -> torch.Tensor:
    """The seeded initial value of a parameter, the same on every rank and for any world size: LoRA A
    Kaiming-uniform and LoRA B zeros (the adapter starts as a no-op, as in peft); for random-init base
    models, norm weights one, biases zero and other weights N(0, std) as Hugging Face initialises them."""
    import math
    import zlib

    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.zeros(shape, device=device)
    if "lora_B" in name or name.endswith(".bias"):
        return full
    if "lora_A" in name:
        bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
        return full.uniform_(-bound, bound, generator=g)
    if "norm" in name and len(shape) == 1:
        return full.fill_(1.0)
    return full.normal_(0.0, std, generator=g)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks, found by class name so any HF decoder-only family works."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_layers(model: torch.nn.Module, graphs: int, memory_budget: float = 1.0) -> None:
    """torch.compile each decoder layer (`backend.compile`). Per layer, not the whole model: one compiled
    graph serves every layer (scoring runs without a KV cache, whose per-layer state would force a graph
    per layer), and the output head stays eager for the sliced log-prob head that is swapped in per call.
    graphs: how many graphs a layer may need; the limits are raised so that no layer ever falls back to
    eager silently.

    Inductor writes each graph's wrapper in C++ (`cpp_wrapper`), and with the fused LoRA operators'
    C++ bodies (`load_native`) a compiled layer runs without entering Python: where a LoRA step waits on
    the host (a 0.5B model on an H100), the two together made it about 17% faster (README).

    memory_budget (`backend.compile_memory_budget`): below 1, the partitioner of the compiled forward
    and backward saves fewer activations and recomputes the cheapest ones in the backward (pointwise
    ops first: the MLP's silu(gate) * up and the norms' outputs). It is torch's process-wide setting,
    read when a graph is compiled."""
    torch._functorch.config.activation_memory_budget = memory_budget
    layers = decoder_layers(model)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs * len(layers))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, graphs * len(layers))
    for layer in layers:
        layer.compile(dynamic=True, options={"cpp_wrapper": True})


class FSDP2Engine:
    name = "fsdp2"

    def __init__(self, model: torch.nn.Module, config: Config, base_model_path: Path | None):
        # base_model_path None: a meta-device model gets seeded random weights (benchmark shapes only).
        self.config = config
        self.base_model_path = base_model_path
        self.use_lora = config.lora.use_lora
        self.drops_inputs = has_dropout(model)
        self.sharded = distributed.active()
        if config.backend.activation_checkpointing:
            # Non-reentrant checkpointing composes with FSDP2 and with frozen inputs to LoRA layers.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        on_meta = any(p.is_meta for p in model.parameters())
        if config.backend.cpu_offload and not self.sharded:
            raise ConfigError("backend.cpu_offload=true offloads FSDP2 shards: run several processes (--nproc N) "
                              "or set backend.cpu_offload=false")
        if on_meta and not self.sharded:
            raise ValueError("a model on the meta device needs several FSDP2 processes (meta_init is for torchrun)")
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if on_meta else {}
        if self.sharded:
            if config.backend.cpu_offload and not torch.cuda.is_available():
                raise ConfigError("backend.cpu_offload=true needs GPUs: on a CPU machine the weights already live "
                                  "in CPU memory; set backend.cpu_offload=false")
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if config.model.dtype == "bfloat16" else MixedPrecisionPolicy()
            offload = CPUOffloadPolicy() if config.backend.cpu_offload else OffloadPolicy()
            reshard = config.backend.reshard_after_forward
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)
            fully_shard(model, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)
            if on_meta:
                self._materialize(model, buffers, config.run.seed)
        if self.use_lora and config.train.fused_lora:
            fuse_lora(model, mlp=config.train.fused_mlp, qkv=config.train.fused_qkv)
            if distributed.device().type == "cuda":
                load_native("CUDA")
        self.compiled = config.backend.compile and distributed.device().type == "cuda"
        if self.compiled:
            # The first layer gets a second graph: its input needs no gradient under LoRA.
            compile_layers(model, graphs=2, memory_budget=config.backend.compile_memory_budget)
        self.graphed = None
        if config.backend.cuda_graphs and distributed.device().type == "cuda":
            if self.sharded:
                raise ConfigError("backend.cuda_graphs=true replays unsharded layers, and FSDP2 gathers and frees "
                                  "shards around each layer: run one process or set backend.cuda_graphs=false")
            self.graphed = GraphedLayers(model, decoder_layers(model))
        self.model = model
        self.chunked_logprobs = config.train.chunked_logprobs
        self.merge_for_generation = config.rollout.merge_for_generation
        self.device = distributed.device()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = make_optimizer(self.params, config.train, self.device)

    def _materialize(self, model: torch.nn.Module, buffers: dict[str, torch.Tensor], seed: int) -> None:
        """Give a meta-device model its weights one tensor at a time: every rank builds the same full
        tensor - read from the base model's safetensors, or drawn from a seeded generator when there is
        no base folder (random-init benchmark shapes) - keeps its own shard and drops the rest, so no
        process ever holds the whole model and no rank sends weights to another."""
        from safetensors import safe_open
        from torch.distributed.tensor import distribute_tensor

        compute = distributed.device()
        # With CPU offload the shards live in CPU memory; FSDP2 moves them to the GPU per use.
        model.to_empty(device="cpu" if self.config.backend.cpu_offload else compute)
        for module_name, module in model.named_modules():
            for name in list(module._buffers):  # rotary tables etc.: not in the checkpoint, never offloaded
                key = f"{module_name}.{name}" if module_name else name
                if key in buffers:
                    module._buffers[name] = buffers[key].to(compute)
        where = {}
        if self.base_model_path is not None:
            for file in sorted(Path(self.base_model_path).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    where.update({key: file for key in f.keys()})
        std = getattr(model.config, "initializer_range", 0.02)
        with torch.no_grad():
            for name, param in model.named_parameters():
                hf_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
                if hf_name not in where and hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
                    # to_empty() unties a tied head; it is frozen, so a copy of the embeddings serves.
                    hf_name = "model.embed_tokens.weight"
                if "lora_A" in name or "lora_B" in name or self.base_model_path is None:
                    full = initial_tensor(hf_name, param.shape, seed, compute, std)
                elif hf_name in where:
                    with safe_open(str(where[hf_name]), framework="pt") as f:
                        full = f.get_tensor(hf_name)
                else:
                    raise ConfigError(f"backend.meta_init=true reads weights from safetensors, and {hf_name} is not "
                                      f"in {self.base_model_path}: convert the model to safetensors or set "
                                      "backend.meta_init=false")
                # src_data_rank=None: each rank slices its own shard from its identical copy (no scatter).
                shard = distribute_tensor(full.to(compute, param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None)
                param.to_local().copy_(shard.to_local())

    def logprobs(self, batch: TokenBatch, temperature: float, with_grad: bool,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Train mode only for the gradient pass: it switches on LoRA dropout and activation
        # checkpointing (HF models checkpoint only while training); scoring passes stay exact.
        set_training(self.model, with_grad)
        with torch.set_grad_enabled(with_grad):
            return token_logprobs(self.model, batch.to(self.device), temperature, with_entropy,
                                  chunked=self.chunked_logprobs, compiled=self.compiled)

    def reference(self) -> contextlib.AbstractContextManager:
        if not self.use_lora:
            raise RuntimeError("the reference policy needs LoRA: with full fine-tuning there is no frozen base")
        return adapters_off(self.model)

    @contextlib.contextmanager
    def generation(self):
        """Gather every shard once for a whole rollout instead of once per generated token."""
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)] if self.sharded else []
        for unit in units:
            unit.unshard()
        # Unsharded LoRA models generate with the adapter merged (rollout.merge_for_generation).
        merge = self.use_lora and self.merge_for_generation and not self.sharded
        # Sampling runs the layers eagerly: with a KV cache and one new token per call, compiled layers
        # would recompile per layer and per shape for no gain.
        eager = torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()
        try:
            with merged_for_generation(self.model) if merge else contextlib.nullcontext(), eager:
                yield
        finally:
            for unit in units:
                unit.reshard()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised by the global token count, so gradients must be summed
        # over ranks; FSDP2 averages them (divides by the world size), hence the factor.
        (loss * distributed.world_size()).backward()

    def optimizer_step(self) -> float:
        max_norm = self.config.train.max_grad_norm
        # Every rank calls this, even one whose LoRA shards are empty: the norm is an all-reduce.
        # max_norm=inf measures without clipping.
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.device.type == "cuda" and not self.sharded:
            # The fused AdamW skips a non-finite step on the device (found_inf): no host sync between the
            # backward and the optimizer's launches, which would leave the GPU idle while they are made.
            self.optimizer.found_inf = (~torch.isfinite(norm)).float()
            self.optimizer.step()
        elif torch.isfinite(norm):
            self.optimizer.step()
        # Graphed layers add into gradients that must stay allocated (lora_rl/cuda_graphs.py).
        self.optimizer.zero_grad(set_to_none=self.graphed is None)
        return float(norm)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable tensors on rank 0 (empty elsewhere); collective under sharding."""
        if self.sharded:
            # ignore_frozen_params still lets a frozen weight tied to another (lm_head/embeddings) through.
            state = get_model_state_dict(self.model, options=_GATHER)
            return {k: v for k, v in state.items() if k in self.trainable_names}
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def save_adapter(self, out_dir: Path) -> Path:
        """Collective: every rank gathers, rank 0 writes the PEFT folder."""
        if not self.use_lora:
            raise RuntimeError("no adapter to save: lora.use_lora is false")
        state = self.trainable_state()
        if distributed.is_main():
            save_adapter(self.model, out_dir, self.base_model_path, state_dict=state if self.sharded else None)
        distributed.barrier()
        return out_dir

    def save_state(self, folder: Path) -> None:
        """Collective. Adapter and optimizer state into `folder`: sharded (each rank writes its own
        shards with torch.distributed.checkpoint) under FSDP2, one state.pt otherwise."""
        if self.sharded:
            dcp.save(self._sharded_state(), checkpoint_id=str(folder))
            return
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict()},
                   folder / "state.pt")

    def load_state(self, folder: Path) -> None:
        """Collective inverse of save_state; the process count must match the saving run's."""
        if self.sharded:
            # The saved tensors' shapes against the model's first, as for one process: a changed model.path
            # failed inside dcp.load as if the checkpoint were damaged. Every rank reads the same metadata,
            # so all of them refuse together.
            saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
            check_saved_shapes(dict(self.model.named_parameters()),
                               {name.removeprefix("model."): torch.empty(meta.size, device="meta")
                                for name, meta in saved.items() if name.startswith("model.")}, folder)
            state = self._sharded_state()
            try:
                dcp.load(state, checkpoint_id=str(folder))
            except CheckpointException as err:
                # A BaseException, which the resume's handling of a damaged checkpoint (a RuntimeError, an
                # OSError...) let through as a traceback from every rank: raise the first rank's cause instead.
                cause = next((exc for exc, _ in err.failures.values()), err)  # (exception, its stack) by rank
                raise RuntimeError(f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__) from None
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
            return
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        named = dict(self.model.named_parameters())
        check_saved_shapes(named, state["trainable"], folder)
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])

    def _sharded_state(self) -> dict:
        model = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": {k: v for k, v in model.items() if k in self.trainable_names},
                "optim": get_optimizer_state_dict(self.model, self.optimizer)}
