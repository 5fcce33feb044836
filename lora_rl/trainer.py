"""The GRPO loop: rollout -> reward -> advantages -> policy update -> publish adapter -> metrics.

`train(config)` is the one entry point the CLI, the notebooks and the widgets call. Each step
samples `rollout.prompts_per_step` prompts x `rollout.group_size` completions, scores them, turns
rewards into group-normalised advantages and runs the clipped decoupled-PPO update through the
backend. Every random choice of a step derives from (run.seed, step), so a resumed run repeats
exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_rl import distributed, grpo
from lora_rl.backends import adapter_lora, make_backend, require_backend
from lora_rl.batching import TokenBatch, encode, make_batch
from lora_rl.checkpoint import (atomic_write_text, exclusive_lock, list_checkpoints, load_checkpoint,
                                 remove_partial_writes, save_checkpoint)
from lora_rl.config import Config, ConfigError, config_to_dict, dump_config, load_config, read_yaml
from lora_rl.lora import adapter_bytes, check_model, inject_lora, trainable_parameters
from lora_rl.metrics import MetricsLog, Timer, json_safe, measuring_peak_memory, peak_memory
from lora_rl.models import load_model, resolve_model_path
from lora_rl.rewards import get_reward, gsm8k_reward, has_final_answer
from lora_rl.rollout import SamplingParams, make_engine, require_engine
from lora_rl.rollout.embedded import sliding_window
from lora_rl.rollout.vllm_common import sync_threshold
from lora_rl.tasks import check_prompt_lengths, format_prompt, load_problems

# Steps of one run are decorrelated by mixing the step into the seed with a large odd constant.
_STEP_SEED_MIX = 1_000_003
_RANK_SEED_MIX = 7_919  # likewise for ranks sampling different prompts in the same step
_DROPOUT_SEED_MIX = 104_729  # keeps a step's dropout masks apart from its sampling seed


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates); the message says why and what to try."""


@contextlib.contextmanager
def _interrupt_flag():
    """First Ctrl-C (SIGINT) asks the loop to stop after the current step with a checkpoint;
    a second one interrupts at once. Outside the main thread (widgets) nothing is installed."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
        if os.environ.get("RANK", "0") == "0":  # a step can take minutes: say the Ctrl-C was heard
            # os.write, not print: the signal may land inside a print to stderr (the progress bar), and a
            # print from the handler would then raise "reentrant call" out of the training loop.
            os.write(2, b"\nlora-rl: stopping after this step, with a checkpoint (Ctrl-C again stops at once, "
                        b"without one)\n")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def step_seed(seed: int, step: int) -> int:
    return seed * _STEP_SEED_MIX + step


def prompt_indices(num_problems: int, per_step: int, step: int, seed: int) -> list[int]:
    """The problems of one step: a fresh seeded permutation per epoch, walked in order."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, num_problems)
        perm = torch.randperm(num_problems, generator=torch.Generator().manual_seed(step_seed(seed, epoch)))
        out.append(int(perm[pos]))
    return out


def _micro_batches(batch: TokenBatch, size: int):
    for start in range(0, len(batch), size):
        yield slice(start, start + size)


def grpo_update(backend, batch: TokenBatch, behaviour: torch.Tensor, advantages: torch.Tensor,
                config: Config) -> dict[str, float]:
    """One policy update on a rollout batch; returns averaged statistics.

    batch: B sequences; behaviour: [B, T-1] engine log-probs at target positions; advantages: [B].
    """
    temp, micro = config.rollout.temperature, config.train.micro_batch_size
    batch, behaviour, advantages = batch.to(backend.device), behaviour.to(backend.device), advantages.to(backend.device)
    mask = batch.completion_mask  # [B, T-1]
    # Proximal log-probs: the policy at the start of this update, scored by the trainer (not the engine).
    reuse = reuses_training_logprobs(config) and not backend.drops_inputs
    proximal = mask.new_zeros(mask.shape, dtype=torch.float32) if reuse else torch.cat(
        [backend.logprobs(batch.select(s), temp, with_grad=False)[0] for s in _micro_batches(batch, micro)])
    reference = None
    if wants_reference(config):
        with backend.reference():
            reference = torch.cat([backend.logprobs(batch.select(s), temp, with_grad=False)[0]
                                   for s in _micro_batches(batch, micro)])

    terms = UpdateTerms(proximal, reference, behaviour, advantages, mask)
    totals = new_totals()
    grad_norms = []
    mb_size = len(batch) // config.grpo.minibatches
    for mb_start in range(0, len(batch), mb_size):
        # Valid tokens of this minibatch on every rank: each rank's loss is its share of one global mean.
        global_tokens = distributed.all_sum(mask[mb_start: mb_start + mb_size].sum())
        for s in _micro_batches(batch.select(slice(mb_start, mb_start + mb_size)), micro):
            rows = slice(mb_start + s.start, min(mb_start + s.stop, mb_start + mb_size))
            logp, entropy = backend.logprobs(batch.select(rows), temp, with_grad=True, with_entropy=True)
            if reuse:  # filled before the loss of these rows reads them
                terms.proximal[rows] = logp.detach()
            backend.backward(micro_loss(logp, entropy, rows, terms, global_tokens, mask.sum(), config, totals))
        grad_norms.append(backend.optimizer_step())
    return update_stats(totals, grad_norms, terms, config)


