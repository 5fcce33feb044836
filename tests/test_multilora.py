"""Several LoRA adapters in one job: mixed-adapter gradients, grouped sampling, each adapter of a packed job
against its solo run, refused packs, and `lora-rl sweep --pack`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lora_rl.config import ConfigError, LoRAConfig, load_config
from lora_rl.lora import inject_adapters, inject_lora
from lora_rl.metrics import without_timings
from lora_rl.rollout import AdapterRequest, SamplingParams

# An adapter of a packed job against its solo run (same settings and seed), CPU float32, 3 steps: the same
# samples and rewards, float statistics within this relative tolerance, adapter weights within this absolute
# one. Measured over 10 steps: the same samples and rewards at every step, statistics within 1e-6, weights
# within 1.3e-5 of LoRA B values up to 0.044 (AdamW's first steps move every weight by about lr, so a
# rounding-level gradient difference shows there first).
STATS_RTOL = 1e-4
WEIGHTS_ATOL = 1e-4
EXACT = ("step", "version", "reward_mean", "reward_std", "accuracy", "format_rate", "response_length",
         "truncated_fraction", "skipped_updates", "trainable_params", "adapter_bytes")

ADAPTERS = [("adapter0", LoRAConfig(lora_rank=4, lora_alpha=8), 1),
            ("adapter1", LoRAConfig(lora_rank=8, target_modules=("q_proj", "v_proj")), 2)]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40))


def _randomise_b(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_each_adapter_starts_as_its_solo_run_starts():
    model = inject_adapters(_tiny_model(), ADAPTERS)
    for name, lora, seed in ADAPTERS:
        base = _tiny_model()
        torch.manual_seed(seed)  # as trainer.train seeds before injecting
        solo = dict(inject_lora(base, lora).named_parameters())
        own = {n.replace(f".{name}.", ".default."): p for n, p in model.named_parameters() if f".{name}." in n}
        assert own.keys() == {n for n, p in solo.items() if p.requires_grad}
        assert all(torch.equal(p, solo[n]) for n, p in own.items()), name


def test_adapters_stay_in_the_model_dtype():
    model = inject_adapters(_tiny_model().to(torch.bfloat16), ADAPTERS)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "peft-modules"])
def test_mixed_batch_outputs_and_gradients_equal_each_adapters_own(fused, monkeypatch):
    """Rows of several adapters in one forward/backward (`adapter_rows`, through the fused segment function
    or peft's modules) against each adapter alone through peft's own single-adapter forward; a base-model
    segment gets no adapter, and an adapter in two segments gets the sum of both segments' gradients."""
    from lora_rl.lora import adapter_rows, row_segments

    model = inject_adapters(_tiny_model(), ADAPTERS)
    _randomise_b(model)
    x = torch.randint(0, 40, (7, 6), generator=torch.Generator().manual_seed(0))
    names = ["adapter1", "adapter0", "adapter0", "adapter1", "adapter1", "adapter0", None]
    weights = torch.randn(7, 6, 40, generator=torch.Generator().manual_seed(1))
    from lora_rl.fused_lora import SegmentLoRAFunction

    calls, apply = [], SegmentLoRAFunction.apply
    monkeypatch.setattr(SegmentLoRAFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    with adapter_rows(model, row_segments(names), fused=fused):
        mixed_logits = model(input_ids=x).logits
    assert len(calls) == (14 if fused else 0)  # every adapted layer (2 layers x 7 linears) took the fused path
    (mixed_logits * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for name in ("adapter0", "adapter1", None):
        rows = [i for i, n in enumerate(names) if n == name]
        if name is None:
            with model.disable_adapter():
                logits = model(input_ids=x[rows]).logits
        else:
            model.base_model.set_adapter(name)
            logits = model(input_ids=x[rows]).logits
            (logits * weights[rows]).sum().backward()
        assert torch.allclose(mixed_logits[rows], logits, atol=1e-6), name
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == alone.keys() and len(mixed) == 2 * (14 + 4)  # A and B of 14 + 4 adapted layers
    for n in mixed:
        assert torch.allclose(mixed[n], alone[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("merge", [False, True], ids=["low-rank", "merged-copies"])
def test_stacked_sampling_forward_equals_the_segment_forward(merge):
    """Without grad and with equal segments, adapters are applied by two batched matmuls (ranks zero-padded),
    or, merged, by one batched matmul over each adapter's own copy of the weights."""
    from lora_rl.lora import adapter_rows

    model = inject_adapters(_tiny_model(), ADAPTERS)
    _randomise_b(model)
    x = torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(0))
    segments = [("adapter0", 3), ("adapter1", 3)]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        with adapter_rows(model, segments, merge=merge):
            stacked = model(input_ids=x).logits
            assert ("_lora_rl_merged" in vars(layer), "_lora_rl_stacked" in vars(layer)) == (merge, not merge)
        with torch.enable_grad(), adapter_rows(model, segments):  # grad on: the segment forward
            looped = model(input_ids=x).logits.detach()
    assert torch.allclose(stacked, looped, atol=1e-5)
    with torch.no_grad():
        model.base_model.set_adapter("adapter1")
        assert torch.allclose(stacked[3:], model(input_ids=x[3:]).logits, atol=1e-5)


@pytest.mark.parametrize("merge", [False, True], ids=["low-rank", "merged-copies"])
def test_stacked_sampling_forward_on_conv1d_linears(merge):
    """GPT-2's linears are transformers' Conv1D, whose weight is stored [in, out]: the stacked adapters took
    their shapes from the weight as if it were [out, in], and every packed rollout on GPT-2 crashed."""
    from transformers import GPT2Config

    from lora_rl.lora import adapter_rows

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=16))
    model = inject_adapters(gpt2, [("adapter0", LoRAConfig(lora_rank=4, lora_alpha=8), 1),
                                   ("adapter1", LoRAConfig(lora_rank=8, target_modules=("c_attn",)), 2)]).eval()
    _randomise_b(model)
    x = torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with adapter_rows(model, [("adapter0", 3), ("adapter1", 3)], merge=merge):
            stacked = model(input_ids=x).logits
        for name, rows in (("adapter0", slice(0, 3)), ("adapter1", slice(3, 6))):
            model.base_model.set_adapter(name)
            assert torch.allclose(stacked[rows], model(input_ids=x[rows]).logits, atol=1e-5), name


def test_grouped_sampling_draws_what_each_request_draws_alone():
    from lora_rl.rollout.embedded import sample_groups

    model = inject_adapters(_tiny_model(), ADAPTERS)
    _randomise_b(model)
    requests = [AdapterRequest(adapter="adapter0", prompts=[[1, 2, 3], [4, 5]],
                               params=SamplingParams(n=3, max_new_tokens=6, seed=11)),
                AdapterRequest(adapter="adapter1", prompts=[[7, 8, 9, 10]],
                               params=SamplingParams(n=4, max_new_tokens=6, seed=12))]
    together = sample_groups(model, requests, eos_id=39, pad_id=0, versions=[3, 4])
    for request, got, version in zip(requests, together, [3, 4], strict=True):
        (alone,) = sample_groups(model, [request], eos_id=39, pad_id=0, versions=[version])
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
        assert [c.prompt_index for c in got] == [c.prompt_index for c in alone]
        assert all(c.version == version for c in got)
        for a, b in zip(got, alone, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def _config(model_dir, out_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"run.output_dir={out_dir}", "run.progress=false",
                              "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=12",
                              "task.difficulty=1", "eval.size=20", "run.steps=3", *overrides])


VARIANTS = [("lora.lora_rank=8", "run.seed=1"),
            ("lora.lora_rank=4", "lora.lora_alpha=8", "run.seed=2", "train.lr=5e-3"),
            ("lora.lora_rank=16", "lora.target_modules=[q_proj,v_proj]", "run.seed=3", "train.weight_decay=0.01")]


def test_packed_adapters_follow_their_solo_runs(warm_model_dir, tmp_path):
    from lora_rl.multi import train_multi
    from lora_rl.trainer import train

    packed = train_multi([_config(warm_model_dir, tmp_path / f"packed{k}", *v) for k, v in enumerate(VARIANTS)])
    for k, variant in enumerate(VARIANTS):
        solo = train(_config(warm_model_dir, tmp_path / f"solo{k}", *variant))
        assert packed[k].keys() == solo.keys()
        for key in ("accuracy_before", "accuracy_after", "format_rate_after", "trainable_params", "adapter_bytes",
                    "steps_done", "eval_problems"):
            assert packed[k][key] == solo[key], (k, key)
        read = lambda d: [without_timings(json.loads(line))  # noqa: E731
                          for line in (d / "metrics.jsonl").read_text().splitlines()]
        ours, theirs = read(tmp_path / f"packed{k}"), read(tmp_path / f"solo{k}")
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() - {"packed_adapters"} == b.keys()
            for key, value in b.items():
                if key in EXACT or not isinstance(value, float):
                    assert a[key] == value or key in ("sync_logprob_diff", "sync_bytes"), (k, key, a[key], value)
                else:
                    assert math.isclose(a[key], value, rel_tol=STATS_RTOL, abs_tol=1e-6), (k, key, a[key], value)
        ours_w = load_file(tmp_path / f"packed{k}" / "adapter" / "adapter_model.safetensors")
        theirs_w = load_file(tmp_path / f"solo{k}" / "adapter" / "adapter_model.safetensors")
        assert ours_w.keys() == theirs_w.keys()
        worst = max(float((ours_w[n] - theirs_w[n]).abs().max()) for n in ours_w)
        assert worst < WEIGHTS_ATOL, (k, worst)
        moved = max(float(ours_w[n].abs().max()) for n in ours_w if "lora_B" in n)
        assert moved > 10 * WEIGHTS_ATOL  # the adapters did train: the tolerance is not the whole update


@pytest.mark.parametrize(("overrides", "needle"), [
    (["rollout.group_size=8"], r"differs from config 0 in \['rollout.group_size'\]: adapters of one job may differ"),
    (["lora.use_lora=false"], r"differs from config 0 in \['lora.use_lora'\]"),
])
def test_configs_differing_outside_lora_settings_are_refused(tmp_path, overrides, needle):
    from lora_rl.multi import check_packable

    with pytest.raises(ConfigError, match=needle):
        check_packable([_config("m", tmp_path / "a"), _config("m", tmp_path / "b", *overrides)])


@pytest.mark.parametrize(("overrides", "needle"), [
    (["lora.lora_dropout=0.1"], r"lora.lora_dropout=0.1 in a multi-LoRA job"),
    (["backend.activation_checkpointing=true"], r"activation_checkpointing=true in a multi-LoRA job"),
    (["rollout.engine=vllm-server"], r"rollout.engine='vllm-server' in a multi-LoRA job"),
    (["backend.cuda_graphs=true"], r"backend.cuda_graphs=true in a multi-LoRA job: .* Set backend.cuda_graphs=false"),
    (["backend.name=megatron", "rollout.engine=vllm"],
     r"backend.name='megatron' in a multi-LoRA job: .* Set backend.name=fsdp2"),
])
def test_settings_a_packed_job_cannot_honour_are_refused(tmp_path, overrides, needle):
    from lora_rl.multi import check_packable

    with pytest.raises(ConfigError, match=needle):
        check_packable([_config("m", tmp_path / "a", *overrides), _config("m", tmp_path / "b", *overrides)])
    with pytest.raises(ConfigError, match=r"run.output_dir must differ"):
        check_packable([_config("m", tmp_path / "a"), _config("m", tmp_path / "a")])


def test_sweep_runs_points_of_a_refused_pack_alone(tmp_path):
    """A Megatron point trains fused modules the packed (Hugging Face) job cannot: the sweep runs each alone."""
    from lora_rl.sweep import SweepSpec, expand, plan_packs

    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "overrides": ["backend.name=megatron", "rollout.engine=vllm"],
                                "grid": {"lora.lora_rank": [4, 8]}})
    points = expand(spec)
    packs, alone, notes = plan_packs(spec, points)
    assert packs == [] and alone == points
    assert all("not packable (backend.name='megatron' in a multi-LoRA job" in note for note in notes), notes


