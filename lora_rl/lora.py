"""LoRA through peft: target checks, injection, size reports, PEFT-format save/load, merge.

Departures from plain `get_peft_model`: adapters are kept in the model's dtype (peft would upcast
them to float32, which costs about 1.5x step time on a bf16 model on an H100), a target list that
matches no linear layer is an error listing the layers the model has, and mixture-of-experts
models are refused (lora-rl trains dense models only).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_rl.checkpoint import fsync_tree, plain_file_permissions, replace_dir, temp_dir
from lora_rl.config import ConfigError, LoRAConfig
from lora_rl.fused_lora import SegmentLoRAFunction, lora_linear, plain_adapter, plain_base

# Config attributes that mark a mixture-of-experts model across the common HF families.
_MOE_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def _expert_count(config, prefix: str = "") -> tuple[str, int] | None:
    """(attribute, value) of the first expert count above 1 in `config` or its sub-configs (DBRX keeps it in
    ffn_config, a multimodal model in text_config), else None. A config that says is_moe=false is dense
    whatever its counts (Doge's always carry num_experts, 16384 by default)."""
    if getattr(config, "is_moe", None) is False:
        return None
    for attr in _MOE_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return prefix + attr, value
    for key in getattr(type(config), "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        found = _expert_count(sub, f"{prefix}{key}.") if sub is not None else None
        if found is not None:
            return found
    return None


def check_dense(model_config) -> None:
    """Refuse mixture-of-experts models: LoRA over routed experts is not supported here."""
    found = _expert_count(model_config)
    if found is not None:
        attr, value = found
        raise ConfigError(
            f"model type {model_config.model_type!r} is a mixture-of-experts model ({attr}={value}): "
            "lora-rl trains dense models only; pick a dense model such as Qwen2.5, Llama or SmolLM2")


def linear_shape(module: nn.Module | None) -> tuple[int, int] | None:
    """(in, out) features of a layer peft's LoRA adapts as a linear: nn.Linear, or transformers' Conv1D
    (GPT-2's linears, weight stored [in, out]); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct short names of the linear layers LoRA can target (the output head excluded)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if linear_shape(mod) is not None and mod is not output}
    return sorted(names)


# Megatron's names for the linear layers of a dense decoder and the Hugging Face layers each one holds:
# Megatron fuses q/k/v into linear_qkv and gate/up into linear_fc1.
MEGATRON_TO_HF = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                  "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
HF_TO_MEGATRON = {hf: megatron for megatron, hfs in MEGATRON_TO_HF.items() for hf in hfs}


def hf_target_names(targets) -> tuple[str, ...]:
    """Target names in Hugging Face vocabulary: Megatron names become the layers they fuse, others pass."""
    out = []
    for t in targets:
        out += [n for n in MEGATRON_TO_HF.get(t, (t,)) if n not in out]
    return tuple(out)


def megatron_target_names(targets) -> list[str]:
    """Target names in Megatron vocabulary. Coarser than peft's: one HF projection of a fused layer
    (q_proj, gate_proj, ...) selects the whole fused layer, so its siblings are adapted as well."""
    if "all-linear" in targets:
        return list(MEGATRON_TO_HF)
    unknown = [t for t in targets if t not in HF_TO_MEGATRON and t not in MEGATRON_TO_HF]
    if unknown:
        raise ConfigError(f"lora.target_modules={list(targets)}: {unknown} have no Megatron layer; the Megatron "
                          f"backend adapts {list(MEGATRON_TO_HF)} (or their HF names {list(HF_TO_MEGATRON)}) "
                          "or [all-linear]")
    return [m for m in MEGATRON_TO_HF if m in targets or any(HF_TO_MEGATRON.get(t) == m for t in targets)]


def resolve_targets(model: nn.Module, lora: LoRAConfig) -> str | list[str]:
    """The peft `target_modules` value: "all-linear", or the explicit names (Megatron names translated)
    after checking each exists."""
    available = linear_module_names(model)
    if "all-linear" in lora.target_modules:
        if len(lora.target_modules) > 1:
            raise ConfigError(f"lora.target_modules={list(lora.target_modules)} mixes all-linear with names: "
                              "use [all-linear] alone, or list names only")
        return "all-linear"
    targets = hf_target_names(lora.target_modules)
    missing = [t for t in targets if t not in available]
    # The head and the embedding are layers, left out on purpose: say so rather than call the name wrong.
    ends = {name.rsplit(".", 1)[-1]: role for module, role in
            ((model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None, "output head"),
             (model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None, "input embedding"))
            if module is not None for name, m in model.named_modules() if m is module}
    excluded = [t for t in missing if t in ends]
    if excluded:
        raise ConfigError(f"lora.target_modules={list(lora.target_modules)}: {excluded} is the model's "
                          f"{ends[excluded[0]]}, which lora-rl does not adapt (the rollout engines serve LoRA on the "
                          f"decoder layers' linears only); adapt those instead: {available} (or [all-linear])")
    if missing:
        raise ConfigError(f"lora.target_modules={list(lora.target_modules)}: {missing} match no linear layer in this "
                          f"model; its linear layers are {available} (or use [all-linear])")
    return list(targets)


def check_model(model: nn.Module, lora: LoRAConfig) -> None:
    """Every model-dependent check, for `lora-rl validate` and before training."""
    check_dense(model.config)
    if lora.use_lora:
        targets = resolve_targets(model, lora)
        _warn_rank_above_layers(model, lora, targets)


def _warn_rank_above_layers(model: nn.Module, lora: LoRAConfig, targets: str | list[str]) -> None:
    """A rank above an adapted layer's smaller side is allowed (peft takes it) but buys nothing: B A cannot
    have a rank above min(in, out), so the extra rows only add parameters and, through lora_alpha /
    lora_rank, scale the update down. Tiny test models meet this with the usual ranks, hence a warning."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    smallest = None
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None or module is output or (targets != "all-linear" and name.rsplit(".", 1)[-1] not in targets):
            continue
        if smallest is None or min(shape) < min(smallest[1]):
            smallest = (name, shape)
    if smallest is not None and lora.lora_rank > min(smallest[1]):
        name, (fan_in, fan_out) = smallest
        warnings.warn(f"lora-rl: lora.lora_rank={lora.lora_rank} is above the smaller side of an adapted layer ({name}: "
                      f"{fan_in} in, {fan_out} out): its update cannot have a rank above {min(fan_in, fan_out)}, "
                      f"so the extra rank only adds parameters and scales the update down (lora_alpha / lora_rank). "
                      f"Use lora.lora_rank <= {min(fan_in, fan_out)}, or leave that layer out of lora.target_modules",
                      UserWarning, stacklevel=2)


def check_config(config, *, data: bool = True) -> None:
    """Every check that runs before training starts beyond the config's own: the model's shape against
    the LoRA settings and the rollout engine (layers it serves LoRA on, head sizes), the reward's name,
    and (data) that the task's problems load. `lora-rl validate`,
    the LoRA panel (without data: it re-checks on every change) and a sweep's validation call it."""
    from lora_rl.models import built_folder, load_tokenizer, meta_model
    from lora_rl.rewards import get_reward

    from lora_rl.backends import check_backend_config

    model = meta_model(config.model.path)
    check_model(model, config.lora)
    check_backend_config(config, model.config)
    if config.rollout.engine in ("vllm", "vllm-server"):
        from lora_rl.rollout.vllm_common import check_model_for_engine

        check_model_for_engine(model, config)
    if config.rollout.engine == "sglang":
        from lora_rl.rollout.sglang_server import check_model_for_pool

        check_model_for_pool(model, config)
    get_reward(config.task.reward or config.task.name)
    from lora_rl.rollout.embedded import sliding_window
    from lora_rl.tasks import check_prompt_lengths, load_problems

    context = getattr(model.config, "max_position_embeddings", None)
    window = sliding_window(model.config) if config.rollout.engine == "embedded" else None
    check_prompt_lengths([], None, config.rollout.max_new_tokens, split="train", context=context, window=window)
    if data:
        # The sets as train loads them; their prompts are measured where the tokenizer exists without a build
        # (a built-in model not built yet is measured when train starts).
        folder = built_folder(config.model.path)
        tokenizer = load_tokenizer(folder) if folder is not None else None
        for split, limit in (("train", None), ("test", config.eval.size)):
            problems = load_problems(config.task.name, split=split, seed=config.run.seed,
                                     difficulty=config.task.difficulty, data_dir=config.task.data_dir or None,
                                     limit=limit, reward=config.task.reward)
            check_prompt_lengths(problems, tokenizer, config.rollout.max_new_tokens,
                                 split="eval" if split == "test" else split, context=context, window=window)


def _peft_config(lora: LoRAConfig, targets: str | list[str]) -> LoraConfig:
    return LoraConfig(
        r=lora.lora_rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias="none",  # vLLM and SGLang refuse adapters with bias
        task_type="CAUSAL_LM",
    )


def inject_lora(model: nn.Module, lora: LoRAConfig) -> PeftModel:
    """Wrap `model` with trainable LoRA adapters; base weights are frozen."""
    check_dense(model.config)
    # autocast_adapter_dtype=False keeps adapters in the base dtype instead of float32.
    return get_peft_model(model, _peft_config(lora, resolve_targets(model, lora)), autocast_adapter_dtype=False)


def inject_adapters(model: nn.Module, adapters: list[tuple[str, LoRAConfig, int]]) -> PeftModel:
    """Several named, trainable adapters (name, settings, seed) over one frozen copy of `model`.

    Each adapter's initialisation is seeded with its own seed just before it is added, so it starts
    exactly where `inject_lora` after `torch.manual_seed(seed)` starts (the draws come in the same
    module order). Targets are resolved on the plain model first: `all-linear` becomes the explicit
    list of the model's linear layers, because once a layer holds an adapter peft no longer sees it
    as a linear layer."""
    check_dense(model.config)
    all_linear = linear_module_names(model)
    configs = []
    for name, lora, seed in adapters:
        targets = resolve_targets(model, lora)
        configs.append((name, _peft_config(lora, all_linear if targets == "all-linear" else targets), seed))
    peft_model = None
    for name, peft_config, seed in configs:
        torch.manual_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(model, peft_config, adapter_name=name, autocast_adapter_dtype=False)
        else:
            peft_model.add_adapter(name, peft_config)  # adapters are cast to the model dtype below
    dtype = next(p.dtype for n, p in peft_model.named_parameters() if "lora_" not in n)
    for param_name, param in peft_model.named_parameters():  # peft leaves only the active adapter trainable
        param.requires_grad = ".lora_A." in param_name or ".lora_B." in param_name
        if param.requires_grad and param.dtype != dtype:  # add_adapter may upcast 16-bit adapters to float32
            param.data = param.data.to(dtype)
    return peft_model


def row_segments(names: list[str | None]) -> list[tuple[str | None, int]]:
    """Run-length encoding of each row's adapter: [(adapter, consecutive rows), ...] in row order."""
    segments: list[tuple[str | None, int]] = []
    for name in names:
        if segments and segments[-1][0] == name:
            segments[-1] = (name, segments[-1][1] + 1)
        else:
            segments.append((name, 1))
    return segments


def _segment_forward(layer, segments: list[tuple[str | None, int]], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA linear whose rows go through different adapters: the base output plus, for each segment of
    consecutive rows, that segment's adapter (rows of an adapter this layer does not hold, or None, get none).
    peft's modules, one small op at a time: the reference `_fused_segment_forward` is checked against."""
    result = layer.base_layer(x, *args, **kwargs)  # [B, T, out]
    deltas, start = [], 0
    for name, rows in segments:
        if name in layer.lora_A:
            lora_in = layer.lora_dropout[name](x[start:start + rows])  # a slice is a view: no gather
            deltas.append(layer.lora_B[name](layer.lora_A[name](lora_in)) * layer.scaling[name])
        else:
            deltas.append(result.new_zeros(rows, *result.shape[1:]))
        start += rows
    # One add of all deltas: backward hands each segment a view of the gradient (no full-size zeros per segment).
    return result + (deltas[0] if len(deltas) == 1 else torch.cat(deltas))


def _fused_segment_forward(layer, segments: list[tuple[str | None, int]], x: torch.Tensor, *args, **kwargs):
    """The same through `fused_lora.SegmentLoRAFunction` (train.fused_lora): one base GEMM, each segment's
    low-rank product accumulated into its rows. Layers it cannot stand in for take `_segment_forward`."""
    held = [name for name, _ in segments if name in layer.lora_A]
    if args or kwargs or x.dim() != 3 or not plain_base(layer) or x.dtype != layer.base_layer.weight.dtype \
            or not all(plain_adapter(layer, name, x.dtype) for name in held):
        return _segment_forward(layer, segments, x, *args, **kwargs)
    base = layer.base_layer
    if len(segments) == 1:  # one adapter's rows (most micro-batches): the single-adapter function
        if not held:
            return F.linear(x, base.weight, base.bias)
        name = held[0]
        return lora_linear(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                           layer.scaling[name])
    lora = [w for name in held for w in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    spans = tuple((rows, layer.scaling[name] if name in layer.lora_A else None) for name, rows in segments)
    return SegmentLoRAFunction.apply(x, base.weight, base.bias, spans, *lora)


def _stacked_forward(layer, stacked: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, *args, **kwargs):
    """The same for K equal segments, every row through an adapter, without grad (sampling): two batched
    matmuls over all K adapters at once, whatever K. stacked: A^T [K, in, r] and scaled B^T [K, r, out], each
    adapter zero-padded to the largest rank r (zeros add exact zeros) and zero where it has no LoRA here.
    Decoding one token is launch-bound, so each op counts: the second product is added in place."""
    a_t, b_t = stacked
    base = layer.base_layer
    result = F.linear(x, base.weight, base.bias) if not args and not kwargs and type(base) is nn.Linear \
        else base(x, *args, **kwargs)  # [K*n, T, out]
    rows = x.reshape(a_t.shape[0], -1, x.shape[-1])  # [K, n*T, in]: the segments are consecutive rows
    result.view(a_t.shape[0], -1, result.shape[-1]).baddbmm_(torch.bmm(rows, a_t), b_t)
    return result


def _merged_stacked_forward(layer, stacked: tuple[torch.Tensor, torch.Tensor | None], x: torch.Tensor):
    """The same with each adapter folded into its own copy of the weight: one batched GEMM per layer, as
    cheap in launches as the merged single-adapter sampler. stacked: (W + s B A)^T [K, in, out], bias."""
    w_t, bias = stacked
    rows = x.reshape(w_t.shape[0], -1, x.shape[-1])  # [K, n*T, in]
    out = torch.bmm(rows, w_t) if bias is None else torch.baddbmm(bias, rows, w_t)
    return out.view(*x.shape[:-1], w_t.shape[-1])


def _stack_merged(layer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = layer.get_base_layer()
    w_t = base.weight.t().unsqueeze(0).repeat(len(names), 1, 1)  # [K, in, out]
    for k, name in enumerate(names):
        if name in layer.lora_A:  # (B A)^T = A^T B^T, computed in float32 and rounded once
            delta = layer.lora_A[name].weight.float().t() @ layer.lora_B[name].weight.float().t()
            w_t[k] = (w_t[k].float() + layer.scaling[name] * delta).to(w_t.dtype)
    return w_t, None if base.bias is None else base.bias.view(1, 1, -1)


def _stack_adapters(layer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    base = layer.get_base_layer()
    in_features, out_features = linear_shape(base)  # not weight.shape: GPT-2's Conv1D stores it [in, out]
    rank = max((layer.lora_A[n].weight.shape[0] for n in names if n in layer.lora_A), default=1)
    a_t = base.weight.new_zeros(len(names), in_features, rank)
    b_t = base.weight.new_zeros(len(names), rank, out_features)
    for k, name in enumerate(names):
        if name in layer.lora_A:
            r = layer.lora_A[name].weight.shape[0]
            a_t[k, :, :r] = layer.lora_A[name].weight.t()
            b_t[k, :r] = layer.lora_B[name].weight.t() * layer.scaling[name]
    return a_t, b_t


# The row segments of the batch in flight while `adapter_rows` is active: (segments, fused), or None.
# A module global rather than a per-call closure, so that compiled decoder layers see one forward
# function for the whole job and guard only on this value (one graph per distinct segments).
_ROWS: tuple | None = None


def _rows_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward `adapter_rows` installs on every LoRA layer of a multi-adapter model, once."""
    rows = _ROWS
    if rows is None or self.disable_adapters:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own: no rows in flight, or adapters off
    segments, fused = rows
    stacked = vars(self).get("_lora_rl_stacked")
    if stacked is not None:
        return _stacked_forward(self, stacked, x, *args, **kwargs)
    merged = vars(self).get("_lora_rl_merged")
    if merged is not None and not args and not kwargs:
        return _merged_stacked_forward(self, merged, x)
    return (_fused_segment_forward if fused else _segment_forward)(self, segments, x, *args, **kwargs)


def install_rows_forward(model: PeftModel) -> list[nn.Module]:
    """Give every LoRA layer the forward `adapter_rows` drives (once; it stays, and outside a context it is
    peft's own). Compiled models get it before compiling, so their graphs trace it. Returns the layers."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        forward = vars(layer).get("forward")
        if forward is None:
            layer.forward = types.MethodType(_rows_forward, layer)
        elif getattr(forward, "__func__", None) is not _rows_forward:
            raise RuntimeError(f"{type(layer).__name__} already has an instance forward ({forward}); adapter_rows "
                               "needs peft's own (a multi-adapter model is not passed through fuse_lora)")
    return layers


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model: every LoRA layer's adapters switched off within this context (the reference
    policy), as peft's `disable_adapter()` does, without its bookkeeping. peft also checks the status of
    every adapter layer and toggles requires_grad on each adapter tensor and back (which then leaves
    only the active adapter of a multi-adapter model trainable): 20 ms of host time per pass of a
    24-layer model in our CPU measurement, for a pass that runs without gradients anyway."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True  # the flag behind peft's `disable_adapters` property
        yield
    finally:
        for layer, disabled in zip(layers, before, strict=True):
            layer._disable_adapters = disabled


@contextlib.contextmanager
def adapter_rows(model: PeftModel, segments: list[tuple[str | None, int]], fused: bool = True,
                 merge: bool | None = None):
    """Within this context, row segments of every batch go through their own adapters of a model holding
    several (multi-LoRA jobs): `segments` lists (adapter name or None for the base, rows) in row order.
    fused: through `fused_lora.SegmentLoRAFunction` (train.fused_lora) rather than peft's modules.
    merge: while sampling, fold each adapter into its own copy of the adapted weights (None: on GPUs, when
    the K copies take under half the free memory), as a single run samples with its adapter merged.

    peft's own mixed-adapter batches (`adapter_names=`) are refused in training mode and, in eval mode,
    gather and scatter every row list through index ops at each layer - about 40% of a CPU forward/backward in
    our profile. Rows of one adapter here are consecutive, so each adapter reads and adds to a slice."""
    global _ROWS
    if _ROWS is not None:
        raise RuntimeError("adapter_rows contexts do not nest")
    layers = install_rows_forward(model)
    names = [name for name, _ in segments]
    # Sampling (no grad, K equal segments, every row adapted): each layer's adapters are stacked once for
    # the whole context, so a decoding step costs two batched matmuls per layer instead of 2K small ones.
    stack = not torch.is_grad_enabled() and len(set(names)) == len(names) > 1 and None not in names \
        and len({rows for _, rows in segments}) == 1
    if stack:
        # Decoding one token at a time is bound by kernel launches on GPUs, where K merged copies make every
        # adapted linear one batched GEMM (the copies live only while sampling, like merged_for_generation's).
        # On CPUs decoding is bound by reading weights, which K copies would multiply: low-rank products there.
        plain = all(type(layer.get_base_layer()) is nn.Linear for layer in layers)
        if merge is None:
            weight = layers[0].get_base_layer().weight if layers else None
            extra = len(names) * sum(layer.get_base_layer().weight.nbytes for layer in layers)
            merge = weight is not None and weight.is_cuda and extra < torch.cuda.mem_get_info(weight.device)[0] / 2
        for layer in layers:
            if merge and plain:
                layer._lora_rl_merged = _stack_merged(layer, names)
            else:
                layer._lora_rl_stacked = _stack_adapters(layer, names)
    _ROWS = (tuple(segments), fused)
    try:
        yield
    finally:
        _ROWS = None
        for layer in layers:
            vars(layer).pop("_lora_rl_stacked", None)
            vars(layer).pop("_lora_rl_merged", None)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of the trainable tensors: what travels to a rollout engine at each sync."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save_adapter(model: PeftModel, out_dir: str | Path, base_model_path: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default") -> Path:
    """Write a standard PEFT folder (adapter_config.json + adapter_model.safetensors) atomically.

    `base_model_name_or_path` points at the base model folder, so `PeftModel.from_pretrained` and
    vLLM's `--lora-modules` find the base. The folder is built beside the target and renamed into
    place, so a crash never leaves a half-written adapter under the final name. Of a model holding
    several adapters, `adapter_name` is written alone, as a plain single-adapter folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        model.save_pretrained(tmp, state_dict=state_dict, selected_adapters=[adapter_name])
        if adapter_name != "default":  # peft writes a named adapter into a subfolder of its own
            for item in (tmp / adapter_name).iterdir():
                os.replace(item, tmp / item.name)
            (tmp / adapter_name).rmdir()
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(Path(base_model_path).resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        plain_file_permissions(tmp)
        fsync_tree(tmp)  # on disk before it takes the name: a power cut never leaves an empty adapter
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def check_adapter_fits(base_model: nn.Module, adapter_dir: str | Path) -> None:
    """Refuse an adapter made for another base model, naming the first layer that does not fit
    (peft itself fails with a size mismatch deep inside torch's load_state_dict)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"adapter folder {str(adapter_dir)!r} has no adapter_model.safetensors: pass a PEFT "
                          "adapter folder such as runs/quickstart/adapter")
    made_for = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path", "?")
    modules = dict(base_model.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            path = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(path)
            shape = tuple(f.get_slice(key).get_shape())
            features = linear_shape(module)
            fits = features is not None and (shape[1] == features[0] if ".lora_A." in key else shape[0] == features[1])
            if not fits:
                have = (f"is {type(module).__name__}({features[0]} -> {features[1]})" if features is not None
                        else "does not exist" if module is None else f"is a {type(module).__name__}")
                raise ConfigError(f"adapter {str(adapter_dir)!r} does not fit the base model {made_for}: its "
                                  f"{key} has shape {list(shape)} but that model's {path} {have}. It was made for "
                                  "another base model: use it with the model it was trained on (adapter_config.json "
                                  "names the base in base_model_name_or_path).")


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    check_adapter_fits(base_model, adapter_dir)
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable,
                                     autocast_adapter_dtype=False)


def merge_adapter(model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights for deployment (returns the plain model)."""
    return model.merge_and_unload()


def merge_to_folder(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Load base + adapter, merge, and save a standard HF model folder (with the base's tokenizer).

    Every input is checked before the base model is loaded (minutes for a large one). The folder is
    written beside `out_dir` and renamed into place, so a failed merge leaves no half-written model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"adapter folder {str(adapter_dir)!r} has no adapter_config.json: pass a PEFT adapter folder "
                          "such as runs/quickstart/adapter")
    if out_dir.exists():
        raise ConfigError(f"output folder {str(out_dir)!r} already exists: choose a new folder for the merged model")
    try:
        adapter_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path} is not valid JSON ({err}): fix the file, or pass the adapter folder "
                          "as training wrote it") from None
    # `merge` takes no base model argument, so the adapter must name its base. peft writes null here for
    # an adapter of a model built from a config rather than loaded from a folder.
    base_path = adapter_config.get("base_model_name_or_path")
    if not isinstance(base_path, str) or not base_path:
        value = json.dumps(base_path) if "base_model_name_or_path" in adapter_config else "missing"
        raise ConfigError(f"{config_path}: base_model_name_or_path is {value}, so the base model to merge into is "
                          "unknown: set it to the folder (with config.json) of the model the adapter was trained on")
    if not (Path(base_path) / "config.json").is_file():
        raise ConfigError(f"the adapter's base model folder {base_path!r} is missing: restore it or edit "
                          f"base_model_name_or_path in {config_path}")
    # The temporary folder is made now, beside `out_dir`: `merge adapter new/dir/model` makes the missing
    # parent folders, and an unwritable place is refused before the model is loaded, not after.
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    except OSError as err:
        raise ConfigError(f"cannot write the merged model in {str(out_dir.parent)!r} ({err.strerror or err}): "
                          "choose an output folder in a writable place") from None
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
        merged = merge_adapter(load_adapter(base, adapter_dir))
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
        plain_file_permissions(tmp)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


@contextlib.contextmanager
def merged_for_generation(model: PeftModel):
    """Fold the adapter into the base weights for the duration of a rollout: each adapted linear is one
    matmul instead of three small ones plus a scale and an add, per generated token.

    peft's unmerge subtracts the update again, which in bf16 leaves rounding error in the frozen base
    every step; the base weights are therefore copied first and restored exactly afterwards (the copy
    lives only while generating, when no activations or gradients are held)."""
    from peft.tuners.lora import LoraLayer

    # Found once per model: injection fixes the tree, and walking ~2,000 modules each rollout cost ms.
    places = model.__dict__.get("_lora_rl_places")
    if places is None:
        places = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                  if isinstance(child, LoraLayer)]
        model._lora_rl_places = places
    layers = [layer for _, _, layer in places]
    weights = [layer.get_base_layer().weight.detach() for layer in layers]
    saved = [torch.empty_like(w) for w in weights]
    torch._foreach_copy_(saved, weights)  # one multi-tensor launch where a clone per weight took one each
    # A plain layer folds in with one GEMM into its weight (W += s B A, one rounding); any other (DoRA-like
    # variants, transposed or non-Linear bases, adapters in another dtype) through peft's merge. peft's
    # merge and unmerge cost several ops and Python calls per layer, ~50 ms a rollout at 0.5B, 3% of a
    # rollout on an H100 once decoding replays CUDA graphs; its unmerge is redundant with the restore.
    by_peft = []
    with torch.no_grad():
        for layer in layers:
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            base = layer.get_base_layer()
            if (len(active) == 1 and type(base) is nn.Linear and not layer.fan_in_fan_out
                    and active[0] not in layer.lora_variant and layer.lora_A[active[0]].weight.dtype == base.weight.dtype):
                a = active[0]
                base.weight.addmm_(layer.lora_B[a].weight, layer.lora_A[a].weight, alpha=layer.scaling[a])
            else:
                layer.merge()
                by_peft.append(layer)
    # Merged, peft's wrappers would only add Python work to every call of every generated token
    # (sampling is bound by the host): the base layers stand in their places while sampling.
    # Through _modules, as nn.Module.__setattr__ does for a module, without its checks.
    for parent, name, layer in places:
        parent._modules[name] = layer.get_base_layer()
    try:
        yield
    finally:
        for parent, name, layer in places:
            parent._modules[name] = layer
        for layer in by_peft:
            layer.unmerge()  # resets peft's merged flag; the weight itself is restored from the copy below
        with torch.no_grad():  # peft's merge may have given a weight new storage: look each one up again
            torch._foreach_copy_([layer.get_base_layer().weight.detach() for layer in layers], saved)