def reuses_training_logprobs(config: Config) -> bool:
    """Whether the proximal log-probs are the training pass's own (detached) instead of a no-grad pass's.

    With one minibatch the update's single optimizer step comes after every micro-batch's backward, so the
    policy that the training pass scores is the proximal policy itself: a separate no-grad pass would
    compute the same log-probs again (a quarter of a 0.5B update on an H100). The ratio is then exactly 1
    with gradient d logp, the clipped surrogate's value at the proximal policy. Not with LoRA dropout: the
    training pass drops inputs, the proximal policy is the exact one (nor with a model's own dropout, which
    the callers check on the backend: `drops_inputs`)."""
    return config.grpo.minibatches == 1 and not config.grpo.recompute_proximal and config.lora.lora_dropout == 0


def wants_reference(config: Config) -> bool:
    """Whether an update scores the reference policy (the base model, adapter switched off)."""
    return config.lora.use_lora and (config.grpo.kl_coef > 0 or config.grpo.log_kl)


@dataclass(frozen=True, slots=True)
class UpdateTerms:
    """What the loss of every micro-batch reads, over the whole update batch ([B, T-1]; advantages [B])."""
    proximal: torch.Tensor
    reference: torch.Tensor | None
    behaviour: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor


def new_totals() -> dict[str, float | torch.Tensor]:
    return {"loss": 0.0, "clip_fraction": 0.0, "importance_masked_fraction": 0.0, "entropy": 0.0}


def micro_loss(logp: torch.Tensor, entropy: torch.Tensor, rows, terms: UpdateTerms, global_tokens,
               total_tokens: torch.Tensor, config: Config, totals: dict[str, float | torch.Tensor]) -> torch.Tensor:
    """The loss of one micro-batch (`rows` of the update batch; logp/entropy [rows, T-1]) and its share
    of the update's statistics, added to `totals`. total_tokens: valid tokens of the whole update.

    The statistics stay on the device until `update_stats`: reading one here would make the host wait
    for the forward before launching the backward, and the GPU would idle while it launches."""
    mask = terms.mask[rows]
    loss, _, stats = grpo.policy_loss(
        logp, terms.proximal[rows], terms.advantages[rows], mask,
        clip_low=config.grpo.clip_low, clip_high=config.grpo.clip_high, global_tokens=global_tokens,
        behaviour_logp=terms.behaviour[rows], importance_cap=config.grpo.importance_cap)
    if config.grpo.kl_coef > 0:
        kl = grpo.kl_estimate(logp, terms.reference[rows], config.grpo.kl_estimator)
        loss = loss + config.grpo.kl_coef * grpo.token_mean(kl, mask, global_tokens)
    tokens = total_tokens.clamp(min=1)
    share = mask.sum() / tokens  # this micro-batch's share of all tokens
    totals["loss"] += loss.detach() / config.grpo.minibatches  # micro losses sum to their minibatch's
    totals["clip_fraction"] += stats.clip_fraction.detach() * share
    totals["importance_masked_fraction"] += stats.importance_masked_fraction.detach() * share
    totals["entropy"] += grpo.masked_sum(entropy.detach(), mask) / tokens
    return loss


def update_stats(totals: dict[str, float | torch.Tensor], grad_norms: list[float], terms: UpdateTerms,
                 config: Config) -> dict[str, float]:
    out = {name: float(value) for name, value in totals.items()}
    # The largest, and NaN if any minibatch's was: Python's max([1.0, nan]) is 1.0, which hid a skipped step.
    out["grad_norm"] = next((n for n in grad_norms if math.isnan(n)), max(grad_norms))
    out["skipped_updates"] = sum(not math.isfinite(n) for n in grad_norms)
    mask = terms.mask
    tokens = mask.sum().clamp(min=1)
    out["logprob_diff"] = float(grpo.masked_sum((terms.proximal - terms.behaviour).abs(), mask) / tokens)
    if terms.reference is not None:
        out["kl"] = float(grpo.masked_sum(grpo.kl_estimate(terms.proximal, terms.reference, config.grpo.kl_estimator),
                                          mask) / tokens)
    return out


def publish(engine, backend, version: int):
    """Hand policy `version` to the engine. Engines with weights of their own get the adapter alone,
    written by the backend as a PEFT folder (a collective under FSDP2: only LoRA tensors are gathered)."""
    path = None
    if engine.needs_adapter:
        path = backend.save_adapter(engine.adapter_path(version))
    return engine.publish(version, path)


