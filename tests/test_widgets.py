"""The control panel's logic in plain Python: set `.value`, `.click()`, read what it shows."""

from __future__ import annotations

import re

import pytest

from lora_rl.widgets import LoRAPanel


def _estimate(panel) -> str:
    return re.search(r"class='estimate'>([^<]+)<", panel.info.value).group(1)


@pytest.fixture
def panel(random_model_dir, tmp_path):
    p = LoRAPanel("examples/quickstart.yaml", output_root=str(tmp_path))
    p.model.options = [*p.model.options, str(random_model_dir)]
    p.model.value = str(random_model_dir)
    return p


def test_targets_come_from_the_models_linear_layers(panel):
    assert panel.targets.options == ("all-linear", "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                     "v_proj")


def test_changing_rank_or_targets_updates_the_estimate(panel):
    panel.rank.value = 8
    before, trainable = _estimate(panel), re.search(r"class='trainable'>([^<]+)<", panel.info.value).group(1)
    panel.rank.value = 64
    assert _estimate(panel) != before
    assert re.search(r"class='trainable'>([^<]+)<", panel.info.value).group(1) != trainable
    panel.targets.value = ["q_proj", "v_proj"]
    assert "lora.target_modules=[q_proj,v_proj]" in panel.overrides()
    smaller = panel.estimate()[0].trainable_params
    panel.targets.value = ["all-linear"]
    assert panel.estimate()[0].trainable_params > smaller
    panel.devices.value = 4
    assert panel.estimate()[1].weights_gib < panel.estimate()[1].weights_gib * 4  # sharded by the GPU count


@pytest.mark.parametrize(("backend", "engine", "needle"), [
    ("archon", "vllm", "Archon has no LoRA support"),
    ("megatron", "embedded", "a Megatron backend does not have"),
])
def test_an_unsupported_pair_disables_run_and_says_why(panel, backend, engine, needle):
    panel.backend.value, panel.engine.value = backend, engine
    assert panel.run_button.disabled
    assert needle in panel.why_not_runnable() and needle in panel.info.value
    panel.backend.value, panel.engine.value = "fsdp2", "embedded"
    assert not panel.run_button.disabled and "supported" in panel.info.value


def test_a_config_the_cli_would_refuse_is_refused_here(panel):
    panel.engine.value = "vllm"
    panel.use_lora.value = False
    assert panel.run_button.disabled and "never full weights" in panel.why_not_runnable()


def test_run_trains_and_stop_keeps_a_checkpoint(panel, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    panel.output_root = "runs"  # relative, as by default: the status names the folder absolutely
    panel.steps.value = 2
    panel.group_size.value = 2
    panel.run_button.click()
    summary = panel.wait(300)
    assert panel.error is None and summary["steps_done"] == 2 and "finished after step 2" in panel.status.value
    assert f"run folder {tmp_path / 'runs' / 'panel-'}" in panel.status.value
    assert panel.progress.value == 2 and not panel.run_button.disabled
    panel.steps.value = 500
    panel.run_button.click()
    assert panel.run_button.disabled  # one run at a time
    panel.stop_button.click()
    summary = panel.wait(300)
    assert summary["stopped_early"] and summary["steps_done"] < 500
    assert list((tmp_path / summary["run_dir"]).glob("checkpoints/step_*")), "Stop keeps the last checkpoint"


def test_run_is_refused_for_what_lora_rl_validate_refuses(panel):
    """The panel checks what `lora-rl validate` checks, the model's layers included: all-linear mixed with
    names is refused there, so Run is disabled here, and the trainable count is all-linear's."""
    panel.targets.value = ["all-linear"]
    all_linear = re.search(r"class='trainable'>([^<]+)<", panel.info.value).group(1)
    panel.targets.value = ["all-linear", "q_proj"]
    assert panel.run_button.disabled and "all-linear" in panel.why_not_runnable()
    assert re.search(r"class='trainable'>([^<]+)<", panel.info.value).group(1) == all_linear


def test_the_recipe_s_rank_and_training_options_are_kept(random_model_dir, tmp_path):
    """A recipe's rank outside the slider's usual choices opens as itself (config() carries it), and the
    memory estimate follows the recipe's training options as `lora-rl estimate` does."""
    from lora_rl.estimate import estimate_for_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {random_model_dir}\nlora:\n  lora_rank: 12\n  use_lora: false\n"
                      "train:\n  master_weights: false\n  chunked_logprobs: false\n")
    panel = LoRAPanel(str(recipe), output_root=str(tmp_path))
    assert panel.rank.value == 12 and panel.config().lora.lora_rank == 12
    cli = estimate_for_config(panel.config())
    assert panel.estimate()[0].total_gib == pytest.approx(cli.total_gib)


def test_opening_the_panel_keeps_the_recipes_targets(tmp_path):
    recipe = tmp_path / "qv.yaml"
    recipe.write_text(open("examples/quickstart.yaml").read().replace("target_modules: [all-linear]",
                                                                      "target_modules: [q_proj, v_proj]"))
    p = LoRAPanel(str(recipe), output_root=str(tmp_path))
    assert p.targets.value == ("q_proj", "v_proj")
    assert p.config().lora.target_modules == ("q_proj", "v_proj")


def test_a_fused_layout_target_shows_an_estimate(tmp_path):
    """Phi-3 names its layers qkv_proj and gate_up_proj; picking one the panel offers must not raise."""
    from transformers import Phi3Config

    model = tmp_path / "phi3"
    Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=128, vocab_size=1000, pad_token_id=0).save_pretrained(model)
    p = LoRAPanel("examples/quickstart.yaml", output_root=str(tmp_path))
    p.model.options = [*p.model.options, str(model)]
    p.model.value = str(model)
    assert "qkv_proj" in p.targets.options
    p.targets.value = ["qkv_proj"]
    assert p.estimate()[0].trainable_params == 2 * p.rank.value * (64 + 3 * 64)
    assert "no memory estimate" not in p.info.value


