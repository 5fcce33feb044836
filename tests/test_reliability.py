"""Reliability: every bad input is one clear error that writes nothing; a vLLM server that really dies is
restarted or fails the run clearly; the API key is enforced; a sweep point that is really killed is
recorded. (SIGKILL-and-resume and SIGINT are in test_fsdp2.py and test_trainer.py, NaN handling in
test_trainer.py, the delivery check in test_vllm.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

from lora_rl.cli import main
from lora_rl.config import ConfigError, LoRAConfig, load_config
from lora_rl.lora import inject_lora, save_adapter
from lora_rl.models import load_model

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, random_model_dir):
    """Files for the bad-input table: each is wrong in exactly one way."""
    root = tmp_path_factory.mktemp("bad")
    (root / "malformed.yaml").write_text("run:\n  steps: [1, 2\n")
    (root / "gsm8k-missing").mkdir()
    (root / "gsm8k-no-answer").mkdir()
    row = {"question": "What is 2 plus 2?", "answer": "2 + 2 is four"}
    for split in ("train", "test"):
        (root / "gsm8k-no-answer" / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    moe = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=320)
    AutoModelForCausalLM.from_config(moe).save_pretrained(root / "moe")
    # An adapter trained on one tiny model whose adapter_config names another (different shapes).
    model, _, _ = load_model(str(random_model_dir))
    adapter = save_adapter(inject_lora(model, LoRAConfig(lora_rank=4)), root / "adapter", random_model_dir)
    other = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320)
    AutoModelForCausalLM.from_config(other).save_pretrained(root / "other-base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "other-base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return root


CASES = [
    ("malformed YAML", ["train", "{root}/malformed.yaml"], "is not valid YAML at line 3"),
    ("unknown key", ["train", "{quick}", "lora.lora_rnak=8"], "did you mean 'lora_rank'"),
    ("wrong type", ["train", "{quick}", "run.steps=many"], "run.steps"),
    ("missing model folder", ["train", "{quick}", "model.path={root}/no-model"], "is neither a built-in model"),
    ("missing dataset file", ["train", "{quick}", "task.name=gsm8k", "task.data_dir={root}/gsm8k-missing"],
     "train.jsonl' does not exist"),
    ("rows without an answer", ["train", "{quick}", "task.name=gsm8k", "task.data_dir={root}/gsm8k-no-answer"],
     "answer has no '#### <number>' line"),
    ("adapter for another base", ["merge", "{root}/adapter", "{out}"], "It was made for another base model"),
    ("rank above the engine's limit", ["train", "{quick}", "rollout.engine=vllm", "lora.lora_rank=600"],
     "above vLLM's largest LoRA rank 512"),
    ("unsupported pair", ["train", "{quick}", "backend.name=megatron", "rollout.engine=embedded"],
     "is not supported: the embedded engine"),
    ("mixture of experts", ["train", "{quick}", "model.path={root}/moe"], "mixture-of-experts"),
    ("Archon with LoRA", ["train", "{quick}", "backend.name=archon", "rollout.engine=vllm"], "Archon has no LoRA"),
    ("mbridge with LoRA", ["train", "{quick}", "backend.name=megatron", "backend.bridge=mbridge",
                           "rollout.engine=vllm"], "mbridge has no LoRA path"),
    ("API key variable unset", ["train", "{quick}", "rollout.engine=vllm-server", "rollout.api_key_env=NO_SUCH_KEY"],
     "rollout.api_key_env='NO_SUCH_KEY' names an environment variable that is not set"),
]


@pytest.mark.parametrize(("what", "argv", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_that_writes_nothing(what, argv, message, bad_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(root=bad_inputs, quick=QUICKSTART, out=out) for a in argv]
    if argv[0] == "train":
        argv.append(f"run.output_dir={out}")
    assert main(argv) == 2, what
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err
    assert not out.exists()


def test_an_existing_run_is_refused_and_left_intact(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("run: {}\n")
    (out / "metrics.jsonl").write_text("{}\n")  # a run that took a step (one that never did is taken over)
    assert main(["train", str(QUICKSTART), f"run.output_dir={out}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "run: {}\n"


# --- a vLLM server that really dies -------------------------------------------------------------------------


def _pids(*needles: str) -> list[int]:
    """Processes whose command line and environment contain every needle."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = b" ".join(Path(f"/proc/{pid}/{part}").read_bytes() for part in ("cmdline", "environ"))
        except OSError:
            continue
        if all(n.encode() in text for n in needles):
            found.append(int(pid))
    return found