def test_a_base_model_with_dropout_is_refused(random_model_dir, tmp_path):
    """A packed update runs in eval mode: the model's own dropout would be off where its solo run has it on."""
    from lora_rl.multi import train_multi

    model_dir = tmp_path / "model"
    shutil.copytree(random_model_dir, model_dir)
    settings = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.3}))
    configs = [_config(model_dir, tmp_path / "a", "run.seed=1"), _config(model_dir, tmp_path / "b", "run.seed=2")]
    with pytest.raises(ConfigError, match=r"model.path='.*' has dropout of its own \(\{'attention_dropout': 0.3\} "
                                          r"in its config.json\).* Set its dropout settings to 0"):
        train_multi(configs)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sweep_runs_points_over_a_base_model_with_dropout_alone(random_model_dir, tmp_path):
    """The packed job refuses such a model when it loads it: the sweep must plan those points alone, not pack
    them into a job that fails every one of them."""
    from lora_rl.sweep import SweepSpec, expand, plan_packs

    model_dir = tmp_path / "model"
    shutil.copytree(random_model_dir, model_dir)
    settings = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**settings, "attention_dropout": 0.1}))
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "overrides": [f"model.path={model_dir}"], "grid": {"lora.lora_rank": [4, 8]}})
    points = expand(spec)
    packs, alone, notes = plan_packs(spec, points)
    assert packs == [] and alone == points
    assert all("not packable (model.path=" in note and "has dropout of its own" in note for note in notes), notes
    # Without dropout the same points pack.
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "overrides": [f"model.path={random_model_dir}"], "grid": {"lora.lora_rank": [4, 8]}})
    assert [len(p) for p in plan_packs(spec, expand(spec))[0]] == [2]


