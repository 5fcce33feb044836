"""Predicted peak training memory per device, for LoRA and full fine-tuning, from the model's shape.

An analytic count of what the GRPO update holds at its peak (the backward pass of one micro-batch):

  weights      base weights in the model dtype, sharded over the devices by FSDP2, plus the two
               decoder layers FSDP2 keeps gathered (the one computing and the one prefetched);
               with CPU offload only the gathered layers sit on the device; with
               backend.reshard_after_forward=false every layer stays gathered from its forward to its
               backward, so at the peak the whole model is gathered besides the shards. Megatron (as
               `train` runs it: tensor_parallel=1, data parallel over processes) holds the whole model
               on every process, and its adapters, their gradients and AdamW's state too
  trainable    LoRA (or all) parameters and their gradients in the model dtype (lora-rl keeps adapters
               in the model dtype), and AdamW's two moments, sharded; with a 16-bit model and
               train.master_weights (the default) the moments are float32 and a float32 master copy
               joins them (12 bytes per trained parameter), otherwise the moments are in the model dtype
  activations  what each decoder layer saves for backward, per token. Eager layers: about 10
               hidden-size vectors (norm inputs/outputs, q/attention output, residuals) plus 4 MLP-size
               ones (gate, up, activation, product) and k/v. Compiled layers (backend.compile, GPUs),
               counted from what torch.compile's partitioner saves: the two residual inputs and the two
               norm outputs, q, k, v and the attention output, gate, up and silu(gate)*up, and each
               adapter's rank-r intermediate; with backend.compile_memory_budget below 1 it recomputes
               the norm outputs and silu(gate)*up instead. A fused LoRA MLP (train.fused_mlp, gate, up
               and down adapted; SiLU-gated with separate linears, so not Gemma's or Phi-3's) never keeps
               silu(gate)*up: its backward rebuilds it in registers. With activation checkpointing only each
               layer's input, plus one layer recomputed
  logits       plain: [tokens, vocab] in the model dtype, upcast to float32 (16-bit models), log-softmax
               and its gradient: 14 bytes per element in bf16, 12 in float32 - at small scale the
               largest term; chunked (the default, train.chunked_logprobs, FSDP2 only): one slice of
               at most 2^26 elements at a time. Megatron always forms the plain logits, and so does a
               model that transforms its head's output (Gemma-2's softcapping, Cohere's logit scale)

The micro-batch is what the update really runs: train.micro_batch_size, at most a minibatch
(each rank's share of the batch over grpo.minibatches). Megatron's fused layers count as their
Hugging Face members (a q_proj target adapts q, k and v: `backends.adapter_lora`).

The GPU anchors of FIELD_NOTES section 6 and CPU runs in tests/test_estimate.py check it; the README
states the error. It ignores allocator fragmentation and the CUDA context (~0.5 GiB outside torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lora_rl.config import BackendConfig, ConfigError

GIB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ACT_HIDDEN, _ACT_MLP = 10, 4  # saved vectors per token per eager layer (see the module docstring)
# Per logit element besides the logits themselves: log-softmax and its gradient in float32, plus the
# float32 upcast of 16-bit logits (a float32 model's logits are used as they are).
_LOGIT_EXTRA_BYTES, _UPCAST_BYTES = 8, 4
_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Decoders whose MLP has no gate (up, activation, down): the estimator's gate/up/down count does not fit.
_UNGATED = ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "starcoder2", "mpt",
            "codegen")
# Layouts that fuse some of them into one linear (Phi-3): one adapter on the fused layer.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Model types with that layout, and the linears all-linear adapts there (peft finds four, not seven).
_FUSED_LAYOUTS = ("phi3",)
_FUSED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied: bool
    fused: bool = False  # q/k/v and gate/up are one linear each (Phi-3): all-linear adapts _FUSED_MODULES
    # The model changes its head's output (Gemma-2's softcapping, Cohere's and Granite's logit scale), which
    # the sliced head cannot see: lora_rl.batching forms its plain logits whatever train.chunked_logprobs says.
    transforms_logits: bool = False
    silu: bool = True  # the MLP's gate is SiLU, which train.fused_mlp needs (Gemma's is GELU)

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        if getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0):
            raise ConfigError("the memory estimator covers dense models only (this config has experts)")
        if getattr(cfg, "model_type", "") in _UNGATED:  # one up and one down projection: a quarter fewer weights
            raise ConfigError(f"the memory estimator covers Llama/Qwen-style decoders (gate, up and down MLPs); "
                              f"this {type(cfg).__name__} has a two-layer MLP")
        needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [name for name in needed if getattr(cfg, name, None) is None]
        if missing:  # e.g. GPT-2 names its sizes n_embd, n_layer, ...: a layout the estimator does not model
            raise ConfigError(f"the memory estimator covers Llama/Qwen-style decoders (gate, up and down MLPs); "
                              f"this {type(cfg).__name__} has no {', '.join(missing)}")
        heads = cfg.num_attention_heads
        return cls(hidden_size=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                   fused=getattr(cfg, "model_type", "") in _FUSED_LAYOUTS,
                   transforms_logits=(getattr(cfg, "final_logit_softcapping", None) is not None
                                      or getattr(cfg, "logit_scale", None) not in (None, 1)
                                      or getattr(cfg, "logits_scaling", None) not in (None, 1)),
                   # Gemma-2 and -3 name it hidden_activation (their hidden_act is unset)
                   silu=(getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None))
                   in ("silu", "swish"))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, and of the fused layers some layouts have."""
        h, q, kv, i = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "qkv_proj": (h, q + 2 * kv),
                "gate_up_proj": (h, 2 * i)}

    def layer_params(self) -> int:
        shapes = self.linear_shapes()
        return sum(a * b for a, b in (shapes[name] for name in _MODULES)) + 2 * self.hidden_size  # + two norms

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.hidden_size


