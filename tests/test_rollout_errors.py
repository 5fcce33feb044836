"""How the rollout engines fail: every error is a RolloutError naming what failed, a launched server and its
workers never outlive the run, cleanup never hides the error, and an empty prompt list is no error at all.

Servers are stand-ins: the scripted HTTP server of conftest.py, raw sockets for broken HTTP, a small server
process (STANDIN) for launch mode, and a dead `vllm.LLM` for the in-process engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from conftest import vllm_server_engine as _vllm_server

from lora_rl.config import load_config
from lora_rl.lora import save_adapter
from lora_rl.models import load_model
from lora_rl.rollout import RolloutError, SamplingParams
from lora_rl.rollout.server_common import ServerEngine, free_port

REPO = Path(__file__).parents[1]

# A launched server: answers /health, 401 on /v1/models when asked to, and has a worker in its process group
# (as vLLM's EngineCore) which it stops on SIGTERM, as vLLM does; a SIGKILL leaves the worker orphaned.
STANDIN = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys
    port, pid_file, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()} {worker.pid}")
    signal.signal(signal.SIGTERM, lambda *_: (worker.kill(), os._exit(0)))

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status, body=b"{}"):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            key = os.environ.get("VLLM_API_KEY")  # vLLM guards /v1 with the key in its environment, if any
            if self.path == "/v1/models":
                refused = mode == "models401" or (key and self.headers.get("Authorization") != f"Bearer {key}")
                return self._send(401, b'{"error": "Unauthorized"}') if refused else self._send(200, b'{"data": []}')
            self._send(200 if self.path == "/health" else 404)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(200)

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may never be reaped in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_soon(pids, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_running(p) for p in pids)


def _kill(pids) -> None:
    """Our own stand-in processes, by id, whatever a failed test left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _standin_command(tmp_path: Path, mode: str = "ok"):
    """A `command` method launching STANDIN; every launch writes its leader's and worker's pids to a new file."""
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    pid_files = []

    def command(self, base_model_dir, config, port, initial):
        pid_files.append(tmp_path / f"pids-{len(pid_files)}")
        return [sys.executable, str(script), str(port), str(pid_files[-1]), mode]

    def pids():
        return [[int(p) for p in f.read_text().split()] for f in pid_files]

    return command, pids


class StandInEngine(ServerEngine):
    name = "stand-in"
    label = "stand-in"

    def _load(self, version):
        self._ask("/load", {"version": version})

    def _unload(self, version):
        self._ask("/unload", {"version": version})


def _launched_engine(tmp_path, monkeypatch, mode="ok"):
    command, pids = _standin_command(tmp_path, mode)
    monkeypatch.setattr(StandInEngine, "command", command)
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.startup_timeout=30",
                                "rollout.request_timeout=5"])
    return StandInEngine(base_model_dir=tmp_path, config=config, run_dir=tmp_path), pids


# --- a launched server never outlives the run ----------------------------------------------------------------