def test_a_taken_run_folder_refuses_the_job_before_any_folder_is_made(random_model_dir, tmp_path):
    """Every folder is checked before any is created: after the user frees the taken one, a retry runs."""
    from lora_rl.multi import train_multi

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("the user's")
    configs = [_config(random_model_dir, tmp_path / name, f"run.seed={k}", "run.steps=1", "eval.size=0")
               for k, name in enumerate("ab")]
    with pytest.raises(ConfigError, match=r"run.output_dir='.*b' exists and is not") as err:
        train_multi(configs)
    assert "--resume" not in str(err.value)  # a packed job cannot resume
    assert not (tmp_path / "a").exists()
    shutil.rmtree(tmp_path / "b")
    assert [s["steps_done"] for s in train_multi(configs)] == [1, 1]


def test_a_run_folder_another_run_is_starting_in_refuses_the_job(random_model_dir, tmp_path):
    """A single run that holds its folder but has taken no step yet (still loading) passes the folder checks:
    the packed job must not train into it as well."""
    from lora_rl.multi import train_multi
    from lora_rl.trainer import _run_dir_lock

    (tmp_path / "b").mkdir()
    configs = [_config(random_model_dir, tmp_path / name, f"run.seed={k}", "run.steps=1", "eval.size=0")
               for k, name in enumerate("ab")]
    with _run_dir_lock(tmp_path / "b"):
        with pytest.raises(ConfigError, match=r"run.output_dir='.*b' is in use by another lora-rl run"):
            train_multi(configs)
    assert not (tmp_path / "b" / "config.yaml").exists()
    assert [s["steps_done"] for s in train_multi(configs)] == [1, 1]  # the job's own locks end with it