def test_a_library_warning_shows_in_the_panel(panel):
    """A rank above the tiny model's k_proj width (32) is allowed but pointless: the panel says so where the
    user looks (a callback's stderr is lost in JupyterLab)."""
    panel.rank.value = 64
    assert "class='warning'>lora-rl: lora.lora_rank=64 is above the smaller side" in panel.info.value
    assert not panel.run_button.disabled
    panel.rank.value = 16
    assert "class='warning'" not in panel.info.value


def test_the_estimate_is_the_cli_s_for_the_chosen_settings(tmp_path):
    """The estimate starts from the widgets' config, not the bare recipe: megatron with vllm chosen is
    estimated (the recipe's embedded engine would refuse megatron), with the numbers `lora-rl estimate`
    prints for the same overrides."""
    from lora_rl.config import load_config
    from lora_rl.estimate import estimate_for_config

    p = LoRAPanel("examples/quickstart.yaml", output_root=str(tmp_path))
    p.engine.value, p.backend.value, p.group_size.value = "vllm", "megatron", 4
    assert "no memory estimate" not in p.info.value
    cli = load_config("examples/quickstart.yaml", ["backend.name=megatron", "rollout.engine=vllm",
                                                   "rollout.group_size=4"])
    chosen, full = p.estimate()
    assert chosen == estimate_for_config(cli) and full == estimate_for_config(cli, use_lora=False)
    assert re.search(r"class='trainable'>([^<]+)<", p.info.value).group(1) == f"{chosen.trainable_params / 1e3:.2f}k"


def test_full_fine_tuning_shows_every_parameter_as_trainable(panel):
    """use_lora off trains every weight: no LoRA rank or adapter size, all parameters trainable."""
    from lora_rl.models import meta_model

    panel.use_lora.value = False
    total = sum(p.numel() for p in meta_model(panel.model.value).parameters())
    assert "trainable (full fine-tuning)" in panel.info.value and "LoRA r=" not in panel.info.value
    assert re.search(r"class='trainable'>([^<]+)<", panel.info.value).group(1) == f"{total / 1e3:.2f}k"
    assert "adapter size" not in panel.info.value