def verify_delivery(engine, backend, sequences: list[list[int]], starts: list[int], config: Config) -> float | None:
    """Re-score a few sequences with the engine and the trainer under the version just published.

    Returns the mean |engine - trainer| log-prob over each sequence's tokens from its start on (at
    temperature 1), or None when the engine shares the trainer's weights. Past the threshold the engine is
    serving some other weights (a stale or half-loaded adapter, another base model) and training on its
    samples would be silently off-policy. A collective under FSDP2: every rank calls it with a probe."""
    sequences, starts = sequences[:config.rollout.probe_size], starts[:config.rollout.probe_size]
    if not engine.needs_adapter or not sequences:
        return None
    engine_logp = engine.score(sequences, starts)
    batch = make_batch([seq[:start] for seq, start in zip(sequences, starts, strict=True)],
                       [seq[start:] for seq, start in zip(sequences, starts, strict=True)], 0)
    trainer_logp = backend.logprobs(batch, 1.0, with_grad=False)[0].double().cpu()
    total = count = 0.0
    for row, (start, values) in enumerate(zip(starts, engine_logp, strict=True)):
        ours = trainer_logp[row, start - 1:start - 1 + len(values)]
        total += float((ours - torch.tensor(values, dtype=torch.float64)).abs().sum())
        count += len(values)
    total, count = distributed.all_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(count, 1.0)


def evaluate(engine, tokenizer, problems, reward_fn, config: Config) -> dict[str, float]:
    """Greedy decoding on held-out problems. Returns
    accuracy: fraction scoring full reward (the task's own grader);
    format_rate: fraction stating a final answer as "#### n" or \\boxed{}, right or wrong;
    lenient_accuracy: fraction whose last number is right in any format - so a gain in accuracy
    can be split into "learned the format" and "learned the sums"."""
    if config.eval.size == 0:
        return {"accuracy": float("nan"), "format_rate": float("nan"), "lenient_accuracy": float("nan")}
    # One call: under FSDP2 every rank must generate in step.
    return eval_scores(engine.generate(eval_prompts(tokenizer, problems), eval_params(config)), problems, tokenizer,
                       reward_fn)


def eval_prompts(tokenizer, problems) -> list[list[int]]:
    return [encode(tokenizer, format_prompt(p.question, tokenizer)) for p in problems]


def eval_params(config: Config) -> SamplingParams:
    return SamplingParams(n=1, max_new_tokens=config.rollout.max_new_tokens, temperature=0.0)


def eval_scores(completions, problems, tokenizer, reward_fn) -> dict[str, float]:
    """evaluate()'s three fractions from greedy completions of `problems` (counts added over ranks)."""
    correct = formatted = lenient = 0
    for c in completions:
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        reference = problems[c.prompt_index].reference
        correct += reward_fn(text, reference) >= 1.0
        formatted += has_final_answer(text)
        lenient += gsm8k_reward(text, reference) >= 1.0
    # This rank's problems are a share of the eval set: add the counts of all ranks.
    correct, formatted, lenient, n = distributed.all_sum(torch.tensor([correct, formatted, lenient, len(problems)],
                                                                      dtype=torch.float64)).tolist()
    return {"accuracy": correct / n, "format_rate": formatted / n, "lenient_accuracy": lenient / n}


def _step_record(rewards, texts, completions, batch, stats) -> dict:
    """Per-step numbers over all ranks: sums are all-reduced; the update's per-token means (each rank's over its
    own completion tokens) are weighted by those tokens, which gives the mean one process would compute."""
    valid = float(batch.completion_mask.sum())
    sums = distributed.all_sum(torch.tensor([
        float(rewards.sum()), float((rewards ** 2).sum()), float((rewards >= 1.0).sum()),
        float(sum(map(has_final_answer, texts))), float(len(completions)),
        float(sum(len(c.token_ids) for c in completions)),
        float(sum(c.finish_reason == "length" for c in completions)), float(batch.attention_mask.sum()), valid,
    ], dtype=torch.float64)).tolist()
    total, squares, correct, formatted, n, generated, truncated, tokens, all_valid = sums
    mean = total / n
    record = {
        "reward_mean": mean, "reward_std": max(squares / n - mean ** 2, 0.0) ** 0.5 * (n / max(n - 1, 1)) ** 0.5,
        "accuracy": correct / n, "format_rate": formatted / n,
        "response_length": generated / n, "truncated_fraction": truncated / n,
    }
    for key, value in stats.items():
        if key in ("grad_norm", "skipped_updates"):  # already global (the norm is all-reduced)
            record[key] = value
        elif key == "loss":  # each rank's loss is its share of one global token mean
            record[key] = float(distributed.all_sum(torch.tensor(value, dtype=torch.float64)))
        else:  # kl, entropy, logprob_diff, clip and importance-cap fractions: token means
            record[key] = float(distributed.all_sum(torch.tensor(value * valid, dtype=torch.float64))) / max(all_valid, 1)
    return record, generated, tokens