def test_a_launched_server_stops_when_the_run_is_ended_by_sigterm(tmp_path):
    """torchrun SIGTERMs the other ranks when one fails (Slurm, timeout and docker stop too): neither atexit nor
    the trainer's contextlib.closing runs, yet the server and its worker must stop with the run."""
    (tmp_path / "standin.py").write_text(STANDIN)
    run = textwrap.dedent(f"""
        import contextlib, sys, time
        from pathlib import Path
        from lora_rl.config import load_config
        from lora_rl.rollout.server_common import ServerEngine

        class StandIn(ServerEngine):
            name = label = "stand-in"
            def command(self, base_model_dir, config, port, initial):
                return [sys.executable, {str(tmp_path / 'standin.py')!r}, str(port), {str(tmp_path / 'pids')!r}, "ok"]

        config = load_config(None, ["rollout.engine=vllm-server", "rollout.startup_timeout=30"])
        engine = StandIn(base_model_dir=Path("."), config=config, run_dir=Path({str(tmp_path)!r}))
        with contextlib.closing(engine):  # as trainer.train does
            print("up", flush=True)
            time.sleep(60)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", run], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    pids = []
    try:
        assert trainer.stdout.readline() == "up\n"
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=30) == -signal.SIGTERM  # the run still ends as SIGTERM ends it
        assert _gone_soon(pids), "the launched server outlived a run ended by SIGTERM"
    finally:
        trainer.kill()
        _kill(pids)


def test_the_workers_of_a_dead_server_are_stopped_on_restart_and_close(tmp_path, monkeypatch):
    """A leader SIGKILLed (OOM killer) leaves its workers running in its process group, holding the GPU."""
    engine, pids = _launched_engine(tmp_path, monkeypatch)
    try:
        engine.versions.path(0).mkdir(parents=True)
        engine.publish(0, engine.versions.path(0))
        (leader, worker), = pids()
        os.kill(leader, signal.SIGKILL)
        engine.versions.path(1).mkdir()
        engine.publish(1, engine.versions.path(1))  # the load fails, the server is restarted (a second launch)
        assert engine.restarts == 1
        assert _gone_soon([worker], 5), "the dead server's worker survived its restart"
        engine.close()
        assert _gone_soon(pids()[1], 5), "the restarted server's worker survived close()"
    finally:
        _kill([p for launch in pids() for p in launch])


def test_a_launched_server_is_stopped_when_the_constructor_fails(tmp_path, monkeypatch):
    def broken(self):
        raise ValueError("a bug after the launch")

    monkeypatch.setattr(StandInEngine, "_attached", broken)
    command, pids = _standin_command(tmp_path)
    monkeypatch.setattr(StandInEngine, "command", command)
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.startup_timeout=30"])
    try:
        with pytest.raises(ValueError, match="a bug after the launch"):
            StandInEngine(base_model_dir=tmp_path, config=config, run_dir=tmp_path)
        assert _gone_soon(pids()[0], 5), "the launched server outlived the failed constructor"
    finally:
        _kill(pids()[0])


# --- HTTP: transport errors, refusals and answers the engines cannot use ----------------------------------------


def _sglang(url, tmp_path, peft_model, model_dir):
    from lora_rl.rollout.sglang_server import SGLangEngine

    config = load_config(None, ["rollout.engine=sglang", "lora.lora_rank=8", f"rollout.server_url={url}",
                                "rollout.request_timeout=1"])
    return SGLangEngine(base_model_dir=model_dir, model=peft_model, config=config, run_dir=tmp_path)


def _publish(engine, model, model_dir, version):
    save_adapter(model, engine.adapter_path(version), model_dir)
    engine.publish(version, engine.adapter_path(version))


_VLLM = {"/health": [(200, "")], "/v1/models": [(200, {"data": []})], "/v1/load_lora_adapter": [(200, "ok")],
         "/v1/unload_lora_adapter": [(200, "ok")]}
_SGLANG = {"/health": [(200, {})], "/load_lora_adapter": [(200, {"success": True, "loaded_adapters": {}})],
           "/unload_lora_adapter": [(200, {"success": True, "loaded_adapters": {}})]}


def _raw_server(reply: bytes) -> str:
    """A TCP server that answers every request with `reply` and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_an_attach_refused_for_want_of_an_api_key_is_a_clear_error(scripted_server, tmp_path, peft_model,
                                                                    vllm_model_dir):
    """vLLM started with --api-key leaves /health open and answers 401 elsewhere."""
    url, _ = scripted_server({**_VLLM, "/v1/models": [(401, {"error": "Unauthorized"})]})
    with pytest.raises(RolloutError, match=r"GET .*/v1/models was refused with HTTP 401 .*rollout.api_key_env"):
        _vllm_server(url, tmp_path, peft_model, vllm_model_dir)


def test_a_launched_server_refusing_the_engine_is_stopped(tmp_path, monkeypatch, peft_model, vllm_model_dir):
    from lora_rl.rollout.vllm_server import VLLMServerEngine

    command, pids = _standin_command(tmp_path, "models401")
    monkeypatch.setattr(VLLMServerEngine, "command", command)
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.startup_timeout=30"])
    try:
        with pytest.raises(RolloutError, match="HTTP 401"):
            VLLMServerEngine(base_model_dir=vllm_model_dir, model=peft_model, config=config, run_dir=tmp_path)
        assert _gone_soon(pids()[0], 5)
    finally:
        _kill(pids()[0])


def test_a_launched_vllm_does_not_inherit_a_stray_api_key(tmp_path, monkeypatch, peft_model, vllm_model_dir):
    """VLLM_API_KEY exported for some other server, rollout.api_key_env empty: the server lora-rl launches must not
    demand that key (vLLM reads VLLM_API_KEY from its environment), since the engine sends none."""
    from lora_rl.rollout.vllm_server import VLLMServerEngine

    command, pids = _standin_command(tmp_path)
    monkeypatch.setattr(VLLMServerEngine, "command", command)
    monkeypatch.setenv("VLLM_API_KEY", "key-of-another-server")
    config = load_config(None, ["rollout.engine=vllm-server", "rollout.startup_timeout=30"])
    try:
        engine = VLLMServerEngine(base_model_dir=vllm_model_dir, model=peft_model, config=config, run_dir=tmp_path)
        engine.close()
    finally:
        _kill(pids()[0])


def test_a_port_that_does_not_speak_http_is_a_clear_error(tmp_path, peft_model, vllm_model_dir):
    url = _raw_server(b"SSH-2.0-OpenSSH_9.6\r\n")  # rollout.server_url typed with another service's port
    with pytest.raises(RolloutError, match=r"no healthy vLLM server there \(BadStatusLine"):
        _vllm_server(url, tmp_path, peft_model, vllm_model_dir)


def test_a_reply_cut_short_is_retried_then_a_clear_error(scripted_server, tmp_path, peft_model, vllm_model_dir):
    url, _ = scripted_server(_VLLM)
    engine = _vllm_server(url, tmp_path, peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    engine.url = _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"choices\": [")  # dies mid-reply
    with pytest.raises(RolloutError, match=r"/v1/completions failed after 3 attempts \(IncompleteRead"):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))


