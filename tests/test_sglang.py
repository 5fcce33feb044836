"""SGLang rollout engine: pool rules as config errors, the launch command, versions that drain before they are
unloaded, server errors, and short GRPO runs with the FSDP2 and Megatron backends.

SGLang cannot run on these machines (FIELD_NOTES §3), so the integration tests attach to a stand-in server
(standins/sglang_standin.py) that implements SGLang's LoRA endpoints over the tiny model and the real PEFT
folders the engine writes. With LORA_RL_SGLANG_URL (and LORA_RL_SGLANG_MODEL_DIR, the model that server
serves) the same tests attach to a real SGLang server instead; the few that need the stand-in's insides skip.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from sglang_standin import parse_args, serve, write_test_model
from test_vllm import _versions_with_random_weights

from lora_rl.config import ConfigError, LoRAConfig, load_config
from lora_rl.lora import inject_lora, save_adapter
from lora_rl.models import load_model
from lora_rl.rollout import RolloutError, SamplingParams
from lora_rl.rollout import sglang_server
from lora_rl.rollout.sglang_server import SGLangEngine, server_command

REAL_URL = os.environ.get("LORA_RL_SGLANG_URL", "")
# Float32 on the CPU (the stand-in) agrees with the trainer to ~1e-6; a real server's GPU kernels do not.
ATOL = 2e-2 if REAL_URL else 1e-4
needs_standin = pytest.mark.skipif(bool(REAL_URL), reason="inspects the stand-in server's state")
# The pool every integration test runs against (launch real SGLang with the same flags, see the README).
POOL = ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all", "--max-loaded-loras", "3",
        "--max-loras-per-batch", "2"]


@pytest.fixture(scope="session")
def sglang_model_dir(request):
    """The warm-started tiny model (test_vllm's); LORA_RL_SGLANG_MODEL_DIR names the folder a real server serves."""
    folder = os.environ.get("LORA_RL_SGLANG_MODEL_DIR")
    if folder:
        return Path(folder) if (Path(folder) / "config.json").is_file() else write_test_model(Path(folder))
    return request.getfixturevalue("vllm_warm_model_dir")


@pytest.fixture(scope="module")
def sglang(sglang_model_dir):
    """(url, stand-in or None): a stand-in started in this process, or the real server of LORA_RL_SGLANG_URL."""
    if REAL_URL:
        yield REAL_URL, None
        return
    server, standin, url = serve(["--model-path", str(sglang_model_dir), "--port", "0", *POOL])
    yield url, standin
    server.shutdown()


@pytest.fixture(scope="module")
def peft_model(sglang_model_dir):
    model, _, _ = load_model(str(sglang_model_dir))
    return inject_lora(model, LoRAConfig(lora_rank=8, lora_alpha=16)).eval()


def _config(*overrides):
    return load_config(None, ["rollout.engine=sglang", "lora.lora_rank=8", *overrides])


def _engine(url, model, model_dir, run_dir, *overrides):
    config = _config(f"rollout.server_url={url}", "rollout.request_timeout=20", *overrides)
    return SGLangEngine(base_model_dir=model_dir, model=model, config=config, run_dir=run_dir)


def _publish(engine, model, model_dir, version):
    save_adapter(model, engine.adapter_path(version), model_dir)
    return engine.publish(version, engine.adapter_path(version))


def _post(url, path, payload):
    request = urllib.request.Request(url + path, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --- SGLang's pool rules become config errors before anything starts -----------------------------------------


@pytest.mark.parametrize(("overrides", "needle"), [
    (["lora.lora_rank=32", "rollout.max_lora_rank=16"], "lora.lora_rank=32 is above rollout.max_lora_rank=16"),
    (["rollout.lora_target_modules=[q_proj,v_proj]"], "leaves out ['down_proj', 'gate_proj', 'k_proj', 'o_proj', "
                                                      "'up_proj'], which lora.target_modules=['all-linear'] trains"),
    (["lora.target_modules=[q_proj,o_proj]", "rollout.lora_target_modules=[q_proj]"], "leaves out ['o_proj']"),
    (["lora.target_modules=[q_proj,lm_head]"], "SGLang cannot serve LoRA on ['lm_head']"),
    (["rollout.lora_target_modules=[embed_tokens]"], "SGLang cannot serve LoRA on ['embed_tokens']"),
    (["rollout.live_versions=3", "rollout.max_loaded_loras=3"], "rollout.max_loaded_loras=3 is below "
                                                                 "rollout.live_versions + 1 = 4"),
    (["rollout.max_loras_per_batch=4"], "rollout.max_loras_per_batch=4 is above the adapters the server holds (3"),
    (["lora.use_lora=false"], "never full weights"),
    (["rollout.max_loras_per_batch=0"], "rollout.max_loras_per_batch=0 must be at least 1"),
])
def test_pool_rules_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        _config(*overrides)
    assert needle in str(err.value)


def test_pools_that_fit_every_version_are_accepted():
    _config("lora.target_modules=[q_proj,v_proj]", "rollout.lora_target_modules=[q_proj,v_proj,o_proj]")
    _config("lora.lora_rank=12", "rollout.max_lora_rank=12")  # SGLang has no fixed list of ranks
    _config("rollout.lora_target_modules=[all]", "rollout.max_loaded_loras=8", "rollout.max_loras_per_batch=8")
    megatron = load_config(None, ["backend.name=megatron", "rollout.engine=sglang"])  # relies on PEFT export
    assert megatron.rollout.engine == "sglang"


def test_launch_command_sizes_the_pool_for_every_version():
    config = _config("lora.target_modules=[q_proj,v_proj]", "rollout.live_versions=3", "rollout.max_loras_per_batch=3")
    command = server_command(Path("/m"), config, 31000, {"p-v0": "/runs/p-v0"}, api_key="k")
    assert command[1:3] == ["-m", "sglang.launch_server"]
    args = parse_args(command[3:])  # SGLang's flags as the stand-in parses them, with SGLang's start-up rules
    assert (args.model_path, args.port, args.max_lora_rank) == ("/m", 31000, 8)
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert (args.max_loaded_loras, args.max_loras_per_batch) == (4, 3)  # window of 3 + one draining
    assert args.lora_paths == ["p-v0=/runs/p-v0"] and args.api_key == "k" and args.enable_lora
    all_linear = parse_args(server_command(Path("/m"), _config("rollout.max_lora_rank=64"), 1)[3:])
    assert all_linear.lora_target_modules == ["all"] and all_linear.max_lora_rank == 64
    assert all_linear.lora_paths is None and all_linear.api_key is None


def test_launching_without_sglang_installed_is_a_clear_error(peft_model, sglang_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sglang_server, "LAUNCHER", "no_such_sglang.launch_server")
    with pytest.raises(RolloutError, match=r"launches `python -m no_such_sglang.launch_server`, but SGLang is not "
                                           r"installed in this environment"):
        SGLangEngine(base_model_dir=sglang_model_dir, model=peft_model, config=_config(), run_dir=tmp_path)
    assert not (tmp_path / "sglang.log").exists()


def test_adapter_outside_the_pool_is_refused_before_start_up(peft_model, sglang_model_dir, tmp_path):
    config = _config("lora.target_modules=[q_proj]")  # the pool: q_proj only; the model's adapter: all-linear
    with pytest.raises(ConfigError, match=r"the adapter trains \['down_proj', .*outside SGLang's LoRA pool"):
        SGLangEngine(base_model_dir=sglang_model_dir, model=peft_model, config=config, run_dir=tmp_path)
    assert not (tmp_path / "rollout_adapters").exists()


def test_a_model_whose_linears_sglang_has_no_lora_for_is_refused(tmp_path):
    """`lora-rl validate` refuses it from the config (lora.check_config); the engine from the adapter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_rl.lora import check_config

    gpt2 = tmp_path / "gpt2"  # its linears are c_attn, c_fc and c_proj
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=1, n_positions=32))
    base.save_pretrained(gpt2)
    config = _config(f"model.path={gpt2}")
    needle = r"SGLang cannot serve LoRA on \['c_attn', 'c_fc', 'c_proj'\].*rollout.engine=embedded"
    with pytest.raises(ConfigError, match=needle):
        check_config(config, data=False)
    with pytest.raises(ConfigError, match=needle):
        SGLangEngine(base_model_dir=gpt2, model=inject_lora(base, config.lora), config=config, run_dir=tmp_path)


# --- against the stand-in (or a real server) -------------------------------------------------------------------


def test_stand_in_unload_waits_for_in_flight_requests(sglang, peft_model, sglang_model_dir, tmp_path):
    """The documented semantics the engine is designed around, checked on the stand-in itself."""
    url, standin = sglang
    if standin is None:
        pytest.skip("times the stand-in's unload")
    save_adapter(peft_model, tmp_path / "probe", sglang_model_dir)
    assert _post(url, "/load_lora_adapter", {"lora_name": "probe", "lora_path": str(tmp_path / "probe")})[0] == 200
    status, answer = _post(url, "/load_lora_adapter", {"lora_name": "probe", "lora_path": str(tmp_path / "probe")})
    assert status == 400 and answer["success"] is False and "already loaded" in answer["error_message"]
    assert answer["loaded_adapters"] == {"probe": str(tmp_path / "probe")}
    finished = []
    standin.step_delay = 0.05
    try:
        request = threading.Thread(target=lambda: finished.append(_post(url, "/generate", {
            "input_ids": [5, 6, 7], "lora_path": "probe", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 1.0}})))
        request.start()
        while not standin.in_flight["probe"]:
            time.sleep(0.01)
        assert _post(url, "/unload_lora_adapter", {"lora_name": "probe"})[0] == 200
        request.join()
    finally:
        standin.step_delay = 0.0
    ((status, answer),) = finished
    assert status == 200 and len(answer["meta_info"]["output_token_logprobs"]) == answer["meta_info"]["completion_tokens"]
    # The unload waited for the request: both times are the stand-in's own, taken under its lock (the
    # client's receipt time may come after the unload and proves nothing).
    request_done = max(t for name, t in standin.finished if name == "probe")
    assert standin.unloads[-1][0] == "probe" and standin.unloads[-1][1] >= request_done
    status, answer = _post(url, "/generate", {"input_ids": [5], "lora_path": "probe"})
    assert status == 400 and "not loaded" in answer["error"]["message"]


def test_each_version_is_served_like_the_trainer_scores_it(sglang, peft_model, sglang_model_dir, tmp_path):
    """Four versions through a window of two: each must sample and score like the trainer's weights (so a stale
    adapter fails), behaviour log-probs come at the sampling temperature, and exactly the window stays loaded and
    on disk."""
    from lora_rl.batching import make_batch, token_logprobs

    url, standin = sglang
    engine = _engine(url, peft_model, sglang_model_dir, tmp_path, "rollout.live_versions=2")
    prompt = [5, 17, 9, 30, 11]
    try:
        for version in _versions_with_random_weights(peft_model, 4):
            stats = _publish(engine, peft_model, sglang_model_dir, version)
            assert stats.bytes > 0
            samples = engine.generate([prompt, prompt[:3]], SamplingParams(n=3, max_new_tokens=6, temperature=0.8,
                                                                           seed=3))
            assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
            sample = samples[0]
            assert sample.version == version and len(sample.token_ids) == len(sample.logprobs) > 0
            batch = make_batch([prompt], [sample.token_ids], 0)
            with torch.no_grad():
                ours = token_logprobs(peft_model, batch, 1.0)[0][0, len(prompt) - 1:]
                behaviour = token_logprobs(peft_model, batch, 0.8)[0][0, len(prompt) - 1:]
            (theirs,) = engine.score([prompt + sample.token_ids], [len(prompt)])
            assert torch.allclose(ours, torch.tensor(theirs), atol=ATOL), version
            assert torch.allclose(behaviour, torch.tensor(sample.logprobs), atol=ATOL), version
            window = sorted(engine.versions.name(v) for v in engine.versions.live)
            assert sorted(p.name for p in engine.versions.root.iterdir()) == window
            if standin is not None:
                assert sorted(standin.adapters) == window
        assert engine.versions.live == [2, 3] and engine.retiring == []
    finally:
        engine.close()
    assert not engine.versions.root.exists()
    if standin is not None:
        assert standin.adapters == {}  # an attached server is left as found


def test_greedy_generation_and_stop_reasons(sglang, peft_model, sglang_model_dir, tmp_path):
    url, _ = sglang
    engine = _engine(url, peft_model, sglang_model_dir, tmp_path)
    try:
        _publish(engine, peft_model, sglang_model_dir, 0)
        first, second = engine.generate([[5, 17, 9]] * 2, SamplingParams(n=1, max_new_tokens=5, temperature=0))
        assert first.token_ids == second.token_ids  # greedy: identical
        eos = peft_model.generation_config.eos_token_id
        # "stop" exactly when the last token is EOS, which may also be the fifth
        assert first.finish_reason == ("stop" if first.token_ids[-1] == eos else "length")
        assert len(first.token_ids) == 5 or first.finish_reason == "stop"
    finally:
        engine.close()


@needs_standin
def test_a_version_in_flight_is_unloaded_only_after_it_drains(sglang, peft_model, sglang_model_dir, tmp_path):
    """Window 1, pool of 2: publishing while a generation on the old version is in flight keeps the old version
    loaded until that generation returns; a further publish waits for the drain rather than overfill the pool."""
    url, standin = sglang
    engine = _engine(url, peft_model, sglang_model_dir, tmp_path, "rollout.live_versions=1",
                     "rollout.max_loaded_loras=2")
    name = engine.versions.name
    results, errors = [], []

    def generate_in_background():
        def run():
            try:
                results.append(engine.generate([[5, 17, 9]], SamplingParams(n=2, max_new_tokens=6, seed=1)))
            except Exception as err:  # reported by the assertion below
                errors.append(err)
        thread = threading.Thread(target=run)
        thread.start()
        while not sum(standin.in_flight.values()):
            time.sleep(0.01)
        return thread

    standin.step_delay, standin.max_loaded = 0.05, len(standin.adapters)
    try:
        _publish(engine, peft_model, sglang_model_dir, 0)
        running = generate_in_background()
        _publish(engine, peft_model, sglang_model_dir, 1)
        assert engine.retiring == [0] and sorted(standin.adapters) == [name(0), name(1)]  # v0 is still busy
        assert engine.adapter_path(0).is_dir()
        running.join()
        assert [c.version for c in results[0]] == [0, 0] and not errors
        assert engine.retiring == [] and sorted(standin.adapters) == [name(1)]  # drained, then unloaded
        assert not engine.adapter_path(0).exists()

        running = generate_in_background()  # on version 1
        _publish(engine, peft_model, sglang_model_dir, 2)  # v1 retires busy: the pool is full (2)
        _publish(engine, peft_model, sglang_model_dir, 3)  # must wait for v1 to drain before loading
        running.join()
        assert [c.version for c in results[1]] == [1, 1] and not errors
        assert sorted(standin.adapters) == [name(3)] and standin.max_loaded <= 2
        assert standin.unloads[-2][0] == name(1) and standin.unloads[-1][0] == name(2)
    finally:
        standin.step_delay = 0.0
        engine.close()


def test_a_retried_load_that_had_landed_is_accepted(sglang, peft_model, sglang_model_dir, tmp_path):
    url, _ = sglang
    engine = _engine(url, peft_model, sglang_model_dir, tmp_path)
    try:
        path = engine.adapter_path(0)
        save_adapter(peft_model, path, sglang_model_dir)
        # The first attempt landed but its answer was lost: the engine's load is now refused as already loaded.
        assert _post(url, "/load_lora_adapter", {"lora_name": engine.versions.name(0),
                                                 "lora_path": str(path.resolve())})[0] == 200
        engine.publish(0, path)
        assert engine.version == 0 and engine.generate([[5, 6]], SamplingParams(n=2, max_new_tokens=2))
        # The same name holding another folder is not ours to accept.
        other = tmp_path / "elsewhere"
        save_adapter(peft_model, other, sglang_model_dir)
        assert _post(url, "/load_lora_adapter", {"lora_name": engine.versions.name(1), "lora_path": str(other)})[0] == 200
        save_adapter(peft_model, engine.adapter_path(1), sglang_model_dir)
        with pytest.raises(RolloutError, match=r"loading adapter policy-\w+-v1 .* failed \(HTTP 400"):
            engine.publish(1, engine.adapter_path(1))
        assert engine.version == 0
        assert _post(url, "/unload_lora_adapter", {"lora_name": engine.versions.name(1)})[0] == 200
    finally:
        engine.close()


# --- server errors, against a scripted HTTP server -----------------------------------------------------------------


_HEALTHY = {"/health": [(200, {})]}
_LOADED = (200, {"success": True, "error_message": "", "loaded_adapters": {}})


def test_a_resume_unloads_what_a_killed_run_left_on_an_attached_server(sglang, peft_model, sglang_model_dir,
                                                                       tmp_path):
    """A run killed while attached (never closed) leaves its live versions loaded; its --resume filled the pool of
    live_versions + 1 with its first load and failed at the second ("Maximum number of loaded LoRA adapters")."""
    url, standin = sglang
    killed = _engine(url, peft_model, sglang_model_dir, tmp_path)
    for version in (0, 1, 2):
        _publish(killed, peft_model, sglang_model_dir, version)
    left = [killed.adapter_path(v) for v in killed.versions.live]
    resumed = _engine(url, peft_model, sglang_model_dir, tmp_path)
    try:
        for version in (2, 3, 4):
            _publish(resumed, peft_model, sglang_model_dir, version)
        assert not any(path.exists() for path in left)  # unloaded, then deleted
        if standin is not None:
            assert sorted(standin.adapters) == [resumed.versions.name(3), resumed.versions.name(4)]
    finally:
        resumed.close()


def test_a_5xx_is_retried_and_a_4xx_is_a_clear_error(scripted_server, peft_model, sglang_model_dir, tmp_path):
    refused = (400, {"success": False, "error_message": "LoRA adapter x has rank 8, above --max-lora-rank 4",
                     "loaded_adapters": {}})
    url, script = scripted_server({**_HEALTHY, "/load_lora_adapter": [(503, "busy"), _LOADED, refused]})
    engine = _engine(url, peft_model, sglang_model_dir, tmp_path)
    _publish(engine, peft_model, sglang_model_dir, 0)
    assert engine.version == 0
    with pytest.raises(RolloutError, match=r"loading adapter .*-v1 .* failed \(HTTP 400: .*above --max-lora-rank 4"):
        _publish(engine, peft_model, sglang_model_dir, 1)
    assert engine.version == 0 and engine.versions.live == [0] and engine.adapter_path(0).is_dir()
    assert [p for p, _ in script.calls].count("/load_lora_adapter") == 3  # 503 retried once, the 400 not at all


def test_a_failing_generate_is_retried_then_a_clear_error(scripted_server, peft_model, sglang_model_dir, tmp_path):
    url, script = scripted_server({**_HEALTHY, "/load_lora_adapter": [_LOADED],
                                   "/generate": [(500, {"error": {"message": "scheduler died"}})]})
    engine = _engine(url, peft_model, sglang_model_dir, tmp_path)
    _publish(engine, peft_model, sglang_model_dir, 0)
    with pytest.raises(RolloutError, match=r"sglang at .*: /generate failed after 3 attempts \(HTTP 500"):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))
    assert [p for p, _ in script.calls].count("/generate") == 3


def test_attach_to_nothing_is_a_clear_error(peft_model, sglang_model_dir, tmp_path):
    from lora_rl.rollout.server_common import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutError, match=rf"rollout.server_url='{url}': no healthy SGLang server there.*"
                                           r"sglang.launch_server"):
        _engine(url, peft_model, sglang_model_dir, tmp_path)


@needs_standin
def test_a_launched_server_that_dies_is_restarted_with_the_live_versions(peft_model, sglang_model_dir, tmp_path,
                                                                          monkeypatch):
    """Launch mode, with the stand-in as the launched module: the engine starts it with SGLang's flags; after
    SIGKILL it is restarted with the live version as --lora-paths and serves the same weights."""
    import os as _os
    import signal

    monkeypatch.setattr(sglang_server, "LAUNCHER", "sglang_standin")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parents[1] / "standins"),
                                                      os.environ.get("PYTHONPATH", "")]))
    config = _config("rollout.startup_timeout=120", "rollout.request_timeout=30")
    engine = SGLangEngine(base_model_dir=sglang_model_dir, model=peft_model, config=config, run_dir=tmp_path)
    try:
        assert engine.url.startswith("http://127.0.0.1:") and (tmp_path / "sglang.log").is_file()
        _publish(engine, peft_model, sglang_model_dir, 0)
        prompt = [5, 17, 9]
        before = engine.score([prompt + [11, 12]], [len(prompt)])
        _os.killpg(engine.process.pid, signal.SIGKILL)
        engine.process.wait()
        after = engine.score([prompt + [11, 12]], [len(prompt)])
        assert engine.restarts == 1
        assert torch.allclose(torch.tensor(before), torch.tensor(after), atol=1e-6)
    finally:
        engine.close()
    assert engine.process.poll() is not None and not (tmp_path / "rollout_adapters").exists()


# --- a short GRPO run: FSDP2 backend, SGLang rollouts ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fsdp2", "megatron"])
def test_grpo_steps_with_sglang(sglang, sglang_model_dir, tmp_path, backend):
    """Both training backends - Megatron + SGLang is the pair AReaL does not support - publish every version
    to SGLang as a PEFT adapter, and the server then scores tokens as the trainer does."""
    from lora_rl.trainer import train

    url, standin = sglang
    out = tmp_path / "run"
    config = load_config(None, [f"backend.name={backend}", f"model.path={sglang_model_dir}", f"run.output_dir={out}",
                                "run.progress=false",
                                "rollout.engine=sglang", f"rollout.server_url={url}", "rollout.prompts_per_step=8",
                                "rollout.group_size=4", "rollout.max_new_tokens=12", "task.difficulty=1",
                                "eval.size=20", "lora.lora_rank=8", "run.steps=3", "train.lr=5e-3"])
    summary = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0 < r["sync_bytes"] < 200_000  # only the adapter travels
        assert r["sync_logprob_diff"] < ATOL  # the server serves exactly the version just trained
        assert r["logprob_diff"] < ATOL  # SGLang behaviour log-probs == the trainer's proximal ones
    assert summary["steps_done"] == 3 and Path(summary["adapter_dir"]).is_dir()
    assert not (out / "rollout_adapters").exists()
    if standin is not None:
        assert standin.adapters == {} and standin.max_loaded <= 3


def test_a_megatron_pool_covers_the_fused_layers_it_trains():
    """Megatron adapts q, k and v together for q_proj (and takes its own names): the pool is sized from the
    adapter it will publish. Sized from lora.target_modules, validate passed and train refused the adapter
    after the Megatron model was built; Megatron names were refused outright."""
    from lora_rl.rollout.sglang_server import pool_modules

    assert pool_modules(_config("backend.name=megatron", "lora.target_modules=[q_proj]")) == ("q_proj", "k_proj",
                                                                                              "v_proj")
    assert pool_modules(_config("backend.name=megatron", "lora.target_modules=[linear_qkv,linear_fc2]")) == (
        "q_proj", "k_proj", "v_proj", "down_proj")
    with pytest.raises(ConfigError, match=r"leaves out \['k_proj', 'v_proj'\], which lora.target_modules=\['q_proj'\] "
                                          r"\(backend.name=megatron trains \['q_proj', 'k_proj', 'v_proj'\]"):
        _config("backend.name=megatron", "lora.target_modules=[q_proj]", "rollout.lora_target_modules=[q_proj]")
    assert pool_modules(_config("lora.target_modules=[q_proj]")) == ("q_proj",)  # FSDP2 trains what is asked