def step_record(step: int, totals: dict, seconds: dict[str, float], generated: float, tokens: float,
                sync_bytes: int, delivery: float | None, restarts: int, n_trainable: int, n_adapter_bytes: int,
                wall_start: float) -> dict:
    """One metrics.jsonl line: the step's statistics, timings per phase, memory and sizes."""
    memory, memory_kind = peak_memory()
    return {
        "step": step + 1, "version": step + 1, **totals,
        "rollout_seconds": seconds["rollout"],
        "rollout_tokens_per_s": generated / max(seconds["rollout"], 1e-9),
        "update_seconds": seconds["update"],
        "update_tokens_per_s": tokens / max(seconds["update"], 1e-9),
        "sync_seconds": seconds["sync"], "sync_bytes": sync_bytes,
        "sync_logprob_diff": delivery, "verify_seconds": seconds["verify"],
        "engine_restarts": restarts,
        "peak_memory_gib": memory, "memory_kind": memory_kind,
        "trainable_params": n_trainable, "adapter_bytes": n_adapter_bytes,
        "elapsed_seconds": time.perf_counter() - wall_start,
    }


def run_summary(config: Config, *, steps_done: int, eval_problems: int, before: dict, after: dict, wall_start: float,
                total_params: int, n_trainable: int, n_adapter_bytes: int, adapter_dir: Path | None) -> dict:
    """summary.json: held-out accuracy before/after, wall time, memory and sizes."""
    memory, memory_kind = peak_memory()
    task = config.task
    return json_safe({
        "run_dir": str(Path(config.run.output_dir)), "model": config.model.path, "task": task.name,
        "difficulty": task.difficulty if task.name == "arithmetic" else None,  # gsm8k ignores it
        "steps_done": steps_done, "stopped_early": steps_done < config.run.steps,
        "eval_decoding": "greedy", "eval_problems": eval_problems,
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "gain_points": 100 * (after["accuracy"] - before["accuracy"]),
        "format_rate_before": before["format_rate"], "format_rate_after": after["format_rate"],
        "lenient_accuracy_before": before["lenient_accuracy"], "lenient_accuracy_after": after["lenient_accuracy"],
        "wall_seconds": time.perf_counter() - wall_start,
        "peak_memory_gib": memory, "memory_kind": memory_kind,
        "total_params": total_params, "trainable_params": n_trainable, "adapter_bytes": n_adapter_bytes,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
    })


def _saved_settings(saved: Path) -> dict:
    """The saved run's config as sections of settings, with today's defaults for settings added since it
    was written (they did not exist, so the run used what is now their default)."""
    try:
        return config_to_dict(load_config(saved))
    except ConfigError:  # a setting since removed or renamed: compare what the file holds
        return read_yaml(saved)


_RESUME_MAY_CHANGE = (("run", "steps"), ("run", "progress"), ("run", "output_dir"), ("run", "checkpoint_every"),
                      ("run", "keep_checkpoints"), ("rollout", "server_url"), ("rollout", "api_key_env"),
                      ("rollout", "request_timeout"), ("rollout", "startup_timeout"))


def run_started(run_dir: Path) -> bool:
    """Whether a run folder holds anything of a step; one holding only config.yaml (and what its engine made)
    is a run that stopped before its first step."""
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", "adapter", "summary.json"))