def test_a_job_that_failed_before_its_first_step_can_be_retried(random_model_dir, tmp_path, monkeypatch):
    """A job that fails after making its folders but before any step (here its engine does not start) leaves
    config.yaml in each: a retry takes them over, as a single run does. Before, every folder was refused."""
    from lora_rl import multi

    real = multi._make_engine

    def fails_once(*args):
        monkeypatch.setattr(multi, "_make_engine", real)
        raise RuntimeError("the engine did not start")

    monkeypatch.setattr(multi, "_make_engine", fails_once)
    configs = [_config(random_model_dir, tmp_path / name, f"run.seed={k}", "run.steps=1", "eval.size=0")
               for k, name in enumerate("ab")]
    with pytest.raises(RuntimeError, match="the engine did not start"):
        multi.train_multi(configs)
    assert (tmp_path / "a" / "config.yaml").is_file()
    assert [s["steps_done"] for s in multi.train_multi(configs)] == [1, 1]
    # A folder holding a step is still refused.
    with pytest.raises(ConfigError, match=r"run.output_dir='.*a' exists and is not an empty folder"):
        multi.train_multi(configs)


def test_non_finite_updates_of_one_adapter_stop_the_job(random_model_dir, tmp_path, monkeypatch, capsys):
    """train.max_bad_updates as in a single run, counted per adapter: the error names the adapter's run folder,
    and every adapter's folder keeps the metrics of the steps done."""
    from lora_rl import multi
    from lora_rl.trainer import TrainingError

    real = multi.micro_loss

    def poisoned(*args):  # a NaN loss for the adapter of seed 2 only
        loss = real(*args)
        return loss * float("nan") if args[6].run.seed == 2 else loss

    monkeypatch.setattr(multi, "micro_loss", poisoned)
    configs = [_config(random_model_dir, tmp_path / name, f"run.seed={k + 1}", "run.steps=4", "eval.size=0",
                       "train.max_bad_updates=2") for k, name in enumerate("ab")]
    with pytest.raises(TrainingError, match=r"2 updates in a row of the adapter of run.output_dir='.*b' had a "
                                            r"NaN/inf loss or gradient \(steps 1-2, train.max_bad_updates=2\): "
                                            r"lower its train.lr"):
        multi.train_multi(configs)
    assert capsys.readouterr().err.count("update skipped") == 2
    for name in "ab":
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped_updates"] for r in records] == [int(name == "b")]  # step 1; step 2 stopped the job
        assert not (tmp_path / name / "adapter").exists()


