"""Config loading, overrides and every bad input the config layer must refuse with a clear message."""

from __future__ import annotations

import pytest

from lora_rl.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config, load_config
from lora_rl.support import BACKENDS, ENGINES, MATRIX, matrix_table, pair_status


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = Config()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert config_to_dict(config)["lora"]["target_modules"] == ["all-linear"]


def test_overrides_parse_as_yaml_and_never_mutate_the_input(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  lora_rank: 8\n")
    config = load_config(path, ["lora.lora_rank=32", "lora.target_modules=[q_proj,v_proj]", "grpo.importance_cap=null",
                                "train.lr=1e-4", "run.progress=false"])
    assert config.lora.lora_rank == 32
    assert config.lora.target_modules == ("q_proj", "v_proj")
    assert config.grpo.importance_cap is None
    assert config.train.lr == pytest.approx(1e-4)
    assert config.run.progress is False
    assert load_config(path).lora.lora_rank == 8


def test_areal_vocabulary_is_accepted():
    config = config_from_dict({"lora": {"use_lora": True, "peft_type": "lora", "lora_rank": 16, "lora_alpha": 16,
                                        "target_modules": ["all-linear"]}})
    assert (config.lora.lora_rank, config.lora.lora_alpha) == (16, 16.0)


@pytest.mark.parametrize("section, values, match", [
    ("lora", {"lora_rank": 0}, r"lora\.lora_rank=0 must be a positive integer"),
    ("lora", {"lora_rank": -4}, r"lora\.lora_rank=-4"),
    ("lora", {"lora_alpha": 0}, r"lora\.lora_alpha=0(\.0)? must be positive"),
    ("lora", {"peft_type": "dora"}, r"lora\.peft_type='dora' is not supported: only peft_type: lora"),
    ("lora", {"target_modules": []}, r"lora\.target_modules=\[\] is empty"),
    ("backend", {"name": "deepspeed"}, r"backend\.name='deepspeed' is not a training backend: choose one of fsdp2"),
    ("rollout", {"engine": "tgi"}, r"rollout\.engine='tgi' is not a rollout engine: choose one of embedded"),
    ("rollout", {"group_size": 1}, r"rollout\.group_size=1 must be at least 2"),
    ("task", {"name": "mmlu"}, r"task\.name='mmlu' is not a task"),
    ("grpo", {"kl_estimator": "k4"}, r"grpo\.kl_estimator='k4' is unknown: choose one of k1, k2, k3"),
    ("train", {"lr": 0}, r"train\.lr=0\.0 must be positive"),
])
def test_bad_values_name_field_value_and_fix(section, values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({section: values})


@pytest.mark.parametrize("backend, engine, match", [
    ("archon", "vllm", r"Archon has no LoRA support"),
    ("archon", "sglang", r"Archon has no LoRA support"),
    # Full fine-tuning on Archon was told to use Megatron, which trains adapters only.
    ("archon", "embedded", r"backend\.name=fsdp2 \(LoRA or full fine-tuning\) or backend\.name=megatron \(LoRA\)"),
    ("megatron", "embedded", r"use rollout\.engine=vllm"),
])
def test_pairs_outside_the_support_matrix_are_refused(backend, engine, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"backend": {"name": backend}, "rollout": {"engine": engine}})


def test_support_matrix_is_complete_data_and_matches_the_brief():
    assert set(MATRIX) == {(b, e) for b in BACKENDS for e in ENGINES}
    assert all(pair_status("fsdp2", e).ok for e in ENGINES)
    assert pair_status("megatron", "vllm").ok and pair_status("megatron", "vllm-server").ok
    assert pair_status("megatron", "sglang").ok  # AReaL refuses it; lora-rl's SGLang engine needs PEFT folders only
    assert not any(pair_status("archon", e).ok for e in ENGINES)
    assert "| archon | no | no | no | no |" in matrix_table()


def test_unknown_keys_suggest_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key lora\.'lora_rnk': did you mean 'lora_rank'"):
        config_from_dict({"lora": {"lora_rnk": 8}})
    with pytest.raises(ConfigError, match=r"unknown key 'rollot': did you mean 'rollout'"):
        config_from_dict({"rollot": {}})
    # YAML keys need not be strings: a number, or on/off/yes/no (read as true/false)
    with pytest.raises(ConfigError, match=r"unknown key lora\.8: YAML read this key as int, not text; valid keys"):
        config_from_dict({"lora": {8: "x"}})
    with pytest.raises(ConfigError, match=r"unknown key True: YAML read this key as bool"):
        config_from_dict({True: {}})


@pytest.mark.parametrize("values, match", [
    ({"lora": {"lora_rank": "sixteen"}}, r"lora\.lora_rank='sixteen' must be a whole number"),
    ({"lora": {"lora_rank": 8.5}}, r"lora\.lora_rank=8\.5 must be a whole number"),
    ({"lora": {"use_lora": "yes"}}, r"lora\.use_lora='yes' must be true or false"),
    ({"train": {"lr": "fast"}}, r"train\.lr='fast' must be a number"),
    ({"lora": {"target_modules": [1, 2]}}, r"must be a list of strings"),
    ({"run": {"output_dir": True}}, r"run\.output_dir=True must be a string, but YAML read the value as true/false "
                                     r".*put it in quotes, e\.g\. output_dir: \"\.\.\.\""),
    ({"model": {"path": 7}}, r"model\.path=7 must be a string, but YAML read the value as a number .*e\.g\. path: \"7\""),
    ({"task": {"reward": None}}, r"task\.reward=null must be a string, but YAML read no value .*leave reward out "
                                  r"for its default"),
    ({"run": {"output_dir": __import__("datetime").date(2024, 6, 1)}},
     r"run\.output_dir=datetime\.date\(2024, 6, 1\) must be a string, but YAML read the value as a date .*"
     r"e\.g\. output_dir: \"2024-06-01\""),
    ({"lora": 5}, r"section 'lora' must be a mapping"),
])
def test_wrong_types_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(values)


def test_cross_section_rules():
    with pytest.raises(ConfigError, match=r"grpo\.kl_coef=0\.1 needs lora\.use_lora=true"):
        config_from_dict({"lora": {"use_lora": False}, "grpo": {"kl_coef": 0.1}})
    with pytest.raises(ConfigError, match=r"grpo\.minibatches=3 does not divide the rollout batch of 16"):
        config_from_dict({"rollout": {"prompts_per_step": 2, "group_size": 8}, "grpo": {"minibatches": 3}})


def test_malformed_yaml_missing_file_and_bad_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  lora_rank: [8\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+, column \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")
    # A folder was "does not exist"; a run folder points at the config it saved.
    with pytest.raises(ConfigError, match=r"is a folder: pass a YAML recipe, e.g. examples/quickstart.yaml"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("run: {steps: 1}\n")
    with pytest.raises(ConfigError, match=r"config.yaml', the config this run folder saved"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["lora_rank=8"])


def test_files_that_are_not_a_mapping_of_sections_are_refused_by_name(tmp_path):
    """A YAML list or scalar at the top, a section that is not a mapping (also under an override), a file
    that is not UTF-8, and a key given twice (PyYAML would keep the last one silently) are each one
    ConfigError, not a traceback."""
    cases = {"list.yaml": (b"- a\n- b\n", "must be a mapping of sections"),
             "scalar_section.yaml": (b"lora: 5\n", "section 'lora' must be a mapping of keys, got 5"),
             "latin1.yaml": (b"lora:\n  lora_rank: 8 # \xe9t\xe9\n", "is not UTF-8 text"),
             "twice.yaml": (b"lora:\n  lora_rank: 8\n  lora_rank: 64\n", "key 'lora_rank' is given twice"),
             "two_sections.yaml": (b"lora:\n  lora_rank: 8\nlora:\n  lora_alpha: 3\n", "key 'lora' is given twice")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path, ["lora.lora_alpha=8"])
    path = tmp_path / "list_section.yaml"
    path.write_text("lora: [a, b]\n")
    with pytest.raises(ConfigError, match=r"section 'lora' must be a mapping of keys, got \['a', 'b'\]"):
        load_config(path, ["lora.lora_rank=8"])


@pytest.mark.parametrize("override", ["lora.lora_alpha=.nan", "train.lr=.inf", "train.lr=Infinity", "train.lr=nan",
                                      "grpo.clip_high=-.inf", "rollout.temperature=NaN"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize("key, value", [
    ("model.path", "/data/my model #2"),  # " #" starts a YAML comment
    ("task.reward", "null"), ("rollout.api_key_env", "yes"), ("run.output_dir", "runs/a: b"),
    ("lora.target_modules", ["q_proj", "v_proj"]), ("lora.target_modules", ("q,proj",)), ("train.lr", 1e-05),
    ("lora.use_lora", False), ("task.reward", ""), ("lora.lora_rank", 8),
])
def test_override_text_reads_back_as_the_value(key, value):
    from lora_rl.config import apply_overrides, override

    section, name = key.split(".")
    read = apply_overrides({}, [override(key, value)])[section][name]
    assert read == (list(value) if isinstance(value, tuple) else value) or float(read) == value


def test_override_keeps_the_plain_form_where_yaml_reads_it_back():
    """Sweep point ids hash these texts: plain values must keep the form they always had."""
    from lora_rl.config import override

    assert override("lora.target_modules", ["q_proj", "v_proj"]) == "lora.target_modules=[q_proj,v_proj]"
    assert override("lora.use_lora", False) == "lora.use_lora=false"
    assert override("model.path", "/data/m") == "model.path=/data/m"
    assert override("model.path", "/data/my model #2") == 'model.path="/data/my model #2"'


def test_overrides_given_as_one_string_are_refused():
    """papermill's `-p overrides lora.lora_rank=8` hands the notebook a string, not a list."""
    with pytest.raises(ConfigError, match=r"overrides='lora.lora_rank=8' must be a list of section.key=value strings"):
        load_config(None, "lora.lora_rank=8")


def test_seed_range_and_home_folders():
    with pytest.raises(ConfigError, match=r"run.seed=100000000000000 is out of range"):
        load_config(None, ["run.seed=100000000000000"])
    assert load_config(None, ["run.seed=-1"]).run.seed == -1
    config = load_config(None, ["run.output_dir=~/runs/x", "task.name=gsm8k", "task.data_dir=~/gsm8k"])
    assert not config.run.output_dir.startswith("~") and config.run.output_dir.endswith("/runs/x")
    assert not config.task.data_dir.startswith("~")


def test_data_dir_is_refused_for_a_task_that_makes_its_own_problems():
    with pytest.raises(ConfigError, match=r"task\.data_dir='/data/mine' is set but task\.name='arithmetic' makes its "
                                          r"own problems: .*set task\.name=gsm8k or clear task\.data_dir"):
        load_config(None, ["task.data_dir=/data/mine"])
    assert load_config(None, ["task.name=gsm8k", "task.data_dir=/data/mine"]).task.data_dir == "/data/mine"
    # difficulty is a knob of arithmetic that gsm8k ignores, so a recipe's task switches with task.name alone
    assert load_config(None, ["task.difficulty=3", "task.name=gsm8k"]).task.difficulty == 3


def test_a_sweep_file_given_as_a_run_config_points_to_lora_rl_sweep():
    # It was "unknown key 'recipe'", as if the file were a broken config.
    with pytest.raises(ConfigError, match=r"is a sweep file .*: run it with `lora-rl sweep examples/sweep_rank.yaml`"):
        load_config("examples/sweep_rank.yaml")