def _targets(target_modules, fused: bool = False) -> tuple[str, ...]:
    all_linear = _FUSED_MODULES if fused else _MODULES
    targets = all_linear if "all-linear" in target_modules else tuple(target_modules)
    unknown = [t for t in targets if t not in _MODULES and t not in _FUSED]
    if unknown:
        raise ConfigError(f"lora.target_modules: {unknown} are not decoder linear layers the estimator knows "
                          f"({list(_MODULES) + list(_FUSED)})")
    return targets


def _members(targets) -> set[str]:
    """The separate layers the targets cover (a fused layer covers its members)."""
    return {member for t in targets for member in _FUSED.get(t, (t,))}


def lora_params(shape: ModelShape, rank: int, target_modules) -> int:
    """Parameters of a rank-r adapter on the named modules of every layer (all-linear: all seven, or
    the four of a fused layout)."""
    targets = _targets(target_modules, shape.fused)
    return shape.layers * sum(rank * (a + b) for name, (a, b) in shape.linear_shapes().items() if name in targets)


def saved_per_token(shape: ModelShape, *, compiled: bool, memory_budget: float = 1.0, adapter_rank: int = 0,
                    target_modules=("all-linear",), fused_mlp: bool = True) -> int:
    """Elements one decoder layer saves for its backward, per token (see the module docstring).
    adapter_rank 0: full fine-tuning. tests/test_estimate.py checks the compiled counts against what
    a compiled layer saves."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if not compiled:
        return _ACT_HIDDEN * h + _ACT_MLP * i + 2 * kv
    targets = _targets(target_modules, shape.fused)
    adapters = adapter_rank * len(targets)
    if memory_budget < 1.0:  # norm outputs and silu(gate)*up recomputed in the backward
        return 2 * h + 2 * q + 2 * kv + 2 * i + adapters
    # train.fused_mlp needs a SiLU gate and separate gate_proj, up_proj and down_proj (lora_rl.fused_mlp):
    # not Gemma's GELU, not Phi-3's gate_up_proj
    mlp_fused = (fused_mlp and adapter_rank and shape.silu and not shape.fused
                 and {"gate_proj", "up_proj", "down_proj"} <= _members(targets))
    return 4 * h + 2 * q + 2 * kv + (2 if mlp_fused else 3) * i + adapters


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    weights_gib: float
    trainable_gib: float  # parameters + gradients + AdamW moments of what trains
    activations_gib: float
    logits_gib: float
    total_gib: float
    trainable_params: int
    total_params: int

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_memory(shape: ModelShape, *, use_lora: bool = True, rank: int = 16, target_modules=("all-linear",),
                    dtype: str = "bfloat16", devices: int = 1, micro_batch_size: int = 8, seq_len: int = 1024,
                    activation_checkpointing: bool = False, cpu_offload: bool = False,
                    chunked_logprobs: bool = True, master_weights: bool = True, compiled: bool = False,
                    memory_budget: float = BackendConfig().compile_memory_budget,
                    fused_mlp: bool = True, backend: str = "fsdp2",
                    reshard_after_forward: bool = True) -> MemoryEstimate:
    """Peak memory per device of one GRPO update (see the module docstring for the terms).
    compiled: the decoder layers run through torch.compile (backend.compile on GPUs), with
    memory_budget as backend.compile_memory_budget (the same default). backend: "fsdp2" or "megatron"."""
    if backend not in ("fsdp2", "megatron"):
        raise ConfigError(f"backend={backend!r}: the estimator models fsdp2 and megatron")
    if dtype not in _BYTES:
        raise ConfigError(f"dtype={dtype!r} is not one of {list(_BYTES)}")
    if devices < 1 or micro_batch_size < 1 or seq_len < 1:
        raise ConfigError("devices, micro_batch_size and seq_len must be at least 1")
    if not 0.0 < memory_budget <= 1.0:
        raise ConfigError(f"memory_budget={memory_budget!r} must be in (0, 1], as backend.compile_memory_budget")
    b = _BYTES[dtype]
    total = shape.total_params()
    megatron = backend == "megatron"
    shards = 1 if megatron else devices  # Megatron's data-parallel replicas each hold everything
    sharded = devices > 1 or cpu_offload
    if megatron:
        gathered = 0
    elif sharded and not reshard_after_forward:
        gathered = total * b  # every layer gathered from its forward to its backward
    else:
        gathered = (2 * shape.layer_params() if sharded else 0) * b
    resident = 0 if cpu_offload and not megatron else total * b / shards
    weights = resident + gathered
    trainable = lora_params(shape, rank, target_modules) if use_lora else total
    # parameters (base ones already counted for full fine-tuning) + gradients + AdamW's state: two
    # moments, plus a float32 master copy for 16-bit weights under train.master_weights (lora_rl/optim.py)
    state = 12 if master_weights and b < 4 else 2 * b
    trainable_bytes = trainable * (b * ((1 if use_lora else 0) + 1) + state) / shards
    if cpu_offload and not megatron:
        trainable_bytes = 0.0  # shards, gradients and optimizer state live in CPU memory
    tokens = micro_batch_size * seq_len
    per_layer = tokens * b * saved_per_token(shape, compiled=compiled, memory_budget=memory_budget,
                                             adapter_rank=rank if use_lora else 0, target_modules=target_modules,
                                             fused_mlp=fused_mlp)
    if activation_checkpointing:
        activations = shape.layers * tokens * shape.hidden_size * b + per_layer
    else:
        activations = shape.layers * per_layer
    elements = tokens * shape.vocab_size
    # one checkpointed slice lives at a time (lora_rl.batching._CHUNK_ELEMENTS)
    if chunked_logprobs and not megatron and not shape.transforms_logits:
        from lora_rl.batching import _CHUNK_ELEMENTS

        elements = min(elements, _CHUNK_ELEMENTS)
    logits = elements * (b + _LOGIT_EXTRA_BYTES + (_UPCAST_BYTES if b < 4 else 0))
    peak = weights + trainable_bytes + activations + logits
    return MemoryEstimate(weights_gib=weights / GIB, trainable_gib=trainable_bytes / GIB,
                          activations_gib=activations / GIB, logits_gib=logits / GIB, total_gib=peak / GIB,
                          trainable_params=trainable, total_params=total)


def estimate_for_config(config, *, seq_len: int | None = None, devices: int = 1,
                        use_lora: bool | None = None) -> MemoryEstimate:
    """The estimate for a run config: its model, LoRA settings, backend options and micro-batch.
    use_lora: override the config's (False: the same run training every weight; Megatron trains
    adapters only, so that is the run on FSDP2)."""
    from lora_rl.models import model_config

    shape = ModelShape.from_config(model_config(config.model.path))
    if seq_len is None:  # prompt budget as long as the completion budget: a rough default
        seq_len = 2 * config.rollout.max_new_tokens
    use_lora = config.lora.use_lora if use_lora is None else use_lora
    backend = config.backend.name if use_lora else "fsdp2"
    return estimate_memory(shape, use_lora=use_lora, rank=config.lora.lora_rank, seq_len=seq_len,
                           **training_options(config, backend=backend, devices=devices))


def training_options(config, backend: str | None = None, *, devices: int = 1) -> dict:
    """The `estimate_memory` settings a run config fixes besides the model, the rank and the sequence
    length: targets, devices, micro-batch, dtype, backend and training options. backend: the config's
    unless given (full fine-tuning is estimated on fsdp2). `lora-rl estimate` and the LoRA panel both
    reach it through `estimate_for_config`, with the config the run would use."""
    import dataclasses

    from lora_rl.backends import adapter_lora
    from lora_rl.lora import hf_target_names
    from lora_rl.trainer import check_batch_split, check_offload

    check_batch_split(config, devices)  # as `train --nproc` does: a share no run can have is no estimate
    check_offload(config, devices)
    backend = backend or config.backend.name
    if backend == "megatron":  # Megatron adapts fused layers whole: count what it trains
        config = dataclasses.replace(config, backend=dataclasses.replace(config.backend, name="megatron"))
        target_modules = adapter_lora(config).target_modules
    else:  # FSDP2 reads Megatron names (linear_qkv, ...) as the layers they fuse
        target_modules = hf_target_names(config.lora.target_modules)
    # Each rank's share of the batch, split into minibatches before the micro-batches (trainer.grpo_update).
    batch = config.rollout.prompts_per_step * config.rollout.group_size // devices
    minibatch = batch // config.grpo.minibatches
    return dict(target_modules=tuple(target_modules), devices=devices,
                micro_batch_size=max(1, min(config.train.micro_batch_size, minibatch)),
                dtype=config.model.dtype, activation_checkpointing=config.backend.activation_checkpointing,
                cpu_offload=config.backend.cpu_offload, chunked_logprobs=config.train.chunked_logprobs,
                master_weights=config.train.master_weights,
                # the FSDP2 backend compiles its layers on GPUs (the estimate is for a GPU run)
                compiled=config.backend.compile and backend == "fsdp2",
                memory_budget=config.backend.compile_memory_budget,
                fused_mlp=config.train.fused_lora and config.train.fused_mlp, backend=backend,
                reshard_after_forward=config.backend.reshard_after_forward)