def _kill_server_after_step(marker: Path, step: int):
    """on_step callback: SIGKILL this test's vLLM server (its whole process group) once, after `step`."""
    def on_step(record):
        if record["step"] == step:
            (pid, *_) = _pids("vllm.entrypoints.openai.api_server", f"LORA_RL_TEST_RUN={marker}")
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    return on_step


def _server_config(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"run.output_dir={out}", "run.progress=false",
                              "rollout.engine=vllm-server", "rollout.prompts_per_step=4", "rollout.group_size=2",
                              "rollout.max_new_tokens=8", "task.difficulty=1", "eval.size=0", "lora.lora_rank=8",
                              "run.steps=3", *extra])


def test_a_dead_server_is_restarted_and_the_run_finishes(vllm_model_dir, tmp_path, monkeypatch):
    from lora_rl.trainer import train

    monkeypatch.setenv("LORA_RL_TEST_RUN", str(tmp_path))  # marks this test's server in /proc/*/environ
    out = tmp_path / "run"
    summary = train(_server_config(vllm_model_dir, out), on_step=_kill_server_after_step(tmp_path, 1))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps_done"] == 3 and [r["engine_restarts"] for r in records] == [0, 1, 1]
    assert max(r["sync_logprob_diff"] for r in records) < 1e-4  # the restarted server serves the right adapter


def test_a_dead_server_fails_the_run_clearly_when_asked(vllm_model_dir, tmp_path, monkeypatch):
    from lora_rl.rollout import RolloutError
    from lora_rl.trainer import train

    monkeypatch.setenv("LORA_RL_TEST_RUN", str(tmp_path))
    out = tmp_path / "run"
    with pytest.raises(RolloutError, match=r"vllm-server died \(exit code -9\) and is not restarted "
                                           r"\(rollout.on_server_failure=fail\)"):
        train(_server_config(vllm_model_dir, out, "rollout.on_server_failure=fail"),
              on_step=_kill_server_after_step(tmp_path, 1))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # it stopped in step 2


def test_the_api_key_is_enforced(vllm_model_dir, tmp_path, monkeypatch):
    from lora_rl.rollout.vllm_server import VLLMServerEngine

    monkeypatch.setenv("LORA_RL_TEST_KEY", "s3cret-key")
    config = load_config(None, ["rollout.engine=vllm-server", "lora.lora_rank=8", "rollout.api_key_env=LORA_RL_TEST_KEY"])
    model, _, _ = load_model(str(vllm_model_dir))
    engine = VLLMServerEngine(base_model_dir=vllm_model_dir, model=inject_lora(model, config.lora), config=config,
                              run_dir=tmp_path)
    try:
        assert engine.url.startswith("http://127.0.0.1:")  # launched servers bind to loopback only
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(engine.url + "/v1/models", timeout=10)
        assert refused.value.code == 401
        assert engine._served_adapters() == {}  # our requests carry the key
    finally:
        engine.close()


# --- a sweep point that is really killed ----------------------------------------------------------------------