def check_run_dir(config: Config, resume: bool, world: int = 1) -> None:
    """Whether run.output_dir can take this run (new, or --resume with the same settings); writes nothing."""
    run_dir = Path(config.run.output_dir)
    saved = run_dir / "config.yaml"
    if resume and not saved.exists():
        raise ConfigError(f"--resume: run.output_dir={str(run_dir)!r} holds no run to resume (no config.yaml there): "
                          "check the path, or drop --resume to start a new run")
    # A run that stopped before its first step (a backend, an engine or a server refused it after config.yaml
    # was written) holds nothing to continue: a new start, with any settings, takes its folder over.
    if saved.exists() and run_started(run_dir):
        if not resume:
            raise ConfigError(f"run.output_dir={str(run_dir)!r} already holds a run (config.yaml): pass --resume to "
                              "continue it, or choose another run.output_dir")
        was, now = _saved_settings(saved), config_to_dict(config)
        # A resumed run may run longer or quieter, its folder may have moved, and how it checkpoints and
        # reaches its server may change (a new server address after a crash); anything else would silently
        # change the experiment.
        for section, key in _RESUME_MAY_CHANGE:
            was.get(section, {}).pop(key, None)
            now[section].pop(key, None)
        changed = [f"{section}.{key}: {was.get(section, {}).get(key, '(not set)')!r} -> "
                   f"{now.get(section, {}).get(key, '(not set)')!r}"
                   for section in sorted(set(was) | set(now))
                   for key in sorted(set(was.get(section, {})) | set(now.get(section, {})))
                   if was.get(section, {}).get(key) != now.get(section, {}).get(key)]
        if changed:
            raise ConfigError(f"--resume with a config that differs from the saved run ({'; '.join(changed)}): resume "
                              f"with the same settings (see {saved}) or start a new run.output_dir")
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:
            meta = _checkpoint_meta(checkpoints[-1])
            if meta["step"] > config.run.steps:
                raise ConfigError(f"--resume with run.steps={config.run.steps}, below the newest checkpoint "
                                  f"({checkpoints[-1]}, step {meta['step']}): resume with run.steps={meta['step']} "
                                  "or more")
            # FSDP2 saves one state.pt from one process and torch.distributed.checkpoint shards (which it can
            # reshard to another count) from several; each layout loads only the way it was written.
            sharded = (checkpoints[-1] / "backend" / ".metadata").is_file()
            if config.backend.name == "fsdp2" and sharded != (world > 1):
                saved_by = meta.get("world_size", "several" if sharded else 1)
                fix = f"--nproc {saved_by}" if sharded else "one process (no --nproc)"
                raise ConfigError(f"--resume on {world} process(es), but {checkpoints[-1]} was written by {saved_by}: "
                                  f"FSDP2 saves {'sharded' if sharded else 'unsharded'} state then, which loads only "
                                  f"that way. Resume with {fix}")
        elif (run_dir / "summary.json").exists() or (run_dir / "adapter").exists():
            # Every session that ends with these checkpoints first, so they were deleted or left behind (a folder
            # copied without its bulky checkpoints/). With none, the resume started over at step 1 without a word
            # and replaced the run's metrics.jsonl, adapter and summary.json.
            raise ConfigError(f"--resume: run.output_dir={str(run_dir)!r} holds a trained run (summary.json, "
                              f"adapter/) but no checkpoint to continue it from (none in {run_dir / 'checkpoints'}): "
                              "it would start over at step 1 and replace the run's metrics.jsonl, adapter and "
                              "summary.json. Put its checkpoints/ folder back (the newest step_* is enough), or "
                              "start a new run.output_dir")
    elif run_dir.exists() and not saved.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"run.output_dir={str(run_dir)!r} exists and is not a lora-rl run folder: "
                          "choose an empty or new folder")


def _prepare_run_dir(config: Config, resume: bool, world: int = 1,
                     held: contextlib.ExitStack | None = None) -> Path:
    check_run_dir(config, resume, world)
    run_dir = Path(config.run.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder of the path should be, or no permission
        raise ConfigError(f"run.output_dir={str(run_dir)!r} cannot be made ({err.strerror or err}): choose a folder "
                          "in a writable place") from None
    if held is not None:  # the folder is this run's until `held` closes (train's end, however it ends)
        held.enter_context(_run_dir_lock(run_dir))
        check_run_dir(config, resume, world)  # again: a run that held the folder until now may have filled it
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    remove_partial_writes(run_dir)  # one process writes to a run folder: none of them is being written
    return run_dir


def _run_dir_lock(run_dir: Path):
    """An exclusive lock on the run folder (the folder itself, so no file is left in it) for one run's span.
    A second run over the same folder while the first still trains (the same command again with --resume in
    another terminal, a run started while the previous one is still loading) was let in: both appended to
    metrics.jsonl (steps repeated and interleaved) and wrote checkpoints, adapter and summary.json over each
    other, and the second deleted the first's checkpoint being written."""
    return exclusive_lock(run_dir, f"run.output_dir={str(run_dir)!r} is in use by another lora-rl run that is "
                                   "still running (another terminal, job or notebook kernel): wait for it to end "
                                   "or stop it, or choose another run.output_dir")


def _checkpoint_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(_unreadable(path, err)) from None


def _unreadable(path: Path, err: BaseException) -> str:
    return (f"checkpoint {path} cannot be read ({type(err).__name__}: {err}): it was damaged after it was written. "
            "Delete that folder to resume from the checkpoint before it, or start a new run.output_dir")


def _load_checkpoint(checkpoints: list[Path], backend) -> tuple[dict, dict]:
    """The newest checkpoint, with a damaged or missing file a ConfigError naming the folder. A checkpoint only
    appears once complete, so damage came later (a disk, a copy, a hand); the older ones are left for the user."""
    try:
        return load_checkpoint(checkpoints[-1], backend)
    except ConfigError:
        raise
    # EOFError: torch.load of an empty file (a power cut after the rename, a truncated copy).
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(_unreadable(checkpoints[-1], err)) from None


def check_world(config: Config, world: int) -> None:
    """The settings that must fit the process count: `lora-rl train --nproc` checks them before it starts
    torchrun (one clear error instead of one per rank under torchrun's report), `validate --nproc` too, and
    train again."""
    if config.rollout.engine == "vllm" and world > 1:
        raise ConfigError(f"rollout.engine=vllm builds a vLLM engine inside each of the {world} training processes: "
                          "use rollout.engine=vllm-server, which all processes share")
    check_offload(config, world)
    check_batch_split(config, world)
    if 0 < config.eval.size < world:
        raise ConfigError(_eval_share_error(config.eval.size, config.eval.size, world))


def check_offload(config: Config, world: int) -> None:
    """FSDP2 offloads shards, which one process does not have (check_world; the memory estimate too, which would
    otherwise predict a run that cannot start). The FSDP2 backend refuses it as well, but only once train has
    written config.yaml and loaded the model."""
    if config.backend.name == "fsdp2" and config.backend.cpu_offload and world == 1:
        raise ConfigError("backend.cpu_offload=true offloads FSDP2 shards: run several processes (--nproc N; "
                          "for `lora-rl estimate`, --devices N) or set backend.cpu_offload=false")


def check_batch_split(config: Config, world: int) -> None:
    """The rollout batch splits over `world` processes, and each share into the minibatches (check_world;
    the memory estimate too, which counts one process's share)."""
    if config.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={config.rollout.prompts_per_step} does not split over {world} "
                          f"processes: use a multiple of {world}")
    # Each process splits its own share into the minibatches (grpo_update): the share must divide, or
    # the update takes more optimizer steps than asked (or a share smaller than the count, none at all).
    share = config.rollout.prompts_per_step // world * config.rollout.group_size
    if world > 1 and share % config.grpo.minibatches:
        raise ConfigError(f"grpo.minibatches={config.grpo.minibatches} does not divide each process's share of the "
                          f"rollout batch, {share} sequences (rollout.prompts_per_step / {world} processes x "
                          f"rollout.group_size): pick a divisor of {share}, or change prompts_per_step")


