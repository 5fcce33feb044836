"""Several LoRA adapters trained in one job over one frozen copy of the base model (multi-LoRA GRPO).

`train_multi(configs)` takes K run configs that differ only in the adapter's own settings
(`PACKABLE`: rank, alpha, target modules, learning rate, weight decay, seed, run folder) and trains
the K adapters side by side. Each adapter keeps everything a single run has of its own: its
initialisation and data stream (both seeded by its `run.seed`), its AdamW optimizer and gradient
clip over its own parameters only, and its run folder (`config.yaml`, `metrics.jsonl`, `adapter/`,
`summary.json`, the same files and keys as `lora_rl.trainer.train` writes).

What the K adapters share, per step:
- one rollout batch: the engine samples every adapter's prompts at once, each request naming its
  adapter (the embedded engine: on GPUs each adapter merged into its own copy of the adapted weights,
  one batched GEMM per layer; on CPUs the adapters stacked into two batched low-rank matmuls; vLLM:
  one LoRARequest per adapter version, `max_loras` = K), each with its own sampling seed;
- one forward/backward per micro-batch: micro-batches mix rows of different adapters and each row
  goes through its own adapter (`lora.adapter_rows`: with train.fused_lora one base GEMM per layer and
  each adapter's low-rank product added to its own rows); the loss is the sum of the adapters' own
  token-mean losses, so each adapter's gradient is exactly its own loss's;
- one reference pass (the base model, adapters off) serves all K.

How it departs from a single run: the update runs the model in eval mode, because peft refuses
per-row adapters in training mode; training mode only switches on dropout (LoRA's or the base model's
own) and activation checkpointing, so packed jobs refuse them. Adapters train on the FSDP2 backend's
Hugging Face model only (`backend.name=fsdp2`). A packed job writes no checkpoints (no `--resume`): its
adapters are saved at the end, and an adapter whose updates stay non-finite for `train.max_bad_updates`
steps stops the whole job. Timings and tokens/s in each adapter's metrics are the whole job's.

An adapter of a packed job follows the trajectory of its single run with the same settings and seed
up to float rounding (different batch padding, and the sampler's merged or low-rank weights);
`tests/test_multilora.py` states the tolerance.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from lora_rl import distributed, grpo
from lora_rl.backends.fsdp2 import compile_layers
from lora_rl.batching import encode, make_batch, token_logprobs
from lora_rl.checkpoint import atomic_write_text
from lora_rl.config import Config, ConfigError, config_to_dict, override
from lora_rl.fused_lora import load_native
from lora_rl.lora import (adapter_rows, adapters_off, check_model, inject_adapters, install_rows_forward,
                          row_segments, save_adapter)
from lora_rl.metrics import MetricsLog, Timer, measuring_peak_memory
from lora_rl.models import has_dropout, load_model, resolve_model_path, set_training
from lora_rl.optim import make_optimizer
from lora_rl.rewards import get_reward
from lora_rl.rollout import AdapterRequest, SamplingParams, require_engine
from lora_rl.tasks import check_prompt_lengths, format_prompt, load_problems
from lora_rl.rollout.embedded import sliding_window
from lora_rl.rollout.vllm_common import sync_threshold
from lora_rl.trainer import (TrainingError, UpdateTerms, _micro_batches, _prepare_run_dir, _step_record, eval_params,
                             eval_prompts, eval_scores, micro_loss, new_totals, prompt_indices, run_summary, step_record,
                             reuses_training_logprobs, run_started, step_seed, update_stats, verify_delivery,
                             wants_reference)

# The settings adapters of one job may differ in; every other key must be equal across the job.
PACKABLE = ("run.output_dir", "run.seed", "lora.lora_rank", "lora.lora_alpha", "lora.target_modules", "train.lr",
            "train.weight_decay")
PACKED_ENGINES = ("embedded", "vllm")


def shared_settings(config: Config) -> dict:
    """The config without the packable keys: configs with equal shared settings can be packed into one job."""
    data = config_to_dict(config)
    for key in PACKABLE:
        section, name = key.split(".")
        data[section].pop(name)
    return data


def check_packable(configs: list[Config]) -> None:
    """Refuse a set of configs one multi-LoRA job cannot train, naming the key and the fix."""
    if not configs:
        raise ConfigError("a multi-LoRA job needs at least one config")
    first = shared_settings(configs[0])
    for k, config in enumerate(configs[1:], start=1):
        other = shared_settings(config)
        differ = sorted(f"{s}.{n}" for s in first for n in first[s] if first[s][n] != other[s][n])
        if differ:
            raise ConfigError(f"config {k} differs from config 0 in {differ}: adapters of one job may differ only in "
                              f"{list(PACKABLE)}; run the others as separate jobs")
    dirs = [str(Path(c.run.output_dir).resolve()) for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"run.output_dir must differ between the adapters of one job, got {dirs}")
    c = configs[0]
    if c.backend.name != "fsdp2":
        # The job builds no backend: it trains peft adapters on the HF model, as the FSDP2 backend does.
        # Another backend's run would adapt other modules (Megatron: q_proj means the fused q, k and v).
        raise ConfigError(f"backend.name={c.backend.name!r} in a multi-LoRA job: packed adapters train on the "
                          "FSDP2 backend's Hugging Face model only. Set backend.name=fsdp2, or run these points "
                          "as separate jobs")
    if not c.lora.use_lora:
        raise ConfigError("lora.use_lora=false in a multi-LoRA job: it trains adapters over one frozen base; run full "
                          "fine-tuning as a job of its own")
    if c.lora.lora_dropout > 0:
        raise ConfigError(f"lora.lora_dropout={c.lora.lora_dropout} in a multi-LoRA job: per-row adapters run in eval "
                          "mode (peft refuses them in training mode), where dropout is off. Set lora.lora_dropout=0")
    if c.backend.activation_checkpointing:
        raise ConfigError("backend.activation_checkpointing=true in a multi-LoRA job: per-row adapters run in eval "
                          "mode, where HF models do not checkpoint. Set it to false")
    if c.backend.cuda_graphs:
        # The packed update runs per-row adapters through each layer; it has no graphed layers to replay.
        raise ConfigError("backend.cuda_graphs=true in a multi-LoRA job: the packed update does not replay CUDA "
                          "graphs (its layers change with the rows' adapters). Set backend.cuda_graphs=false, or "
                          "run these points as separate jobs")
    if c.rollout.engine not in PACKED_ENGINES:
        raise ConfigError(f"rollout.engine={c.rollout.engine!r} in a multi-LoRA job: use one of {list(PACKED_ENGINES)}")


class MultiLoRAPolicy:
    """One frozen base model holding K named peft adapters, each with its own AdamW over its own tensors."""

    def __init__(self, model: torch.nn.Module, configs: list[Config], device: torch.device):
        self.names = [f"adapter{k}" for k in range(len(configs))]
        self.model = inject_adapters(model, [(name, c.lora, c.run.seed)
                                             for name, c in zip(self.names, configs, strict=True)])
        self.device = device
        self.chunked = configs[0].train.chunked_logprobs
        self.fused = configs[0].train.fused_lora
        self.max_grad_norms = [c.train.max_grad_norm for c in configs]
        named = dict(self.model.named_parameters())
        self.params = [[p for n, p in named.items() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]
                       for name in self.names]
        self.optimizers = [make_optimizer(params, c.train, device)
                           for params, c in zip(self.params, configs, strict=True)]
        install_rows_forward(self.model)  # before compiling: the graphs trace the per-row forward
        if self.fused and device.type == "cuda":
            load_native("CUDA")
        self.compiled = configs[0].backend.compile and device.type == "cuda"
        if self.compiled:
            # As the single-adapter backend compiles: each distinct set of row segments (in practice one
            # adapter's rows per micro-batch) is a graph of its own, with and without grad, plus the first
            # layer's and the reference pass's.
            compile_layers(self.model, graphs=4 * (len(configs) + 1),
                           memory_budget=configs[0].backend.compile_memory_budget)

    @contextlib.contextmanager
    def generation(self):
        """Sampling runs the layers eagerly, as in the single-adapter backend (`FSDP2Engine.generation`)."""
        with torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext():
            yield

    def logprobs(self, batch, adapter_names: list[str] | None, temperature: float, with_grad: bool,
                 with_entropy: bool = False):
        """Target-token log-probs [B, T-1]; row i through adapter_names[i] (None: the model as it is)."""
        # Eval mode even with grad: peft refuses per-row adapters in training mode, and without dropout or
        # activation checkpointing (refused in packed jobs) both modes compute the same.
        set_training(self.model, False)
        rows = contextlib.nullcontext() if adapter_names is None else \
            adapter_rows(self.model, row_segments(adapter_names), fused=self.fused)
        with torch.set_grad_enabled(with_grad), rows:
            return token_logprobs(self.model, batch.to(self.device), temperature, with_entropy, chunked=self.chunked,
                                  compiled=self.compiled)

    @contextlib.contextmanager
    def reference(self):
        """The base model, every adapter off."""
        with adapters_off(self.model):
            yield

    def optimizer_step(self, k: int) -> float:
        """Clip adapter k's gradients, step its optimizer alone, zero its grads; the pre-clip norm."""
        max_norm = self.max_grad_norms[k]
        norm = float(torch.nn.utils.clip_grad_norm_(self.params[k], max_norm if max_norm > 0 else float("inf")))
        if torch.isfinite(torch.tensor(norm)):
            self.optimizers[k].step()
        self.optimizers[k].zero_grad(set_to_none=True)
        return norm

    def adapter_sizes(self, k: int) -> tuple[int, int]:
        """(trainable parameters, bytes) of adapter k."""
        return sum(p.numel() for p in self.params[k]), sum(p.numel() * p.element_size() for p in self.params[k])