def test_a_killed_sweep_point_is_recorded_and_finished_points_are_kept(random_model_dir, tmp_path):
    from lora_rl.sweep import SweepSpec, run_sweep

    spec = SweepSpec.from_dict({
        "recipe": str(QUICKSTART), "output_dir": str(tmp_path / "sweep"), "parallel": 2, "timeout": 300,
        "overrides": [f"model.path={random_model_dir}", "rollout.prompts_per_step=4", "rollout.group_size=2",
                      "rollout.max_new_tokens=8", "task.difficulty=1", "eval.size=0"],
        "points": [{"run.steps": 2}, {"run.steps": 5000}]})
    long_point = tmp_path / "sweep" / "points"

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for metrics in long_point.glob("steps=5000-*/run/metrics.jsonl"):
                if metrics.stat().st_size > 0:  # the point is mid-run: kill its papermill process
                    for pid in _pids("papermill", str(metrics.parent.parent)):
                        os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer)
    thread.start()
    table = run_sweep(spec, log=lambda line: None)
    thread.join()
    by_steps = {row["run.steps"]: row for row in table.to_dict("records")}
    assert by_steps[2]["status"] == "ok" and by_steps[2]["steps_done"] == 2
    assert by_steps[5000]["status"] == "failed" and by_steps[5000]["reason"] == "killed by signal SIGKILL"


