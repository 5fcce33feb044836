"""Typed run configuration: small frozen dataclasses, YAML in and out, `key.sub=value` overrides.

A YAML file is just these dataclasses serialised. Loading checks every key and type and each
section validates its own fields; checks that need two sections (the support matrix) or the model
(target modules, mixture-of-experts) live in `lora_rl.support` and `lora_rl.lora`.
The LoRA section uses AReaL's vocabulary (`use_lora`, `lora_rank`, `lora_alpha`, `target_modules`,
`peft_type`) so an AReaL user can carry their settings over.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
import math
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem: the message names the field, the value and the fix."""


def _fail(section: str, name: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{section}.{name}={value!r} {why}")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: plain PyYAML keeps the last one,
    and a second `lora:` section would silently replace the first one's keys with defaults."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping: keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_text(text: str):
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    SECTION: ClassVar[str] = "run"
    output_dir: str = "runs/quickstart"  # run folder: config.yaml, metrics.jsonl, checkpoints/, adapter/, summary.json
    seed: int = 0  # seeds data order, initialisation and sampling
    steps: int = 100  # GRPO steps (one rollout batch and its policy update each)
    checkpoint_every: int = 25  # steps between checkpoints; the last step always checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    progress: bool = True  # show a progress bar (switch off for headless papermill runs)

    def __post_init__(self) -> None:
        if not self.output_dir:
            _fail(self.SECTION, "output_dir", self.output_dir, "is empty: name a folder for the run, e.g. runs/my-run")
        # "~/runs/x" after `run.output_dir=` or in YAML reaches no shell: without this it makes a folder named "~"
        object.__setattr__(self, "output_dir", os.path.expanduser(self.output_dir))
        if not -2 ** 31 <= self.seed < 2 ** 31:  # seeds are combined with step and sample numbers in 64 bits
            _fail(self.SECTION, "seed", self.seed, "is out of range: choose a seed between -2**31 and 2**31 - 1")
        for name in ("steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                _fail(self.SECTION, name, getattr(self, name), "must be at least 1")
        if self.checkpoint_every < 0:
            _fail(self.SECTION, "checkpoint_every", self.checkpoint_every, "must be >= 0 (0: only at the end)")


DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    SECTION: ClassVar[str] = "model"
    path: str = "tiny-arith"  # a built-in model (tiny-arith, smollm2-135m) or a Hugging Face model folder
    dtype: str = "float32"  # weights and LoRA adapters share this dtype (float32, bfloat16, float16)

    def __post_init__(self) -> None:
        if not self.path:
            _fail(self.SECTION, "path", self.path, "is empty: use tiny-arith, smollm2-135m or a model folder")
        if self.dtype not in DTYPES:
            _fail(self.SECTION, "dtype", self.dtype, f"is not a supported dtype: choose one of {', '.join(DTYPES)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoRAConfig:
    SECTION: ClassVar[str] = "lora"
    use_lora: bool = True  # false trains every weight (full fine-tuning), for comparisons
    peft_type: str = "lora"  # only plain LoRA: DoRA and friends are not served by vLLM or SGLang
    lora_rank: int = 16  # r; 8-64 is the useful range, 16-32 a good start
    lora_alpha: float = 16  # scaling is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the LoRA input; 0 keeps trainer and rollout logprobs identical
    target_modules: tuple[str, ...] = ("all-linear",)  # module names, or all-linear (every linear but the output head)

    def __post_init__(self) -> None:
        if self.peft_type != "lora":
            _fail(self.SECTION, "peft_type", self.peft_type,
                  "is not supported: only peft_type: lora (rollout engines load plain LoRA adapters only)")
        if self.lora_rank <= 0:
            _fail(self.SECTION, "lora_rank", self.lora_rank, "must be a positive integer: try 16 or 32")
        if self.lora_alpha <= 0:
            _fail(self.SECTION, "lora_alpha", self.lora_alpha, "must be positive: try lora_alpha equal to lora_rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail(self.SECTION, "lora_dropout", self.lora_dropout, "must be in [0, 1): use 0.0 for RL")
        if not self.target_modules:
            _fail(self.SECTION, "target_modules", list(self.target_modules),
                  "is empty: use [all-linear] or names such as [q_proj, v_proj]")


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendConfig:
    SECTION: ClassVar[str] = "backend"
    name: str = "fsdp2"  # training engine: fsdp2 | megatron | archon (see lora_rl/support.py)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~1/3 more compute
    cpu_offload: bool = False  # FSDP2: keep parameter shards and gradients in CPU memory (GPU runs only)
    meta_init: bool = True  # with several processes, start on the meta device and read only each rank's shards
    reshard_after_forward: bool = True  # FSDP2: false keeps each layer gathered until its backward (less traffic)
    bridge: str = "megatron-bridge"  # Megatron: HF <-> Megatron converter; mbridge has no LoRA path
    compile: bool = True  # on GPUs, torch.compile each decoder layer for scoring and training (sampling stays eager); CPU: ignored
    tensor_parallel: int = 1  # Megatron: tensor-parallel size (processes per model replica)
    # Compiled layers: the fraction of saved activations kept, the rest recomputed in the backward, cheapest
    # first. 0.9 recomputes the norms' outputs and silu(gate)*up: at 1.5B on an H100, 26% less memory for
    # LoRA (14.5 against 19.6 GiB) for a few % of step time, 14% for full fine-tuning (README); 1 keeps all.
    compile_memory_budget: float = 0.9
    cuda_graphs: bool = False  # one GPU, FSDP2: replay each decoder layer's training pass as CUDA graphs; CPU: ignored

    def __post_init__(self) -> None:
        if not 0.0 < self.compile_memory_budget <= 1.0:
            _fail(self.SECTION, "compile_memory_budget", self.compile_memory_budget,
                  "must be in (0, 1]: 1 keeps every activation the compiled layers save, 0.9 recomputes cheap ones")
        if self.cuda_graphs and self.activation_checkpointing:
            _fail(self.SECTION, "cuda_graphs", self.cuda_graphs, "replays whole layers, which activation "
                  "checkpointing re-runs in the backward: set backend.activation_checkpointing=false or "
                  "backend.cuda_graphs=false")
        if self.bridge not in ("megatron-bridge", "mbridge"):
            _fail(self.SECTION, "bridge", self.bridge, "must be megatron-bridge or mbridge")
        if self.tensor_parallel < 1:
            _fail(self.SECTION, "tensor_parallel", self.tensor_parallel, "must be at least 1")
        if self.tensor_parallel > 1 and self.name != "megatron":
            _fail(self.SECTION, "tensor_parallel", self.tensor_parallel,
                  f"is for backend.name=megatron; {self.name} shards with FSDP2 instead: leave it at 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutConfig:
    SECTION: ClassVar[str] = "rollout"
    engine: str = "embedded"  # embedded (in-process transformers) | vllm | vllm-server | sglang
    prompts_per_step: int = 16  # prompts sampled per GRPO step
    group_size: int = 8  # completions per prompt; advantages are normalised within each group
    max_new_tokens: int = 32  # completion length limit
    temperature: float = 1.0  # sampling temperature; the trainer scores tokens at the same temperature
    top_p: float = 1.0  # nucleus sampling; below 1 the loss sees slightly off-policy samples
    merge_for_generation: bool = True  # embedded engine: fold the adapter into the weights while sampling
    cuda_graphs: bool = True  # embedded engine on one GPU: each generated token's forward is a CUDA graph replay; CPU: ignored
    # Adapter-loading engines (vllm in-process; vllm-server and sglang over HTTP); ignored by the embedded engine.
    server_url: str = ""  # vllm-server, sglang: attach to this running server; empty: launch one on 127.0.0.1
    max_lora_rank: int = 0  # the engine's LoRA slot size; 0: vLLM's smallest allowed rank >= lora_rank, SGLang's lora_rank
    live_versions: int = 2  # adapter versions kept loaded; older ones are unloaded, then their folders deleted
    max_sync_logprob_diff: float | None = None  # stop if engine and trainer logprobs differ more; null: by dtype
    probe_size: int = 4  # sequences re-scored by engine and trainer after each sync to verify delivery
    engine_memory: float = 0.15  # vLLM gpu_memory_utilization / SGLang mem_fraction_static (the trainer shares the card)
    kv_cache_gib: float = 1.0  # vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    request_timeout: float = 300.0  # seconds one HTTP request to the server may take
    startup_timeout: float = 600.0  # seconds a launched server may take to become healthy
    on_server_failure: str = "restart"  # a launched server that dies: restart it (reload the adapter) | fail
    api_key_env: str = ""  # environment variable holding the server's API key (sent as a bearer token)
    # SGLang's LoRA pool, sized at start-up (every version must fit it; see lora_rl/rollout/sglang_server.py).
    lora_target_modules: tuple[str, ...] = ()  # sglang: modules the pool covers ([all] or names); empty: lora.target_modules
    max_loaded_loras: int = 0  # sglang: adapters the server holds at once; 0: live_versions + 1 (one draining)
    max_loras_per_batch: int = 2  # sglang: adapters one batch may mix (a draining version and the newest)

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            _fail(self.SECTION, "prompts_per_step", self.prompts_per_step, "must be at least 1")
        if self.group_size < 2:
            _fail(self.SECTION, "group_size", self.group_size,
                  "must be at least 2: GRPO compares completions of the same prompt")
        if self.max_new_tokens < 1:
            _fail(self.SECTION, "max_new_tokens", self.max_new_tokens, "must be at least 1")
        if self.temperature <= 0:
            _fail(self.SECTION, "temperature", self.temperature,
                  "must be positive: RL needs sampling (evaluation is greedy on its own)")
        if not 0.0 < self.top_p <= 1.0:
            _fail(self.SECTION, "top_p", self.top_p, "must be in (0, 1]")
        if self.server_url and not self.server_url.startswith(("http://", "https://")):
            _fail(self.SECTION, "server_url", self.server_url, "must start with http:// or https://, "
                  "e.g. http://127.0.0.1:8000 (or leave it empty to launch a server)")
        parts = urllib.parse.urlsplit(self.server_url)
        api = self.server_url.find("/v1", len(parts.scheme) + 3 + len(parts.netloc))  # in the path only
        if api >= 0 and self.server_url[api + 3:api + 4] in ("", "/"):
            # "http://host:8000/v1", the OpenAI-style base URL: every request (/v1/completions, /health) 404ed
            # under it. A path before /v1 stays: a proxy may serve the server under one.
            _fail(self.SECTION, "server_url", self.server_url, f"must be the server's root, without "
                  f"{self.server_url[api:]!r}: e.g. {self.server_url[:api]} (lora-rl adds /v1/... and the other "
                  "paths itself)")
        if self.max_lora_rank < 0:
            _fail(self.SECTION, "max_lora_rank", self.max_lora_rank, "must be 0 (automatic) or a LoRA rank")
        if self.max_loaded_loras < 0:
            _fail(self.SECTION, "max_loaded_loras", self.max_loaded_loras, "must be 0 (automatic) or more")
        if self.max_loras_per_batch < 1:
            _fail(self.SECTION, "max_loras_per_batch", self.max_loras_per_batch, "must be at least 1")
        if self.live_versions < 1:
            _fail(self.SECTION, "live_versions", self.live_versions,
                  "must be at least 1: the engine needs the current adapter loaded")
        if self.max_sync_logprob_diff is not None and self.max_sync_logprob_diff <= 0:
            _fail(self.SECTION, "max_sync_logprob_diff", self.max_sync_logprob_diff,
                  "must be positive, or null for the default by dtype")
        if self.probe_size < 0:
            _fail(self.SECTION, "probe_size", self.probe_size, "must be 0 (no delivery check) or more")
        if not 0.0 < self.engine_memory < 1.0:
            _fail(self.SECTION, "engine_memory", self.engine_memory, "must be in (0, 1): a fraction of GPU memory")
        if self.on_server_failure not in ("restart", "fail"):
            _fail(self.SECTION, "on_server_failure", self.on_server_failure, "must be restart or fail")
        if self.api_key_env and self.api_key_env not in os.environ:
            _fail(self.SECTION, "api_key_env", self.api_key_env, "names an environment variable that is not set: "
                  "export it with the server's API key, or leave api_key_env empty")
        for name in ("kv_cache_gib", "request_timeout", "startup_timeout"):
            if getattr(self, name) <= 0:
                _fail(self.SECTION, name, getattr(self, name), "must be positive")


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskConfig:
    SECTION: ClassVar[str] = "task"
    name: str = "arithmetic"  # arithmetic (synthetic, GSM8K-formatted) | gsm8k
    # arithmetic only: 1 (1-digit sums) .. 5 (3-digit sums and differences); gsm8k ignores it, as a knob for another
    # task, so that a recipe's task can be switched with task.name alone
    difficulty: int = 2
    # gsm8k folder holding train.jsonl/test.jsonl; empty: ../shared/data/gsm8k or $LORA_RL_GSM8K_DIR. Refused with
    # arithmetic: it names the data the run should train on, and arithmetic would silently train on its own
    data_dir: str = ""
    reward: str = ""  # reward function name (lora_rl.rewards); empty: the task's own

    def __post_init__(self) -> None:
        if self.name not in ("arithmetic", "gsm8k"):
            _fail(self.SECTION, "name", self.name, "is not a task: choose arithmetic or gsm8k")
        if not 1 <= self.difficulty <= 5:
            _fail(self.SECTION, "difficulty", self.difficulty, "is out of range: choose 1..5")
        if self.data_dir and self.name != "gsm8k":
            _fail(self.SECTION, "data_dir", self.data_dir,
                  f"is set but task.name={self.name!r} makes its own problems: task.data_dir applies to "
                  "task.name=gsm8k: set task.name=gsm8k or clear task.data_dir")
        object.__setattr__(self, "data_dir", os.path.expanduser(self.data_dir))  # "~/data/gsm8k": no shell expands it


KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True, kw_only=True, slots=True)
class GRPOConfig:
    SECTION: ClassVar[str] = "grpo"
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.28  # ratio clipped above at 1 + clip_high (DAPO's clip-higher)
    scale_std: bool = True  # divide group advantages by the group's std (false: Dr. GRPO style)
    kl_coef: float = 0.0  # weight of the KL penalty against the base model (adapter switched off)
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman's estimators)
    importance_cap: float | None = 5.0  # decoupled PPO: drop tokens whose behaviour weight exceeds this; null: off
    minibatches: int = 1  # optimizer steps per rollout batch; more than 1 makes later minibatches off-policy
    log_kl: bool = True  # record the KL to the base model even when kl_coef is 0 (one extra no-grad forward)
    # With one minibatch and no LoRA dropout the proximal log-probs are the training pass's own, detached
    # (nothing changes the policy before the update's one optimizer step); true scores them in a separate
    # no-grad pass first, as every update with several minibatches does
    recompute_proximal: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.clip_low < 1.0:
            _fail(self.SECTION, "clip_low", self.clip_low, "must be in (0, 1): try 0.2")
        if self.clip_high <= 0.0:
            _fail(self.SECTION, "clip_high", self.clip_high, "must be positive: try 0.28")
        if self.kl_coef < 0.0:
            _fail(self.SECTION, "kl_coef", self.kl_coef, "must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            _fail(self.SECTION, "kl_estimator", self.kl_estimator, f"is unknown: choose one of {', '.join(KL_ESTIMATORS)}")
        if self.importance_cap is not None and self.importance_cap <= 1.0:
            _fail(self.SECTION, "importance_cap", self.importance_cap, "must be above 1 (or null to switch it off)")
        if self.minibatches < 1:
            _fail(self.SECTION, "minibatches", self.minibatches, "must be at least 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    SECTION: ClassVar[str] = "train"
    lr: float = 2e-3  # AdamW learning rate; LoRA wants about 10x a full fine-tune's
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 switches clipping off
    micro_batch_size: int = 64  # sequences per forward/backward; gradients accumulate over the minibatch
    max_bad_updates: int = 3  # consecutive updates skipped for a NaN/inf loss or gradient before the run stops
    chunked_logprobs: bool = True  # the head computes log-probs slice by slice: no [B, T, V] float32 logits
    master_weights: bool = True  # 16-bit weights get a float32 copy in AdamW (lora_rl/optim.py); false: pure 16-bit AdamW
    fused_lora: bool = True  # each LoRA linear as one fused op with its own backward (lora_rl/fused_lora.py); false: peft's forward
    fused_mlp: bool = True  # with fused_lora: each SiLU-gated MLP as one op, its backward one Triton kernel on GPUs (lora_rl/fused_mlp.py)
    fused_qkv: bool = True  # with fused_lora: each attention's q, k, v projections as one LoRA linear (lora_rl/fused_qkv.py)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            _fail(self.SECTION, "lr", self.lr, "must be positive: try 2e-5 for LoRA on a real model")
        if self.weight_decay < 0:
            _fail(self.SECTION, "weight_decay", self.weight_decay, "must be >= 0")
        if self.max_grad_norm < 0:
            _fail(self.SECTION, "max_grad_norm", self.max_grad_norm, "must be >= 0 (0: no clipping)")
        if self.micro_batch_size < 1:
            _fail(self.SECTION, "micro_batch_size", self.micro_batch_size, "must be at least 1")
        if self.max_bad_updates < 1:
            _fail(self.SECTION, "max_bad_updates", self.max_bad_updates, "must be at least 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    SECTION: ClassVar[str] = "eval"
    size: int = 200  # held-out problems scored with greedy decoding before and after training
    every: int = 0  # also evaluate every N steps (0: only before and after)

    def __post_init__(self) -> None:
        if self.size < 0:
            _fail(self.SECTION, "size", self.size, "must be >= 0 (0 skips evaluation)")
        if self.every < 0:
            _fail(self.SECTION, "every", self.every, "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # Checks that span sections but need no model; the support matrix is consulted in one place.
        from lora_rl.support import check_support

        check_support(self)
        if self.grpo.kl_coef > 0 and not self.lora.use_lora:
            raise ConfigError(
                f"grpo.kl_coef={self.grpo.kl_coef} needs lora.use_lora=true: the reference policy is the base "
                "model with the adapter switched off; full fine-tuning would need a second model copy. "
                "Set grpo.kl_coef=0 or lora.use_lora=true.")
        if self.backend.name == "megatron" and self.backend.bridge == "mbridge" and self.lora.use_lora:
            raise ConfigError("backend.bridge='mbridge' with lora.use_lora=true: mbridge has no LoRA path (AReaL "
                              "requires megatron-bridge for LoRA). Set backend.bridge=megatron-bridge.")
        if self.rollout.engine in ("vllm", "vllm-server"):
            from lora_rl.rollout.vllm_common import check_vllm_config

            check_vllm_config(self)
        if self.rollout.engine == "sglang":
            from lora_rl.rollout.sglang_server import check_sglang_config

            check_sglang_config(self)
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if batch % self.grpo.minibatches:
            raise ConfigError(
                f"grpo.minibatches={self.grpo.minibatches} does not divide the rollout batch of {batch} sequences "
                f"(rollout.prompts_per_step x rollout.group_size): pick a divisor of {batch}.")


# --- loading, saving, overrides ------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check one YAML value against a field's annotation; ints are accepted for floats, a lone
    string for a tuple of strings. Returns the value in the field's type."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(where, value, inner)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where}={value!r} must be a list of strings, e.g. [all-linear]")
        return tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be a whole number")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; users mean the number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}={value!r} must be a number")
        if not math.isfinite(value):  # YAML's .nan and .inf arrive as floats; no setting means either
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML 1.1 reads bare yes/no/on/off/true/false as booleans and digits as numbers; the text the
            # user typed is gone by now, so a boolean's example quotes a placeholder.
            key = where.rsplit(".", 1)[-1]
            if value is None:  # `key:` left empty, `~` or `null`: not a list, and not the text "None" either
                raise ConfigError(f"{where}=null must be a string, but YAML read no value (an empty value, ~ and "
                                  f"null are no value): leave {key} out for its default, or put the text in quotes, "
                                  f"e.g. {key}: \"...\"")
            example = "..." if isinstance(value, bool) else value
            kind = ("true/false" if isinstance(value, bool) else "a number" if isinstance(value, int | float)
                    else "a date" if isinstance(value, datetime.date) else "a list or mapping")
            raise ConfigError(f"{where}={value!r} must be a string, but YAML read the value as {kind} "
                              "(bare yes/no/on/off/true/false and numbers are not strings): "
                              f"put it in quotes, e.g. {key}: \"{example}\"")
        return value
    raise TypeError(f"unhandled annotation {tp!r} for {where}")  # a bug in this file, not user input


def _unknown_key(where: str, key: Any, known: list[str]) -> ConfigError:
    # YAML keys need not be strings (`8:`, or `on:`/`yes:`, which YAML 1.1 reads as true): difflib needs text
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if not isinstance(key, str):
        hint = (f"YAML read this key as {type(key).__name__}, not text; " + hint)
    return ConfigError(f"unknown key {where}{key!r}: {hint}valid keys are {', '.join(known)}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from plain data (parsed YAML). Missing keys take defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections (run, model, lora, ...), got {type(data).__name__}")
    section_types = _field_types(Config)
    sections = {}
    for name, body in data.items():
        if name not in section_types:
            raise _unknown_key("", name, list(section_types))
        cls = section_types[name]
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {body!r}")
        fields = _field_types(cls)
        values = {}
        for key, value in body.items():
            if key not in fields:
                raise _unknown_key(f"{name}.", key, list(fields))
            values[key] = _coerce(f"{name}.{key}", value, fields[key])
        sections[name] = cls(**values)
    return Config(**sections)


def config_to_dict(config: Config) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
    return out


def override(key: str, value: Any) -> str:
    """The `section.key=value` text that `apply_overrides` reads back as `value` itself. Plain text where
    YAML reads it back the same (what users type, and what sweep point ids hash); JSON's quoted form,
    which YAML reads as written, where it would not: a path with " #" (a comment to YAML), the strings
    "null" or "yes", a list item with a comma."""
    if isinstance(value, (list, tuple)):
        text = "[" + ",".join(str(v) for v in value) + "]"
    elif value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
    expected = list(value) if isinstance(value, tuple) else value
    try:
        same = (yaml.safe_load(text) if text else "") == expected
    except yaml.YAMLError:
        same = False
    if not same and isinstance(value, (str, list, tuple)):  # numbers: the config reads "1e-05" as a float
        text = json.dumps(expected)
    return f"{key}={text}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with `section.key=value` overrides applied; values parse as YAML."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections (run, model, lora, ...), got {type(data).__name__}")
    # Sections that are not mappings pass through unchanged for config_from_dict to name.
    out = {k: dict(v) if isinstance(v, dict) else ({} if v is None else v) for k, v in data.items()}
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or path.count(".") != 1:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. lora.lora_rank=32")
        section, key = path.split(".")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.problem})") from None
        body = out.setdefault(section, {})
        if not isinstance(body, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys, got {body!r}")
        body[key] = value
    return out


def find_input(path: str | Path) -> Path:
    """An input (recipe, sweep file, sweep results) named relative to the repository, as the README's commands
    name them, is found from a notebook too: Jupyter runs notebooks in notebooks/. Outputs stay where you are."""
    path = Path(path)
    in_repo = Path(__file__).resolve().parent.parent / path
    if not path.exists() and not path.is_absolute() and in_repo.exists():
        return in_repo
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = find_input(path)
    if path.is_dir():
        saved = path / "config.yaml"  # a run folder: the config its run saved
        raise ConfigError(f"config file {str(path)!r} is a folder: pass a YAML recipe, e.g. "
                          + (f"{str(saved)!r}, the config this run folder saved" if saved.is_file()
                             else "examples/quickstart.yaml"))
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass a YAML file such as examples/quickstart.yaml")
    try:
        data = read_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of sections (run, model, lora, ...), "
                          f"got a {type(data).__name__}")
    return data or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults), apply overrides, validate."""
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides or []):
        # papermill's `-p overrides lora.lora_rank=8` passes a string, which would be read a character at a time
        raise ConfigError(f"overrides={overrides!r} must be a list of section.key=value strings, e.g. "
                          "['lora.lora_rank=8']; from papermill: -y 'overrides: [lora.lora_rank=8]'")
    data = read_yaml(path) if path is not None else {}
    if "recipe" in data and ("grid" in data or "points" in data):
        # `lora-rl train|validate examples/sweep_rank.yaml`: a sweep file read as a config named `recipe` unknown
        raise ConfigError(f"{str(path)!r} is a sweep file (recipe and grid/points), not a run config: run it with "
                          f"`lora-rl sweep {path}` (it validates every point's config before any runs)")
    return config_from_dict(apply_overrides(data, overrides or []))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