def test_sweep_pack_gives_the_table_of_separate_runs(tmp_path, random_model_dir):
    from lora_rl.sweep import SweepSpec, run_sweep

    spec = SweepSpec.from_dict({
        "recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"), "parallel": 2, "timeout": 300,
        "overrides": [f"model.path={random_model_dir}", "run.steps=2", "rollout.prompts_per_step=4",
                      "rollout.group_size=2", "rollout.max_new_tokens=8", "task.difficulty=1", "eval.size=8"],
        "grid": {"lora.lora_rank": [4, 8], "lora.target_modules": [["all-linear"], ["q_proj", "v_proj"]]},
        "points": [{"rollout.group_size": 4}]})
    lines = []
    table = run_sweep(spec, pack=True, log=lines.append)
    assert any("packing 4 points into one multi-LoRA job" in line for line in lines), lines
    assert any("runs separately: group_size=4" in line for line in lines), lines
    assert len(table) == 5 and (table["status"] == "ok").all(), table[["point", "status", "reason"]]
    # Packed and separate rows fill the same columns: the table reads as if every point had run alone.
    filled = table.notna()
    assert (filled.eq(filled.iloc[-1]).all(axis=1)).all(), table.columns[~filled.all()].tolist()
    assert sorted(table["trainable_params"][:4]) == sorted(set(table["trainable_params"][:4]))  # 4 distinct adapters
    packed = [json.loads((tmp_path / "sweep" / "points" / p / "status.json").read_text()) for p in table["point"]]
    assert [len(s.get("pack", [])) for s in packed] == [4, 4, 4, 4, 0]
    again = run_sweep(spec, pack=True, log=lines.append)
    assert len(again) == 5 and sum("skipped" in line for line in lines) == 5


def test_packed_job_with_real_vllm(vllm_warm_model_dir, tmp_path):
    """One in-process vLLM engine serves both adapters at once (max_loras 2), each request with its own adapter's
    newest version: behaviour log-probs match the trainer's per adapter, and every sync is verified."""
    from lora_rl.multi import train_multi

    configs = [load_config(None, [f"model.path={vllm_warm_model_dir}", f"run.output_dir={tmp_path / name}",
                                  "run.progress=false", "rollout.engine=vllm", "rollout.prompts_per_step=8",
                                  "rollout.group_size=4", "rollout.max_new_tokens=12", "task.difficulty=1",
                                  "eval.size=8", "run.steps=2", "train.lr=5e-3", *own])
               for name, own in (("a", ["lora.lora_rank=8", "run.seed=1"]),
                                 ("b", ["lora.lora_rank=16", "lora.target_modules=[q_proj,v_proj]", "run.seed=2"]))]
    summaries = train_multi(configs)
    for config, summary in zip(configs, summaries, strict=True):
        out = tmp_path / config.run.output_dir
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["version"] for r in records] == [1, 2]
        for r in records:
            assert 0 < r["sync_bytes"] < 200_000
            assert r["sync_logprob_diff"] < 1e-4  # the engine serves this adapter's version just trained
            assert r["logprob_diff"] < 1e-4  # behaviour (vLLM, this adapter) == the trainer's proximal log-probs
        assert summary["steps_done"] == 2
    assert summaries[0]["trainable_params"] != summaries[1]["trainable_params"]
    assert not (tmp_path / "a" / "rollout_adapters").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="backend.compile compiles on GPUs only")
def test_compiled_packed_update_equals_the_eager_one():
    """backend.compile on a multi-LoRA job: log-probs and each adapter's gradients through the compiled
    decoder layers, micro-batch by micro-batch (one adapter's rows, then mixed rows), as eager."""
    from lora_rl.batching import make_batch
    from lora_rl.multi import MultiLoRAPolicy

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batch = make_batch([torch.randint(1, 40, (5,), generator=g).tolist() for _ in range(6)],
                       [torch.randint(1, 40, (7,), generator=g).tolist() for _ in range(6)], 0)
    results = []
    for compile_ in (False, True):
        configs = [load_config(None, [f"lora.lora_rank={4 * (k + 1)}", f"run.seed={k}", f"backend.compile={compile_}",
                                      f"run.output_dir=unused-{k}"]) for k in range(2)]
        policy = MultiLoRAPolicy(_tiny_model().to(device), configs, device)
        _randomise_b(policy.model)
        assert policy.compiled == compile_
        grads, outs = [], []
        for names in (["adapter0"] * 6, ["adapter1"] * 6, ["adapter0"] * 3 + ["adapter1"] * 3):
            logp, _ = policy.logprobs(batch, names, 1.0, with_grad=True)
            (logp * batch.completion_mask.to(device)).sum().backward()
            outs.append(logp.detach())
            grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
            policy.model.zero_grad()
        results.append((outs, grads))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    for a, b in zip(eager_out, compiled_out, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3, msg=name)