def test_a_checkpoint_without_some_trainable_tensors_is_a_changed_model_not_damage(tmp_path):
    """A model folder that grew (more layers) takes every saved tensor; only the optimizer state failed then,
    and the run blamed a damaged checkpoint (every checkpoint would have failed the same way)."""
    import torch

    from lora_rl.backends.base import check_saved_shapes

    named = {"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(2)),
             "frozen": torch.nn.Parameter(torch.zeros(2), requires_grad=False)}
    check_saved_shapes(named, {"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "backend")
    with pytest.raises(ConfigError, match=r"checkpoint .* holds no b \(1 of this model's trainable tensors are not in "
                                          r"it\): the model in model.path is not the one the run trained"):
        check_saved_shapes(named, {"a": torch.ones(2)}, tmp_path / "backend")


def test_an_empty_checkpoint_file_is_damage_named_with_its_fix(tmp_path):
    """A file cut to nothing (a power cut after the folder's rename, a truncated copy) made torch.load raise
    EOFError, which the resume let through as a bare traceback instead of naming the folder to delete."""
    import torch

    from lora_rl.trainer import _load_checkpoint

    class Backend:
        def load_state(self, folder):
            pass

    checkpoint = tmp_path / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(json.dumps({"step": 2}))
    torch.save({"torch_rng": torch.get_rng_state()}, checkpoint / "state.pt")
    assert _load_checkpoint([checkpoint], Backend())[1] == {"step": 2}
    (checkpoint / "state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"checkpoint .*step_000002 cannot be read \(EOFError.*Delete that folder to "
                                          r"resume from the checkpoint before it"):
        _load_checkpoint([checkpoint], Backend())


def test_folders_and_files_written_into_place_have_plain_permissions(random_model_dir, tmp_path):
    """Everything written to a temporary name and renamed took mkdtemp's 0700 and mkstemp's 0600 along: an
    adapter, a checkpoint or a merged model that another user's vLLM server or job could not read."""
    import stat

    from lora_rl.checkpoint import atomic_write_text
    from lora_rl.lora import merge_to_folder

    previous = os.umask(0o022)
    try:
        model, _, _ = load_model(str(random_model_dir))
        adapter = save_adapter(inject_lora(model, LoRAConfig(lora_rank=4)), tmp_path / "adapter", random_model_dir)
        merged = merge_to_folder(adapter, tmp_path / "merged")
        atomic_write_text(tmp_path / "run" / "summary.json", "{}")
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "adapter") == mode(merged) == 0o755
    assert mode(tmp_path / "run" / "summary.json") == 0o644


def test_weights_written_into_place_are_readable_as_the_umask_allows(random_model_dir, tmp_path):
    """safetensors writes its files 0600 whatever the umask: an adapter's, a merged or a built model's weights
    were the one file of the folder that another user's vLLM server or job could not read."""
    import stat

    from safetensors.torch import save_file

    from lora_rl.lora import merge_to_folder
    from lora_rl.models import _build_atomically

    def build(folder):
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        (folder / "config.json").write_text("{}")

    previous = os.umask(0o022)
    try:
        model, _, _ = load_model(str(random_model_dir))
        adapter = save_adapter(inject_lora(model, LoRAConfig(lora_rank=4)), tmp_path / "adapter", random_model_dir)
        merged = merge_to_folder(adapter, tmp_path / "merged")
        built = _build_atomically(tmp_path / "built", build)
    finally:
        os.umask(previous)
    modes = {str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
             for folder in (adapter, merged, built) for path in folder.iterdir()}
    assert "adapter/adapter_model.safetensors" in modes and "merged/model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o644)



def test_a_checkpoint_save_that_fails_leaves_no_half_written_folder(tmp_path):
    """A full disk while the backend writes its state: the error goes on, the checkpoint before stays, and
    the half-written temporary folder goes (hidden, it kept a checkpoint's worth of the space that ran out
    until a --resume of the same folder removed it; the panel never resumes)."""
    import errno

    import torch

    from lora_rl import checkpoint

    class Backend:
        full = False

        def save_state(self, folder):
            folder.mkdir(parents=True)
            (folder / "state.pt").write_bytes(b"adapter and optimizer state")
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device", str(folder / "state.pt"))

    backend = Backend()
    checkpoint.save_checkpoint(tmp_path, 1, backend, {"torch_rng": torch.get_rng_state()}, {}, keep=2)
    backend.full = True
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(tmp_path, 2, backend, {"torch_rng": torch.get_rng_state()}, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / "step_000001"]


def test_a_checkpoint_is_on_disk_before_it_takes_its_final_name(tmp_path, monkeypatch):
    """Without fsync a power cut can keep the folder's rename and lose its files' data: the newest checkpoint,
    the one a resume picks, would be empty files. Every file and folder is synced before the rename, and the
    parent after it."""
    import torch

    from lora_rl import checkpoint

    class Backend:
        def save_state(self, folder):
            (folder / "shards").mkdir(parents=True)
            torch.save({"w": torch.ones(2)}, folder / "shards" / "rank0.pt")

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    final = checkpoint.save_checkpoint(tmp_path, 3, Backend(), {"torch_rng": torch.get_rng_state()}, {}, keep=2)
    renamed = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(renamed) == 1
    tmp = events[renamed[0]][1]
    synced_before = {path for kind, path in events[:renamed[0]] if kind == "fsync"}
    written = {str(p).replace(str(final), tmp) for p in [final, *final.rglob("*")]}
    assert written <= synced_before, written - synced_before
    assert ("fsync", str(final.parent)) in events[renamed[0]:]


def test_a_users_copy_of_a_checkpoint_is_neither_resumed_from_nor_pruned(tmp_path):
    """`cp -r step_000002 step_000002.bak` inside checkpoints/ sorted after the real checkpoint, so a resume
    loaded the copy, and a later save's pruning deleted it. Steps past 999999 still order by number."""
    import torch

    from lora_rl import checkpoint

    class Backend:
        def save_state(self, folder):
            folder.mkdir(parents=True)
            (folder / "state.pt").write_bytes(b"adapter and optimizer state")

    state = {"torch_rng": torch.get_rng_state()}
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, Backend(), state, {}, keep=2)
    folder = tmp_path / "checkpoints"
    shutil.copytree(folder / "step_000002", folder / "step_000002.bak")
    assert checkpoint.list_checkpoints(tmp_path)[-1].name == "step_000002"
    checkpoint.save_checkpoint(tmp_path, 3, Backend(), state, {}, keep=2)
    checkpoint.save_checkpoint(tmp_path, 1000000, Backend(), state, {}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000003", "step_1000000"]
    assert (folder / "step_000002.bak" / "meta.json").is_file()