def test_a_server_error_whose_body_is_cut_short_is_retried_then_a_clear_error(scripted_server, tmp_path, peft_model,
                                                                              vllm_model_dir):
    """A 5xx whose error page dies mid-body (a proxy, a crashing worker) is a transient failure like any 5xx,
    not a raw http.client.IncompleteRead out of the engine (or out of close(), replacing the run's error)."""
    url, _ = scripted_server(_VLLM)
    engine = _vllm_server(url, tmp_path, peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    engine.url = _raw_server(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\n{\"error\": ")
    with pytest.raises(RolloutError, match=r"/v1/completions failed after 3 attempts \(HTTP 500: .*IncompleteRead"):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))
    engine.close()  # the unload fails the same way: close() keeps the folder and raises nothing
    assert engine.adapter_path(0).is_dir()


def _choice(index, **fields):
    return {"index": index, "token_ids": [11, 2], "finish_reason": "stop",
            "logprobs": {"token_logprobs": [-0.5, -0.1]}, **fields}


@pytest.mark.parametrize(("answer", "why"), [
    ({"choices": [_choice(0)]}, "fewer choices than n: the groups would mix prompts"),
    ({"choices": [_choice(0), _choice(0)]}, "a choice twice"),
    ({"choices": [_choice(0, token_ids=None), _choice(1, token_ids=None)]}, "vLLM before 0.10.2: no token ids"),
    ({"choices": [_choice(0, token_ids=[11]), _choice(1)]}, "ids and log-probs that do not align"),
    ("<html>502 Bad Gateway</html>", "a proxy's page"),
])
def test_vllm_answers_the_engine_cannot_use_are_clear_errors(answer, why, scripted_server, tmp_path, peft_model,
                                                             vllm_model_dir):
    url, _ = scripted_server({**_VLLM, "/v1/completions": [(200, answer)]})
    engine = _vllm_server(url, tmp_path, peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    with pytest.raises(RolloutError, match=r"/v1/completions answered .*, where 2 choices with token_ids and "
                                           r"logprobs .* expected"):
        engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=2, max_new_tokens=4))
    with pytest.raises(RolloutError, match=r"where choices\[0\].prompt_logprobs .* expected"):
        engine.score([[5, 6, 7]], [1])


@pytest.mark.parametrize("answer", [[{"meta_info": {"output_token_logprobs": [[-0.5, 11, "a"]],
                                                    "finish_reason": {"type": "stop"}}}],
                                    {"error": "not a list"}, "<html>502 Bad Gateway</html>"])
def test_sglang_answers_the_engine_cannot_use_are_clear_errors(answer, scripted_server, tmp_path, peft_model,
                                                               vllm_model_dir):
    url, _ = scripted_server({**_SGLANG, "/generate": [(200, answer)]})
    engine = _sglang(url, tmp_path, peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    with pytest.raises(RolloutError, match=r"/generate answered .*, where a list of 2 samples .* expected"):
        engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))
    with pytest.raises(RolloutError, match=r"where meta_info.input_token_logprobs was expected"):
        engine.score([[5, 6, 7]], [1])


# --- close(): quick, and never the error the user sees ---------------------------------------------------------


def test_close_does_not_retry_a_hung_server(scripted_server, tmp_path, peft_model, vllm_model_dir):
    """close() runs before the run's error reaches the user: one brief unload, not 3 x request_timeout each."""
    url, script = scripted_server({**_VLLM, "/v1/unload_lora_adapter": [("hang", "")]})
    engine = _vllm_server(url, tmp_path, peft_model, vllm_model_dir, "rollout.live_versions=2")
    for version in (0, 1):
        _publish(engine, peft_model, vllm_model_dir, version)
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 2.5
    assert [p for p, _ in script.calls].count("/v1/unload_lora_adapter") == 1
    assert engine.adapter_path(0).is_dir()  # the server may still hold it: deleting it could kill vLLM