def test_a_model_that_cannot_load_disables_run_and_says_why(panel, random_model_dir, tmp_path):
    """The model dropdown's observer must not raise (the panel would stay stale with Run enabled): the
    library's message shows in the panel, Run is disabled, and start() says why it did not start."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    panel.model.options = [*panel.model.options, str(bad)]
    panel.model.value = str(bad)
    assert "config.json cannot be read" in panel.info.value and panel.run_button.disabled
    panel.start()
    assert not panel._running and "not started" in panel.status.value
    assert "config.json cannot be read" in panel.status.value
    panel.model.value = str(random_model_dir)  # a loadable model again: runnable again
    assert not panel.run_button.disabled and "cannot be read" not in panel.info.value


def test_the_status_says_what_a_run_did_not_measure_and_shows_errors_as_text(tmp_path, monkeypatch):
    """A recipe with eval.size=0 skips evaluation (summary.json holds null): the status said 'held-out accuracy
    0.0% -> 0.0%'. An error's text is shown as text: '<pad>' in a message vanished as an unknown HTML tag."""
    import html

    import lora_rl.trainer

    panel = LoRAPanel("examples/quickstart.yaml", output_root=str(tmp_path))
    monkeypatch.setattr(lora_rl.trainer, "train", lambda config, **_: {
        "stopped_early": False, "steps_done": 3, "accuracy_before": None, "accuracy_after": None})
    panel.start()
    panel.wait(60)
    assert "held-out accuracy n/a (eval.size=0) -> n/a (eval.size=0)" in panel.status.value
    assert "0.0%" not in panel.status.value

    def fails(config, **_):
        raise ValueError("the tokenizer has no <pad> token")

    monkeypatch.setattr(lora_rl.trainer, "train", fails)
    panel.start()
    panel.wait(60)
    assert panel.error == "ValueError: the tokenizer has no <pad> token"
    assert html.escape(panel.error) in panel.status.value and "<pad>" not in panel.status.value


def test_a_built_in_tiny_model_is_counted_as_built(tmp_path, monkeypatch):
    """A built-in tiny model's vocabulary is what its tokenizer's training reached, which can fall short of the
    recipe's vocab_size (tiny-arith: 350 of 384): the panel showed tiny-arith as 836.74k parameters, all trainable
    under full fine-tuning, where the run trains 832.38k (the README's 0.83M)."""
    import dataclasses

    from conftest import TEST_RECIPE
    from transformers import AutoModelForCausalLM

    from lora_rl import models

    monkeypatch.setenv("LORA_RL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.BUILTIN_TINY, "tiny-short-vocab", dataclasses.replace(TEST_RECIPE, vocab_size=1024))
    folder = models.resolve_model_path("tiny-short-vocab", progress=False)
    built = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    assert models.model_config("tiny-short-vocab").vocab_size < 1024  # the tokenizer stopped short
    p = LoRAPanel("examples/quickstart.yaml", output_root=str(tmp_path))
    p.model.options = [*p.model.options, "tiny-short-vocab"]
    p.model.value = "tiny-short-vocab"
    p.use_lora.value = False
    assert re.search(r"class='trainable'>([^<]+)<", p.info.value).group(1) == f"{built / 1e3:.2f}k"


def test_opening_the_panel_keeps_a_recipe_s_large_steps_and_group_size(tmp_path):
    """The steps and group-size boxes clamped to their bounds (100,000 and 256): a recipe above them opened as a
    config other than the one `lora-rl train` builds from it, without a word."""
    from lora_rl.config import load_config

    recipe = tmp_path / "big.yaml"
    recipe.write_text("run:\n  steps: 200000\nrollout:\n  group_size: 512\n")
    p = LoRAPanel(str(recipe), output_root=str(tmp_path))
    assert p.config("X") == load_config(str(recipe), ["run.output_dir=X"])