def _eval_share_error(size: int, problems: int, world: int) -> str:
    # Every process scores a share, and under FSDP2 every process must decode in step with the others.
    return (f"eval.size={size} gives {problems} test problems for {world} processes, each of which scores a share: "
            f"use eval.size >= {world}, or 0 for no evaluation")


def train(config: Config, *, resume: bool = False,
          on_step: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict:
    """Run GRPO with LoRA as configured; returns the summary also written to summary.json."""
    with measuring_peak_memory(), contextlib.ExitStack() as held:
        return _train(config, resume, on_step, should_stop, held)


def _train(config: Config, resume: bool, on_step: Callable[[dict], None] | None,
           should_stop: Callable[[], bool] | None, held: contextlib.ExitStack) -> dict:
    wall_start = time.perf_counter()
    require_backend(config.backend.name)
    require_engine(config.rollout.engine)
    d = distributed.init()
    check_world(config, d.world)
    # The data first: a missing or malformed dataset must fail before the run folder is created.
    task = config.task
    train_problems = load_problems(task.name, split="train", seed=config.run.seed, difficulty=task.difficulty,
                                   data_dir=task.data_dir or None, reward=task.reward)
    eval_problems = load_problems(task.name, split="test", seed=config.run.seed, difficulty=task.difficulty,
                                  data_dir=task.data_dir or None, limit=config.eval.size, reward=task.reward)
    if config.eval.size and len(eval_problems) < d.world:  # a test file shorter than eval.size
        raise ConfigError(_eval_share_error(config.eval.size, len(eval_problems), d.world))
    every_eval, eval_problems = eval_problems, eval_problems[d.rank::d.world]  # this rank's share
    eval_total = len(every_eval)
    reward_fn = get_reward(task.reward or task.name)
    # Rank 0 checks and creates the run folder; every rank raises the same error if it fails.
    error = None
    if d.main:
        try:
            _prepare_run_dir(config, resume, d.world, held)
        except ConfigError as err:
            error = str(err)
    error = distributed.broadcast_object(error)
    if error:
        raise ConfigError(error)
    run_dir = Path(config.run.output_dir)
    progress = config.run.progress and d.main

    if d.main:  # build a built-in model once, not once per rank
        resolve_model_path(config.model.path, progress=progress)
    distributed.barrier()
    # Several processes start on the meta device: each reads only its own shards (FSDP2 backend).
    # Megatron reads the weights itself; the HF model is then only the adapter's shape (no memory).
    meta = (d.world > 1 and config.backend.meta_init) or config.backend.name == "megatron"
    model, tokenizer, base_dir = load_model(config.model.path, config.model.dtype, progress=progress, empty=meta)
    if not meta and not config.backend.cpu_offload:  # offloaded shards stay in CPU memory
        model.to(d.device)
    lora = adapter_lora(config)  # Megatron adapts fused layers whole (q_proj -> q, k and v)
    check_model(model, lora)
    context = getattr(model.config, "max_position_embeddings", None)
    window = sliding_window(model.config) if config.rollout.engine == "embedded" else None
    # Every rank checks the whole sets, so all of them refuse together (a rank's share alone would leave the
    # others waiting in a collective).
    for split, problems in (("train", train_problems), ("eval", every_eval)):
        check_prompt_lengths(problems, tokenizer, config.rollout.max_new_tokens, split=split,
                                 context=context, window=window)
    total_params = sum(p.numel() for p in model.parameters())
    # Seeded here, after the model is built or loaded: building a built-in model draws random numbers,
    # and the adapter's initialisation must not depend on whether the model was already cached.
    torch.manual_seed(config.run.seed)
    if config.lora.use_lora:
        model = inject_lora(model, lora)
    backend = make_backend(config.backend.name, model=model, config=config, base_model_path=base_dir)
    engine = make_engine(config.rollout.engine, backend=backend, tokenizer=tokenizer, config=config,
                         base_model_dir=base_dir, run_dir=run_dir)
    with contextlib.closing(engine):  # a launched server must not outlive the run, whatever ends it
        prompt_cache: dict[int, list[int]] = {}

        log = MetricsLog(run_dir / "metrics.jsonl")
        start_step, meta = 0, {}
        checkpoints = list_checkpoints(run_dir) if resume else []
        if checkpoints:
            state, meta = _load_checkpoint(checkpoints, backend)
            torch.set_rng_state(state["torch_rng"])
            start_step = meta["step"]
        publish(engine, backend, meta.get("version", 0))  # the initial adapter, or the resumed one
        # Before any time goes into evaluation or sampling: the engine must score like the trainer under that
        # version, or it serves other weights (an attached server started on another model, an adapter that
        # did not load). The probe is this rank's first prompts of the next step, scored after their first token.
        if start_step < config.run.steps:
            probe = [encode(tokenizer, format_prompt(train_problems[i].question, tokenizer)) for i in
                     prompt_indices(len(train_problems), config.rollout.prompts_per_step, start_step,
                                    config.run.seed)[d.rank::d.world][:config.rollout.probe_size]]
            first = verify_delivery(engine, backend, probe, [1] * len(probe), config)
            if first is not None and first > sync_threshold(config):
                raise TrainingError(
                    f"before step {start_step + 1}: {engine.name} log-probs of training prompts differ from the "
                    f"trainer's by {first:.2e} on average under version {meta.get('version', 0)} (limit "
                    f"{sync_threshold(config):.0e}, rollout.max_sync_logprob_diff): the engine does not serve "
                    f"model.path={config.model.path!r} with this adapter. A server given by rollout.server_url may "
                    "have been started on another model or in another dtype, or the adapter did not load; check the "
                    "engine's log")
        if d.main:
            log.truncate_after(start_step)
            if not checkpoints and log.path.exists():
                log.path.unlink()

        before = meta.get("eval_before")
        if before is None:
            before = evaluate(engine, tokenizer, eval_problems, reward_fn, config)
        n_trainable, n_adapter_bytes = trainable_parameters(backend.model), adapter_bytes(backend.model)

        rp = config.rollout
        bar = tqdm(range(start_step, config.run.steps), initial=start_step, total=config.run.steps, desc="GRPO",
                   disable=not progress)
        step = start_step
        bad_updates = 0
        with _interrupt_flag() as interrupt:
            for step in bar:
                timer = Timer()
                # LoRA dropout (and a model's own) draws from torch's global generators; a checkpoint holds rank
                # 0's CPU one only, not the GPU's nor other ranks'. Seeded from (run.seed, step, rank) here, a
                # resumed run drops what an uninterrupted one would have.
                torch.manual_seed(step_seed(config.run.seed, step) + _RANK_SEED_MIX * d.rank + _DROPOUT_SEED_MIX)
                # Every rank draws the same prompts for the step and keeps its own share (whole groups).
                indices = prompt_indices(len(train_problems), rp.prompts_per_step, step, config.run.seed)
                indices = indices[d.rank::d.world]
                for i in indices:
                    if i not in prompt_cache:
                        prompt_cache[i] = encode(tokenizer, format_prompt(train_problems[i].question, tokenizer))
                prompts = [prompt_cache[i] for i in indices]
                with timer.phase("rollout"):
                    seed = step_seed(config.run.seed, step) + _RANK_SEED_MIX * d.rank
                    params = SamplingParams(n=rp.group_size, max_new_tokens=rp.max_new_tokens,
                                            temperature=rp.temperature, top_p=rp.top_p, seed=seed)
                    completions = engine.generate(prompts, params)
                texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
                rewards = torch.tensor([reward_fn(t, train_problems[indices[c.prompt_index]].reference)
                                        for t, c in zip(texts, completions, strict=True)])
                advantages = grpo.group_advantages(rewards, rp.group_size, scale_std=config.grpo.scale_std)

                batch = make_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                                   tokenizer.pad_token_id)
                behaviour = torch.zeros_like(batch.completion_mask)
                for row, c in enumerate(completions):
                    start = len(prompts[c.prompt_index]) - 1
                    behaviour[row, start:start + len(c.logprobs)] = torch.tensor(c.logprobs)
                with timer.phase("update"):
                    stats = grpo_update(backend, batch, behaviour, advantages, config)
                # A NaN/inf loss or gradient skips that optimizer step (the backend refuses it); several in a
                # row mean the run is broken, and going on would only burn compute.
                bad_updates = bad_updates + 1 if stats["skipped_updates"] else 0
                if bad_updates:
                    print(f"lora-rl: warning: step {step + 1}: non-finite loss or gradient, update skipped "
                          f"({bad_updates} in a row)", file=sys.stderr)
                if bad_updates >= config.train.max_bad_updates:
                    # Not "--resume": a resume keeps the run's settings (it refuses a new train.lr or dtype), and
                    # with them it repeats these same seeded steps into the same non-finite updates.
                    raise TrainingError(f"{bad_updates} updates in a row had a NaN/inf loss or gradient (steps "
                                        f"{step + 2 - bad_updates}-{step + 1}): start again in a new run.output_dir "
                                        "with a lower train.lr, train.max_grad_norm > 0 or model.dtype=float32 (a "
                                        "--resume keeps this run's settings, and with them repeats these steps)")
                with timer.phase("sync"):
                    sync = publish(engine, backend, step + 1)
                with timer.phase("verify"):
                    delivery = verify_delivery(engine, backend, [prompts[c.prompt_index] + c.token_ids
                                                                 for c in completions],
                                               [len(prompts[c.prompt_index]) for c in completions], config)
                if delivery is not None and delivery > sync_threshold(config):
                    raise TrainingError(
                        f"step {step + 1}: after publishing version {step + 1}, {engine.name} log-probs differ from the "
                        f"trainer's by {delivery:.2e} on average (limit {sync_threshold(config):.0e}, "
                        "rollout.max_sync_logprob_diff): the engine is not serving the adapter just trained, so its "
                        "samples would train the policy off-policy without warning. Check the engine log; "
                        "the last checkpoint is intact for --resume")

                totals, generated, tokens = _step_record(rewards, texts, completions, batch, stats)
                record = step_record(step, totals, timer.seconds, generated, tokens, sync.bytes, delivery,
                                     getattr(engine, "restarts", 0), n_trainable, n_adapter_bytes, wall_start)
                if config.eval.every and (step + 1) % config.eval.every == 0:
                    scores = evaluate(engine, tokenizer, eval_problems, reward_fn, config)
                    record.update({f"eval_{k}": v for k, v in scores.items()})
                if d.main:
                    log.write(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.2f}", kl=f"{record.get('kl', 0.0):.3f}")
                if on_step is not None:
                    on_step(record)

                last = step + 1 == config.run.steps
                stop = (should_stop is not None and should_stop()) or interrupt["set"]
                stop = distributed.any_rank(stop, d.device)  # every rank must stop at the same step
                every = config.run.checkpoint_every
                if last or stop or (every and (step + 1) % every == 0):
                    save_checkpoint(run_dir, step + 1, backend, {"torch_rng": torch.get_rng_state()},
                                    {"version": step + 1, "data_position": (step + 1) * rp.prompts_per_step,
                                     "eval_before": before, "world_size": d.world},
                                    keep=config.run.keep_checkpoints)
                if stop:
                    step += 1
                    break
            else:
                step = config.run.steps
        bar.close()

        adapter_dir = None
        try:
            after = evaluate(engine, tokenizer, eval_problems, reward_fn, config)
            if config.lora.use_lora:
                adapter_dir = backend.save_adapter(run_dir / "adapter")
        except KeyboardInterrupt:
            # Ctrl-C here stops at once (there is no step left to finish), and the traceback alone left users
            # thinking the run was lost: the step's checkpoint is on disk and a resume only evaluates and exports.
            if d.main:
                print(f"\nlora-rl: interrupted during the final evaluation or adapter export; the checkpoint of step "
                      f"{step} is kept: run the same command with --resume to "
                      f"{'finish the run' if step == config.run.steps else 'go on from it'}", file=sys.stderr)
            raise
        summary = run_summary(config, steps_done=step, eval_problems=eval_total if config.eval.size else 0,
                              before=before, after=after, wall_start=wall_start, total_params=total_params,
                              n_trainable=n_trainable, n_adapter_bytes=n_adapter_bytes, adapter_dir=adapter_dir)
        if d.main:
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        distributed.barrier()
        return summary