def test_a_refused_version_is_deleted_on_close(scripted_server, tmp_path, peft_model, vllm_model_dir):
    url, _ = scripted_server({**_VLLM, "/v1/load_lora_adapter": [(200, "ok"), (400, {"message": "rank too high"})],
                              "/v1/unload_lora_adapter": [(200, "ok"), (404, "not found")]})
    engine = _vllm_server(url, tmp_path, peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    with pytest.raises(RolloutError, match="rank too high"):
        _publish(engine, peft_model, vllm_model_dir, 1)
    engine.close()
    assert not (tmp_path / "rollout_adapters").exists()


class _DeadLLM:
    """A `vllm.LLM` whose engine process died: every call raises EngineDeadError (vLLM 0.32)."""

    def __init__(self):
        from vllm.v1.engine.exceptions import EngineDeadError

        def dead(*args, **kwargs):
            raise EngineDeadError()

        self.shut_down = False
        self.generate = dead
        self.llm_engine = type("Engine", (), {"add_lora": staticmethod(dead), "remove_lora": staticmethod(dead)})()
        self.llm_engine.engine_core = type("Core", (), {"shutdown": lambda _: setattr(self, "shut_down", True)})()


def _dead_vllm_engine(tmp_path):
    """The in-process engine with two versions published before its engine process died."""
    from lora_rl.rollout.adapters import AdapterVersions
    from lora_rl.rollout.vllm_inprocess import VLLMEngine

    engine = object.__new__(VLLMEngine)  # what __init__ sets, without the minute-long start-up
    engine.versions = AdapterVersions(tmp_path / "rollout_adapters", 2)
    engine.adapter_versions, engine.current, engine.version = {None: engine.versions}, {None: 1}, 1
    engine.llm = llm = _DeadLLM()
    for version in (0, 1):
        engine.versions.path(version).mkdir(parents=True)
        engine.versions.loaded(version)
    return engine, llm


def test_a_dead_in_process_vllm_is_a_clear_error_that_close_does_not_replace(tmp_path):
    engine, llm = _dead_vllm_engine(tmp_path)
    with pytest.raises(RolloutError, match="the in-process vLLM engine died"):
        with contextlib.closing(engine):  # as trainer.train does
            engine.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4))
    assert llm.shut_down and not (tmp_path / "rollout_adapters").exists()
    engine, _ = _dead_vllm_engine(tmp_path / "again")
    engine.versions.path(2).mkdir()
    with pytest.raises(RolloutError, match="the in-process vLLM engine died"):
        engine.publish(2, engine.versions.path(2))


# --- an empty prompt list (a process whose share of the eval set is empty) -------------------------------------


def test_every_engine_samples_nothing_from_no_prompts(scripted_server, tmp_path, peft_model, vllm_model_dir):
    from transformers import AutoTokenizer

    from lora_rl.rollout.embedded import EmbeddedEngine

    params = SamplingParams(n=2, max_new_tokens=4, temperature=0)
    assert EmbeddedEngine(peft_model, AutoTokenizer.from_pretrained(vllm_model_dir)).generate([], params) == []
    url, _ = scripted_server(_VLLM)
    engine = _vllm_server(url, tmp_path / "vllm", peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    assert engine.generate([], params) == [] and engine.score([], []) == []
    url, _ = scripted_server(_SGLANG)
    engine = _sglang(url, tmp_path / "sglang", peft_model, vllm_model_dir)
    _publish(engine, peft_model, vllm_model_dir, 0)
    assert engine.generate([], params) == [] and engine.score([], []) == []
    engine, _ = _dead_vllm_engine(tmp_path)  # no call reaches vLLM
    assert engine.generate([], params) == []


def _empty_share_worker(rank: int, port: int, model_dir) -> None:
    from transformers import AutoTokenizer

    from lora_rl import distributed
    from lora_rl.rollout.embedded import EmbeddedEngine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    distributed.init()
    try:
        model, tokenizer, _ = load_model(str(model_dir))
        prompts = [[5, 6, 7], [8, 9]] if rank == 0 else []
        # Past the all-finished check (every 8 tokens), a collective the empty process must join.
        out = EmbeddedEngine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=20, temperature=0))
        assert len(out) == len(prompts)
    finally:
        distributed.shutdown()


def test_an_empty_share_samples_in_step_with_the_other_processes(vllm_model_dir):
    context = mp.spawn(_empty_share_worker, args=(free_port(), vllm_model_dir), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a process with no prompts left the others waiting in a collective")