def multi_update(policy: MultiLoRAPolicy, batch, owners: list[int], behaviour: torch.Tensor,
                 advantages: torch.Tensor, configs: list[Config]) -> list[dict[str, float]]:
    """One policy update of every adapter on a mixed rollout batch; statistics per adapter.

    batch: B sequences, row i sampled by adapter owners[i]; behaviour [B, T-1]; advantages [B].
    The same steps as `trainer.grpo_update`, with each micro-batch's rows split by adapter for the loss."""
    config = configs[0]  # the shared sections: rollout, grpo, train.micro_batch_size
    temp, micro, minibatches = config.rollout.temperature, config.train.micro_batch_size, config.grpo.minibatches
    batch, behaviour, advantages = batch.to(policy.device), behaviour.to(policy.device), advantages.to(policy.device)
    names = [policy.names[k] for k in owners]
    owner = torch.tensor(owners, device=policy.device)
    mask = batch.completion_mask  # [B, T-1]
    # The training pass's own log-probs, as in grpo_update (LoRA dropout is per adapter: all must have none).
    reuse = all(reuses_training_logprobs(c) for c in configs) and not has_dropout(policy.model)
    proximal = mask.new_zeros(mask.shape, dtype=torch.float32) if reuse else torch.cat(
        [policy.logprobs(batch.select(s), names[s], temp, with_grad=False)[0] for s in _micro_batches(batch, micro)])
    reference = None
    if wants_reference(config):
        with policy.reference():
            reference = torch.cat([policy.logprobs(batch.select(s), None, temp, with_grad=False)[0]
                                   for s in _micro_batches(batch, micro)])
    terms = UpdateTerms(proximal, reference, behaviour, advantages, mask)
    rows = [(owner == k).nonzero().squeeze(1) for k in range(len(configs))]  # each adapter's rows, in order
    totals = [new_totals() for _ in configs]
    norms: list[list[float]] = [[] for _ in configs]
    for m in range(minibatches):
        # Minibatch m: the m-th share of every adapter's rows, adapter by adapter.
        parts = [r[m * (len(r) // minibatches):(m + 1) * (len(r) // minibatches)] for r in rows]
        global_tokens = [mask[p].sum() for p in parts]
        order = torch.cat(parts)
        for s in _micro_batches(order, micro):
            idx = order[s]
            logp, entropy = policy.logprobs(batch.select(idx), [names[i] for i in idx.tolist()], temp,
                                            with_grad=True, with_entropy=True)
            if reuse:
                terms.proximal[idx] = logp.detach()
            loss = 0.0
            for k in owner[idx].unique().tolist():
                local = (owner[idx] == k).nonzero().squeeze(1)
                loss = loss + micro_loss(logp[local], entropy[local], idx[local], terms, global_tokens[k],
                                         mask[rows[k]].sum(), configs[k], totals[k])
            loss.backward()  # each adapter's tensors get its own loss's gradient: rows touch one adapter each
        for k in range(len(configs)):
            norms[k].append(policy.optimizer_step(k))
    return [update_stats(totals[k], norms[k], UpdateTerms(proximal[r], None if reference is None else reference[r],
                                                          behaviour[r], advantages[r], mask[r]), configs[k])
            for k, r in enumerate(rows)]


def _make_engine(configs: list[Config], policy: MultiLoRAPolicy, tokenizer, base_dir: Path, run_dir: Path):
    if configs[0].rollout.engine == "embedded":
        from lora_rl.rollout.embedded import EmbeddedEngine

        # No merge context: K adapters cannot be folded into one weight.
        return EmbeddedEngine(policy.model, tokenizer, generation_context=policy.generation,
                              cuda_graphs=configs[0].rollout.cuda_graphs)
    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    # vLLM's LoRA slots are sized for the largest rank of the job.
    largest = max(configs, key=lambda c: c.lora.lora_rank)
    return VLLMEngine(base_model_dir=base_dir, model=policy.model, config=largest, run_dir=run_dir,
                      adapters=policy.names)


class _OneAdapter:
    """Adapter `name` of the job seen as the engine and the backend of `trainer.verify_delivery`."""

    def __init__(self, engine, policy: MultiLoRAPolicy, name: str):
        self.engine, self.policy, self.name = engine, policy, name
        self.needs_adapter = engine.needs_adapter

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
        return self.engine.score(sequences, prompt_lengths, adapter=self.name)

    def logprobs(self, batch, temperature: float, with_grad: bool):
        return self.policy.logprobs(batch, [self.name] * len(batch), temperature, with_grad)


def _publish(engine, policy: MultiLoRAPolicy, version: int, base_dir: Path) -> list[int]:
    """Hand every adapter's `version` to the engine; bytes written per adapter."""
    sizes = []
    for name in policy.names:
        path = None
        if engine.needs_adapter:
            path = save_adapter(policy.model, engine.adapter_path(version, name), base_dir, adapter_name=name)
        sizes.append(engine.publish(version, path, adapter=name).bytes)
    return sizes


def _evaluate(engine, policy, tokenizer, eval_sets, reward_fn, config: Config) -> list[dict[str, float]]:
    if config.eval.size == 0:
        return [{"accuracy": float("nan"), "format_rate": float("nan"), "lenient_accuracy": float("nan")}
                for _ in policy.names]
    requests = [AdapterRequest(adapter=name, prompts=eval_prompts(tokenizer, problems), params=eval_params(config))
                for name, problems in zip(policy.names, eval_sets, strict=True)]
    return [eval_scores(completions, problems, tokenizer, reward_fn)
            for completions, problems in zip(engine.generate_adapters(requests), eval_sets, strict=True)]


def _requests(configs, policy, train_sets, prompt_cache, tokenizer, step: int):
    """Each adapter's prompts of the step (its own seeded stream, as in its single run) and problem indices."""
    rp = configs[0].rollout
    requests, indices = [], []
    for k, c in enumerate(configs):
        ids = prompt_indices(len(train_sets[k]), rp.prompts_per_step, step, c.run.seed)
        for i in ids:
            if i not in prompt_cache[k]:
                prompt_cache[k][i] = encode(tokenizer, format_prompt(train_sets[k][i].question, tokenizer))
        indices.append(ids)
        requests.append(AdapterRequest(
            adapter=policy.names[k], prompts=[prompt_cache[k][i] for i in ids],
            params=SamplingParams(n=rp.group_size, max_new_tokens=rp.max_new_tokens, temperature=rp.temperature,
                                  top_p=rp.top_p, seed=step_seed(c.run.seed, step))))
    return requests, indices


def _update_batch(requests, completions, pad_id: int):
    """All adapters' sequences, adapter by adapter: the batch, behaviour log-probs [B, T-1], each row's adapter."""
    flat = [(k, requests[k].prompts[c.prompt_index], c) for k, comps in enumerate(completions) for c in comps]
    batch = make_batch([p for _, p, _ in flat], [c.token_ids for _, _, c in flat], pad_id)
    behaviour = torch.zeros_like(batch.completion_mask)
    for row, (_, prompt, c) in enumerate(flat):
        behaviour[row, len(prompt) - 1:len(prompt) - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    return batch, behaviour, [k for k, _, _ in flat]


def _verify(engine, policy: MultiLoRAPolicy, requests, completions, configs: list[Config], step: int):
    """`trainer.verify_delivery` per adapter; stops the job when an adapter's engine scores are off."""
    config = configs[0]
    delivery = []
    for k, name in enumerate(policy.names):
        view = _OneAdapter(engine, policy, name)
        prompts = requests[k].prompts
        diff = verify_delivery(view, view, [prompts[c.prompt_index] + c.token_ids for c in completions[k]],
                               [len(prompts[c.prompt_index]) for c in completions[k]], config)
        if diff is not None and diff > sync_threshold(config):
            raise TrainingError(
                f"step {step + 1}: after publishing version {step + 1} of {name} ({configs[k].run.output_dir}), "
                f"{engine.name} log-probs differ from the trainer's by {diff:.2e} on average (limit "
                f"{sync_threshold(config):.0e}, rollout.max_sync_logprob_diff): the engine is not serving the "
                "adapter just trained")
        delivery.append(diff)
    return delivery


def _check_run_dirs(configs: list[Config]) -> None:
    """Refuse the job unless every adapter's run folder is new, empty, or left by a job that stopped before its
    first step. All are checked before any is created: a job refused for one folder must leave the others as
    they were, so that a retry once that folder is fixed is not refused for the folders the refused job made."""
    for c in configs:
        run_dir = Path(c.run.output_dir)
        # A job that failed before its first step (an engine that did not start) left config.yaml in every
        # folder and nothing to keep: a retry takes them over, as a single run does (trainer.check_run_dir).
        stopped_before_a_step = (run_dir / "config.yaml").is_file() and not run_started(run_dir)
        if run_dir.exists() and not stopped_before_a_step and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ConfigError(f"run.output_dir={str(run_dir)!r} exists and is not an empty folder: a multi-LoRA "
                              "job starts every adapter's run in a new or empty folder (it cannot resume a run). "
                              "Choose another run.output_dir for that adapter, or empty that folder")


def _check_model_dropout(model: torch.nn.Module, config: Config) -> None:
    """Refuse a base model that drops out in training: a packed update runs in eval mode, where its dropout
    is off, so its adapters would not follow their single runs (lora.lora_dropout is refused the same way)."""
    if not has_dropout(model):
        return
    settings = {key: value for key, value in model.config.to_dict().items()
                if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and value > 0}
    found = f"{settings} in its config.json" if settings else "nn.Dropout layers with p > 0"
    raise ConfigError(f"model.path={config.model.path!r} has dropout of its own ({found}): per-row adapters run in "
                      "eval mode, where that dropout is off, so the packed adapters would not follow their single "
                      "runs. Set its dropout settings to 0 in the model's config.json, or run these points as "
                      "separate jobs")


def _count_bad_updates(bad_updates: list[int], stats: list[dict[str, float]], configs: list[Config],
                       step: int) -> None:
    """Count each adapter's non-finite updates in a row (an adapter's NaN/inf skips only its own optimizer
    step), warning as `trainer.train` does; raise once one adapter reaches train.max_bad_updates.

    The whole job stops then, not just that adapter: a sweep records a pack by the job's one exit status, so
    a job that went on without it would have to report per-point outcomes the sweep cannot read. Every
    adapter's run folder keeps its config.yaml and metrics.jsonl of the steps done; no adapter is saved."""
    for k, c in enumerate(configs):
        bad_updates[k] = bad_updates[k] + 1 if stats[k]["skipped_updates"] else 0
        if bad_updates[k]:
            print(f"lora-rl: warning: step {step + 1}: {c.run.output_dir}: non-finite loss or gradient, update "
                  f"skipped ({bad_updates[k]} in a row)", file=sys.stderr)
        if bad_updates[k] >= c.train.max_bad_updates:
            raise TrainingError(
                f"{bad_updates[k]} updates in a row of the adapter of run.output_dir={c.run.output_dir!r} had a "
                f"NaN/inf loss or gradient (steps {step + 2 - bad_updates[k]}-{step + 1}, train.max_bad_updates="
                f"{c.train.max_bad_updates}): lower its train.lr, keep train.max_grad_norm > 0, or use "
                "model.dtype=float32. The multi-LoRA job stopped with it: every adapter's metrics.jsonl holds the "
                "steps done, and no adapter was saved")


def train_multi(configs: list[Config]) -> list[dict]:
    """Train one adapter per config in one job over one base model; one summary per config (also written
    to each run folder's summary.json, as `trainer.train` writes it)."""
    with measuring_peak_memory(), contextlib.ExitStack() as held:
        return _train_multi(configs, held)


def _train_multi(configs: list[Config], held: contextlib.ExitStack) -> list[dict]:
    wall_start = time.perf_counter()
    check_packable(configs)
    _check_run_dirs(configs)
    config = configs[0]  # the shared sections
    require_engine(config.rollout.engine)
    d = distributed.init()
    if d.world > 1:
        raise ConfigError("a multi-LoRA job runs in one process: drop --nproc")
    task, rp = config.task, config.rollout
    train_sets = [load_problems(task.name, split="train", seed=c.run.seed, difficulty=task.difficulty,
                                data_dir=task.data_dir or None, reward=task.reward) for c in configs]
    eval_sets = [load_problems(task.name, split="test", seed=c.run.seed, difficulty=task.difficulty,
                               data_dir=task.data_dir or None, limit=config.eval.size,
                               reward=task.reward) for c in configs]
    reward_fn = get_reward(task.reward or task.name)
    resolve_model_path(config.model.path, progress=config.run.progress)
    model, tokenizer, base_dir = load_model(config.model.path, config.model.dtype, progress=config.run.progress)
    model.to(d.device)
    _check_model_dropout(model, config)
    for c in configs:
        check_model(model, c.lora)
    context = getattr(model.config, "max_position_embeddings", None)
    window = sliding_window(model.config) if config.rollout.engine == "embedded" else None
    for split, sets in (("train", train_sets), ("eval", eval_sets)):
        for problems in sets:
            check_prompt_lengths(problems, tokenizer, config.rollout.max_new_tokens, split=split,
                                     context=context, window=window)
    total_params = sum(p.numel() for p in model.parameters())
    # Every check has passed (folders included, in _check_run_dirs): only now is any folder created.
    run_dirs = [_prepare_run_dir(c, resume=False, held=held) for c in configs]  # each locked until the job ends
    policy = MultiLoRAPolicy(model, configs, d.device)
    K = len(configs)
    logs = [MetricsLog(run_dir / "metrics.jsonl") for run_dir in run_dirs]
    sizes = [policy.adapter_sizes(k) for k in range(K)]
    engine = _make_engine(configs, policy, tokenizer, base_dir, run_dirs[0])  # adapter versions: in the first run
    try:
        _publish(engine, policy, 0, base_dir)
        before = _evaluate(engine, policy, tokenizer, eval_sets, reward_fn, config)
        prompt_cache: list[dict[int, list[int]]] = [{} for _ in configs]
        bad_updates = [0] * K  # each adapter's non-finite updates in a row, as trainer.train counts a run's
        for step in range(config.run.steps):
            timer = Timer()
            requests, indices = _requests(configs, policy, train_sets, prompt_cache, tokenizer, step)
            with timer.phase("rollout"):
                completions = engine.generate_adapters(requests)
            texts = [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps] for comps in completions]
            rewards = [torch.tensor([reward_fn(t, train_sets[k][indices[k][c.prompt_index]].reference)
                                     for t, c in zip(texts[k], comps, strict=True)])
                       for k, comps in enumerate(completions)]
            advantages = torch.cat([grpo.group_advantages(r, rp.group_size, scale_std=config.grpo.scale_std)
                                    for r in rewards])
            batch, behaviour, owners = _update_batch(requests, completions, tokenizer.pad_token_id)
            with timer.phase("update"):
                stats = multi_update(policy, batch, owners, behaviour, advantages, configs)
            _count_bad_updates(bad_updates, stats, configs, step)
            with timer.phase("sync"):
                synced = _publish(engine, policy, step + 1, base_dir)
            with timer.phase("verify"):
                delivery = _verify(engine, policy, requests, completions, configs, step)
            start = 0
            totals = []
            for k, comps in enumerate(completions):
                own = batch.select(slice(start, start + len(comps)))
                start += len(comps)
                totals.append(_step_record(rewards[k], texts[k], comps, own, stats[k]))
            # Speeds are the job's: every adapter's tokens over the shared phases.
            generated, tokens = sum(t[1] for t in totals), sum(t[2] for t in totals)
            scores = None
            if config.eval.every and (step + 1) % config.eval.every == 0:
                scores = _evaluate(engine, policy, tokenizer, eval_sets, reward_fn, config)
            for k in range(K):
                record = step_record(step, totals[k][0], timer.seconds, generated, tokens, synced[k], delivery[k], 0,
                                     sizes[k][0], sizes[k][1], wall_start)
                record["packed_adapters"] = K
                if scores is not None:
                    record.update({f"eval_{key}": value for key, value in scores[k].items()})
                logs[k].write(record)
            if config.run.progress:
                print(f"multi-LoRA step {step + 1}/{config.run.steps}: reward "
                      + " ".join(f"{t[0]['reward_mean']:.2f}" for t in totals), file=sys.stderr)
        after = _evaluate(engine, policy, tokenizer, eval_sets, reward_fn, config)
    finally:
        engine.close()
    summaries = []
    for k, (c, run_dir) in enumerate(zip(configs, run_dirs, strict=True)):
        adapter_dir = save_adapter(policy.model, run_dir / "adapter", base_dir, adapter_name=policy.names[k])
        summary = run_summary(c, steps_done=config.run.steps, eval_problems=len(eval_sets[k]), before=before[k],
                              after=after[k], wall_start=wall_start, total_params=total_params,
                              n_trainable=sizes[k][0], n_adapter_bytes=sizes[k][1], adapter_dir=adapter_dir)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
    return summaries


def main(argv: list[str] | None = None) -> int:
    """`python -m lora_rl.multi PACK.json`: the job `lora-rl sweep --pack` starts for a pack of points.

    PACK.json: {"recipe": ..., "members": [{"overrides": [...], "output_dir": ..., "result_path": ...}, ...]};
    each member's result.json is written as a single run's (`lora_rl.sweep.write_result`)."""
    from lora_rl.config import load_config
    from lora_rl.sweep import write_result

    (path,) = sys.argv[1:] if argv is None else argv
    pack = json.loads(Path(path).read_text())
    members = pack["members"]
    configs = [load_config(pack["recipe"] or None, [*m["overrides"], override("run.output_dir", m["output_dir"]),
                                                     "run.progress=false"]) for m in members]
    summaries = train_multi(configs)
    for config, summary, member in zip(configs, summaries, members, strict=True):
        write_result(config, summary, member["result_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
