"""The GRPO loop end to end on a tiny model: run files, learning, resume, and refusing to clobber a run."""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_rl.config import ConfigError, load_config
from lora_rl.metrics import peak_memory, reset_peak_memory, without_timings
from lora_rl.trainer import prompt_indices, train


def _config(model_dir, out_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"run.output_dir={out_dir}", "run.progress=false",
                              "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=12",
                              "task.difficulty=1", "eval.size=50", "lora.lora_rank=8", *overrides])


def test_prompt_order_is_a_fresh_permutation_each_epoch():
    steps = [prompt_indices(10, 5, s, seed=3) for s in range(4)]
    assert sorted(steps[0] + steps[1]) == list(range(10)) == sorted(steps[2] + steps[3])
    assert steps[0] + steps[1] != steps[2] + steps[3]
    assert prompt_indices(10, 5, 1, seed=3) == steps[1]


@pytest.mark.slow
def test_run_writes_its_files_and_reward_rises(warm_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(_config(warm_model_dir, out, "run.steps=40", "run.checkpoint_every=20", "train.lr=5e-3",
                            "rollout.prompts_per_step=16", "rollout.group_size=8"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("reward_mean", "reward_std", "accuracy", "loss", "kl", "clip_fraction", "entropy", "response_length",
                "rollout_tokens_per_s", "update_tokens_per_s", "sync_seconds", "sync_bytes", "peak_memory_gib",
                "trainable_params", "adapter_bytes", "version", "logprob_diff"):
        assert key in records[0], key
    # Learning, against a control: the same prompts and sampling with a learning rate too small to move the
    # adapter. (Comparing the run's own first and last steps was fragile: on this task the reward climbs within
    # the first few steps, and how fast depends on the CPU's rounding.)
    control = train(_config(warm_model_dir, tmp_path / "control", "run.steps=10", "train.lr=1e-9", "eval.size=0",
                            "rollout.prompts_per_step=16", "rollout.group_size=8"))
    assert control["steps_done"] == 10
    lines = (tmp_path / "control" / "metrics.jsonl").read_text().splitlines()
    base = [json.loads(line)["reward_mean"] for line in lines]
    last = [r["reward_mean"] for r in records[-10:]]
    standard_error = (statistics.variance(base) / 10 + statistics.variance(last) / 10) ** 0.5
    rise = statistics.mean(last) - statistics.mean(base)
    assert rise > max(0.1, 4 * standard_error), (base, last)
    # The embedded engine scores with the trainer's weights: behaviour and proximal log-probs agree.
    assert max(r["logprob_diff"] for r in records) < 1e-4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000020", "step_000040"]
    assert (out / "config.yaml").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["eval_decoding"] == "greedy" and 0 <= saved["accuracy_after"] <= 1
    # The final adapter is a standard PEFT folder on top of the base model folder.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(warm_model_dir), out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == summary["trainable_params"]


def test_resumed_run_repeats_the_uninterrupted_one(warm_model_dir, tmp_path):
    full = tmp_path / "full"
    train(_config(warm_model_dir, full, "run.steps=4", "run.checkpoint_every=2", "eval.size=0"))
    part = tmp_path / "part"
    train(_config(warm_model_dir, part, "run.steps=2", "run.checkpoint_every=2", "eval.size=0"))
    # Steps 3-4 after a resume from the step-2 checkpoint (the run is extended to 4 steps).
    train(_config(warm_model_dir, part, "run.steps=4", "run.checkpoint_every=2", "eval.size=0"), resume=True)
    read = lambda d: [without_timings(json.loads(line))  # noqa: E731
                      for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(part) == read(full)


def test_resumed_run_with_lora_dropout_drops_what_the_uninterrupted_one_did(warm_model_dir, tmp_path, monkeypatch):
    """LoRA dropout draws from torch's global generators. A checkpoint restored the CPU one only: on a GPU the
    resumed steps drew their masks from the CUDA generator as seeded at start-up, not as the run had left it.
    Here the CPU generator is left unrestored too, as the CUDA one was."""
    common = ("run.checkpoint_every=1", "eval.size=0", "lora.lora_dropout=0.1")
    full = tmp_path / "full"
    train(_config(warm_model_dir, full, "run.steps=2", *common))
    part = tmp_path / "part"
    train(_config(warm_model_dir, part, "run.steps=1", *common))
    monkeypatch.setattr("torch.set_rng_state", lambda state: None)
    train(_config(warm_model_dir, part, "run.steps=2", *common), resume=True)
    read = lambda d: [without_timings(json.loads(line))  # noqa: E731
                      for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(part) == read(full)


def test_an_existing_run_is_never_overwritten(warm_model_dir, tmp_path):
    out = tmp_path / "run"
    train(_config(warm_model_dir, out, "run.steps=1", "eval.size=0"))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(config.yaml\): pass --resume"):
        train(_config(warm_model_dir, out, "run.steps=1", "eval.size=0"))
    with pytest.raises(ConfigError, match=r"differs from the saved run \(lora.lora_rank: 8 -> 16\)"):
        train(_config(warm_model_dir, out, "run.steps=2", "eval.size=0", "lora.lora_rank=16"), resume=True)
    assert (out / "metrics.jsonl").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not a lora-rl run folder"):
        train(_config(warm_model_dir, other, "run.steps=1"))


def test_a_second_run_over_a_folder_in_use_is_refused(random_model_dir, tmp_path):
    """The same command again with --resume (another terminal) while the run still trains was let in: both
    appended to metrics.jsonl (steps 97, 98, 99 twice, interleaved) and wrote checkpoints over each other."""
    out = tmp_path / "run"
    common = ("run.steps=3", "eval.size=0", "run.checkpoint_every=0")
    refused = []

    def on_step(record):
        if record["step"] == 1:  # the first run still trains
            with pytest.raises(ConfigError, match=r"run.output_dir=.* is in use by another lora-rl run that is still "
                                                  r"running .*choose another run.output_dir"):
                train(_config(random_model_dir, out, *common), resume=True)
            refused.append(record["step"])

    train(_config(random_model_dir, out, *common), on_step=on_step)
    assert refused == [1]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # Once the run has ended, however it ended, its folder is free again.
    assert train(_config(random_model_dir, out, *common), resume=True)["steps_done"] == 3


def test_resume_refuses_what_it_cannot_continue(warm_model_dir, tmp_path):
    import shutil

    import torch

    out = tmp_path / "run"
    common = ("run.checkpoint_every=1", "eval.size=0")
    train(_config(warm_model_dir, out, "run.steps=2", *common))
    with pytest.raises(ConfigError, match=r"holds no run to resume \(no config.yaml there\)"):
        train(_config(warm_model_dir, tmp_path / "typo", "run.steps=2", *common), resume=True)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ConfigError, match=r"run.steps=1, below the newest checkpoint .*step_000002, step 2\): resume "
                                          r"with run.steps=2 or more"):
        train(_config(warm_model_dir, out, "run.steps=1", *common), resume=True)
    # The folder may be spelled otherwise, or moved: the run is the one whose config.yaml is there.
    assert train(_config(warm_model_dir, f"{out}/", "run.steps=2", *common), resume=True)["steps_done"] == 2
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    newest = moved / "checkpoints" / "step_000002"
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    (newest / "backend" / ".metadata").write_bytes(b"")  # the layout of a checkpoint two processes wrote
    with pytest.raises(ConfigError, match=r"--resume on 1 process\(es\), but .*step_000002 was written by 2: FSDP2 "
                                          r"saves sharded state then.*Resume with --nproc 2"):
        train(_config(warm_model_dir, moved, "run.steps=3", *common), resume=True)
    (newest / "backend" / ".metadata").unlink()
    (newest / "meta.json").write_text(json.dumps(meta))
    state = torch.load(newest / "backend" / "state.pt", weights_only=True)
    name = next(iter(state["trainable"]))
    torch.save({**state, "trainable": {**state["trainable"], name: torch.zeros(3, 3)}}, newest / "backend" / "state.pt")
    with pytest.raises(ConfigError, match=rf"holds {re.escape(name)} of shape \[3, 3\], but this model's is .*not the "
                                          r"one the run trained"):
        train(_config(warm_model_dir, moved, "run.steps=3", *common), resume=True)
    (newest / "state.pt").write_bytes(b"garbage")
    (newest / "backend" / "state.pt").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint .*step_000002 cannot be read .*Delete that folder to resume "
                                          r"from the checkpoint before it"):
        train(_config(warm_model_dir, moved, "run.steps=3", *common), resume=True)
    shutil.rmtree(newest)  # as the message says: the step-1 checkpoint carries on
    assert train(_config(warm_model_dir, moved, "run.steps=3", *common), resume=True)["steps_done"] == 3


def test_non_finite_updates_are_skipped_then_stop_the_run(warm_model_dir, tmp_path, monkeypatch, capsys):
    from lora_rl import grpo
    from lora_rl.trainer import TrainingError

    real = grpo.policy_loss

    def poisoned(*args, **kwargs):  # the loss (and so every gradient) becomes NaN
        loss, per_token, stats = real(*args, **kwargs)
        return loss * float("nan"), per_token, stats

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"3 updates in a row had a NaN/inf loss or gradient \(steps 1-3\)"):
        train(_config(warm_model_dir, out, "run.steps=10", "eval.size=0"))
    assert capsys.readouterr().err.count("update skipped") == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [1, 1]  # the third step raised before logging
    assert all(r["grad_norm"] is None for r in records)  # NaN is written as null


def test_the_fix_for_non_finite_updates_is_one_the_tool_accepts(random_model_dir, tmp_path, monkeypatch):
    """The error said "lower train.lr ...; the last checkpoint is intact for --resume", but --resume refuses a
    new train.lr, and with the run's own settings it repeats the same seeded steps into the same NaNs."""
    from lora_rl import grpo
    from lora_rl.trainer import TrainingError

    real, calls = grpo.policy_loss, [0]

    def poisoned_after_step_1(*args, **kwargs):
        loss, per_token, stats = real(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] > 1 else loss), per_token, stats

    monkeypatch.setattr(grpo, "policy_loss", poisoned_after_step_1)
    out = tmp_path / "run"
    common = ("run.steps=6", "eval.size=0", "run.checkpoint_every=1", "rollout.prompts_per_step=4",
              "rollout.group_size=2", "train.micro_batch_size=64")
    with pytest.raises(TrainingError, match=r"\(steps 2-4\)") as err:
        train(_config(random_model_dir, out, *common))
    monkeypatch.setattr(grpo, "policy_loss", real)
    message = str(err.value)
    with pytest.raises(ConfigError, match=r"differs from the saved run \(train.lr"):
        train(_config(random_model_dir, out, *common, "train.lr=1e-4"), resume=True)
    assert "intact for --resume" not in message
    assert "start again in a new run.output_dir with a lower train.lr" in message
    assert train(_config(random_model_dir, tmp_path / "new", *common, "train.lr=1e-4"))["steps_done"] == 6


@pytest.mark.slow
def test_sigint_stops_after_the_step_with_a_checkpoint(warm_model_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "lora_rl.cli", "train", "examples/quickstart.yaml",
                            f"model.path={warm_model_dir}", f"run.output_dir={out}", "run.steps=500",
                            "run.checkpoint_every=0", "run.progress=false", "eval.size=0",
                            "rollout.prompts_per_step=4", "rollout.group_size=4"],
                           cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "slow"
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert "stopping after this step, with a checkpoint" in err  # heard at once, not only when the step ends
    assert "stopped early after step" in err and "--resume" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{steps:06d}"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps_done"] == steps
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("prompts", [6, 2])
def test_minibatches_must_divide_each_processs_share(random_model_dir, tmp_path, monkeypatch, prompts):
    """grpo_update splits each process's share: 6 prompts x 2 over 2 processes is 6 rows a process, which
    4 minibatches would split into 6 optimizer steps (2 prompts: none at all), though 12 divides by 4."""
    import torch

    from lora_rl import distributed, trainer

    monkeypatch.setattr(trainer.distributed, "init", lambda: distributed.Dist(rank=0, world=2, device=torch.device("cpu")))
    config = _config(random_model_dir, tmp_path / "run", f"rollout.prompts_per_step={prompts}",
                     "rollout.group_size=2", "grpo.minibatches=4")
    with pytest.raises(ConfigError, match=r"grpo.minibatches=4 does not divide each process's share .* "
                                          rf"{prompts // 2 * 2} sequences"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_an_eval_set_smaller_than_the_process_count_is_refused(random_model_dir, tmp_path, monkeypatch):
    """Each process scores a share of the eval set: with 1 problem for 2 processes one share is empty."""
    import torch

    from lora_rl import distributed, trainer

    monkeypatch.setattr(trainer.distributed, "init", lambda: distributed.Dist(rank=1, world=2, device=torch.device("cpu")))
    with pytest.raises(ConfigError, match=r"eval.size=1 gives 1 test problems for 2 processes.*eval.size >= 2"):
        train(_config(random_model_dir, tmp_path / "run", "eval.size=1"))
    assert not (tmp_path / "run").exists()


def _record_worker(rank: int, world: int, port: int, out_path) -> None:
    """Rank 0 has 4 valid completion tokens with entropy 1.0, rank 1 has 12 with entropy 3.0."""
    import os

    import torch

    from lora_rl import distributed
    from lora_rl.batching import make_batch
    from lora_rl.rollout import Completion
    from lora_rl.trainer import _step_record

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    distributed.init()
    try:
        length = 4 if rank == 0 else 12
        completions = [Completion(prompt_index=0, token_ids=[5] * length, logprobs=[0.0] * length,
                                  finish_reason="stop", version=0)]
        batch = make_batch([[1, 2]], [c.token_ids for c in completions], 0)
        stats = {"entropy": 1.0 if rank == 0 else 3.0, "loss": 0.0, "grad_norm": 1.0, "skipped_updates": 0}
        record, _, _ = _step_record(torch.tensor([1.0]), ["#### 5"], completions, batch, stats)
        if rank == 0:
            torch.save(record, out_path)
    finally:
        distributed.shutdown()


def test_per_token_metrics_weigh_each_process_by_its_tokens(tmp_path):
    """Entropy, KL, clip fractions... are token means: over 2 processes they must be the mean one process
    computes on the same tokens ((4 x 1 + 12 x 3) / 16 = 2.5), not the mean of the ranks' means (2.0)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_record_worker, args=(2, port, tmp_path / "record.pt"), nprocs=2, join=True)
    assert torch.load(tmp_path / "record.pt")["entropy"] == pytest.approx(2.5)


def test_a_run_that_never_started_gives_its_folder_to_a_new_start(tmp_path):
    """A backend or engine that refuses the run after config.yaml is written leaves nothing to continue:
    the fixed command takes the folder over; a run with a step logged still needs --resume."""
    from lora_rl.config import dump_config
    from lora_rl.trainer import _prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, [f"run.output_dir={run}",
                                                                    "backend.cpu_offload=true"])))
    fixed = load_config(None, [f"run.output_dir={run}"])
    _prepare_run_dir(fixed, resume=False)
    assert load_config(str(run / "config.yaml")).backend.cpu_offload is False
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        _prepare_run_dir(fixed, resume=False)
    # How it checkpoints and reaches its server may change on resume; the experiment may not.
    _prepare_run_dir(load_config(None, [f"run.output_dir={run}", "run.checkpoint_every=1",
                                        "rollout.request_timeout=60"]), resume=True)
    with pytest.raises(ConfigError, match=r"differs from the saved run \(lora.lora_rank"):
        _prepare_run_dir(load_config(None, [f"run.output_dir={run}", "lora.lora_rank=4"]), resume=True)


def test_a_resume_deletes_the_checkpoints_a_killed_run_left_half_written(tmp_path):
    """A process killed while saving leaves its checkpoint's temporary folder behind (hidden, never read);
    left there, every such kill kept a whole checkpoint's worth of disk."""
    from lora_rl.config import dump_config
    from lora_rl.trainer import _prepare_run_dir

    config = load_config(None, [f"run.output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(dump_config(config))
    (tmp_path / "metrics.jsonl").write_text("")
    complete = tmp_path / "checkpoints" / "step_000001"
    partial = tmp_path / "checkpoints" / ".step_000002.tmp-x1y2z3"
    for folder in (complete, partial):
        (folder / "backend").mkdir(parents=True)
        (folder / "backend" / "state.pt").write_bytes(b"weights")
    (complete / "meta.json").write_text(json.dumps({"step": 1}))
    # The final adapter: one cut off while written, and one moved aside by a replace that was cut off (where
    # folders cannot be swapped in one step), which is the only copy and goes back under its name.
    for name in (".adapter.tmp-a1b2c3", ".adapter.old-4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(name)
    _prepare_run_dir(config, resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert not list(tmp_path.glob(".adapter*"))
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == ".adapter.old-4242"


def test_a_resume_of_a_trained_run_without_its_checkpoints_is_refused(tmp_path):
    """A finished run copied without its bulky checkpoints/ (or with them deleted), resumed to train longer,
    started over at step 1 without a word and replaced its metrics.jsonl, adapter and summary.json."""
    from lora_rl.config import dump_config
    from lora_rl.trainer import _prepare_run_dir

    config = load_config(None, [f"run.output_dir={tmp_path}", "run.steps=5"])
    (tmp_path / "config.yaml").write_text(dump_config(config))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    (tmp_path / "summary.json").write_text('{"steps_done": 3}')
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ConfigError, match=r"--resume: run.output_dir=.* holds a trained run \(summary.json, adapter/\) "
                                          r"but no checkpoint to continue it from .*Put its checkpoints/ folder back"):
        _prepare_run_dir(config, resume=True)
    assert (tmp_path / "summary.json").read_text() == '{"steps_done": 3}'
    # A run killed before its first checkpoint has nothing else to lose: its resume starts over, as before.
    (tmp_path / "summary.json").unlink()
    (tmp_path / "adapter").rmdir()
    _prepare_run_dir(config, resume=True)


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path):
    from lora_rl.trainer import _prepare_run_dir

    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ConfigError, match=r"run.output_dir=.*(not a lora-rl run folder|cannot be made)"):
            _prepare_run_dir(load_config(None, [f"run.output_dir={path}"]), resume=False)


def _resident_spike(hold_s: float = 0.0) -> None:
    """256 MiB of fresh pages, touched, then handed back to the kernel. A torch tensor would not do: late in a
    long test session the allocator reuses freed heap pages that are resident already, so RSS neither rises
    nor falls (CI saw the peak unchanged before and after the reset)."""
    import mmap

    import torch

    with mmap.mmap(-1, 2 ** 28) as pages:
        view = torch.frombuffer(pages, dtype=torch.uint8)
        view.fill_(1)
        time.sleep(hold_s)
        del view  # the buffer must be released before the mapping closes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the peak RSS resets on Linux only")
@pytest.mark.parametrize("kernel_resets", [True, False])
def test_a_run_measures_its_own_peak_not_the_kernels_lifetime_peak(kernel_resets, monkeypatch, tmp_path):
    """In a notebook kernel or the panel, runs follow each other and whatever else the user did: each run
    (train() resets first) reports the peak since it started; where the kernel keeps VmHWM (a sandbox that
    refuses or ignores clear_refs, as CI's did), a sampler measures it instead."""
    import torch

    from lora_rl import metrics

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA in use: the peak measured is CUDA's (reset_peak_memory_stats)")
    if not kernel_resets:
        monkeypatch.setattr(metrics, "_CLEAR_REFS", tmp_path / "no-such-dir" / "clear_refs")
    _resident_spike()
    lifetime, _ = peak_memory()
    reset_peak_memory()
    since, kind = peak_memory()
    if kernel_resets and metrics._sampling:
        pytest.skip("this kernel keeps VmHWM: the sampled case covers it")
    assert since < lifetime - 0.2, (since, lifetime)
    assert kind == ("cpu-peak-rss" if kernel_resets else "cpu-peak-rss-sampled")
    _resident_spike(hold_s=0.05)  # the next peak is seen again
    again, _ = peak_memory()
    assert again > since + 0.2, (again, since)
    monkeypatch.undo()
    reset_peak_memory()  # leave the module as the next test expects


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the peak RSS resets on Linux only")
def test_the_peak_sampler_stops_when_the_run_ends(monkeypatch, tmp_path):
    """Where the kernel keeps VmHWM, a thread samples RSS during a run; a notebook kernel outlives its runs,
    so the thread must end with the run, a failed one included, and start again with the next."""
    import threading

    import torch

    from lora_rl import metrics, trainer

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA in use: the peak measured is CUDA's")
    monkeypatch.setattr(metrics, "_CLEAR_REFS", tmp_path / "no-such-dir" / "clear_refs")
    samplers = lambda: [t for t in threading.enumerate() if t.name == "lora-rl-rss-sampler"]  # noqa: E731
    for _ in range(2):
        _resident_spike()  # VmHWM now above RSS: the refused reset falls back to the sampler
        seen = []
        monkeypatch.setattr(trainer, "require_backend", lambda name: seen.append(len(samplers())) or 1 / 0)
        with pytest.raises(ZeroDivisionError):
            trainer.train(load_config(None, [f"run.output_dir={tmp_path / 'run'}"]))
        assert seen == [1], "the run should have been sampled"
        assert not samplers(), "the sampler outlived the run"
        assert peak_memory()[1] == "cpu-peak-rss-sampled"  # the last run's peak is still there to read
    monkeypatch.undo()
    reset_peak_memory()


@pytest.mark.parametrize(("task", "difficulty"), [("arithmetic", 2), ("gsm8k", None)])
def test_the_summary_records_difficulty_only_where_it_applies(task, difficulty):
    """task.difficulty is an arithmetic knob; a GSM8K run's summary (and a sweep's table) must not show one."""
    from lora_rl.trainer import run_summary

    scores = {"accuracy": 0.5, "format_rate": 1.0, "lenient_accuracy": 0.5}
    config = load_config(None, [f"task.name={task}", "task.difficulty=2"])
    summary = run_summary(config, steps_done=1, eval_problems=2, before=scores, after=scores, wall_start=0.0,
                          total_params=1, n_trainable=1, n_adapter_bytes=1, adapter_dir=None)
    assert summary["difficulty"] == difficulty


def test_an_interrupt_during_the_final_evaluation_says_the_checkpoint_is_kept(warm_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """Ctrl-C after the last step's checkpoint stops at once; it said nothing of the checkpoint, so users took the
    run for lost. A resume then only evaluates and exports."""
    from lora_rl import trainer

    evaluate, calls = trainer.evaluate, []

    def interrupted_after_training(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after the last step
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", interrupted_after_training)
    out = tmp_path / "run"
    config = _config(warm_model_dir, out, "run.steps=1", "eval.size=4")
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert "the checkpoint of step 1 is kept: run the same command with --resume to finish the run" in \
        capsys.readouterr().err
    assert not (out / "summary.json").exists() and (out / "checkpoints" / "step_000001").is_dir()
    summary = train(config, resume=True)
    assert summary["steps_done"] == 1 and (out / "summary.json").is_file() and (out / "adapter").is_dir()
