"""rollout.engine=sglang: an SGLang server, with one LoRA adapter per policy version loaded over HTTP.

Launch or attach, retries and restarts are shared with vllm-server (server_common.py). HTTP contract
(SGLang 0.5.23, FIELD_NOTES section 3):
- the LoRA pool is sized at start-up (`--max-lora-rank`, `--lora-target-modules`, `--max-loaded-loras`,
  `--max-loras-per-batch`); an adapter whose rank or modules do not fit it is refused at load time, so
  `check_sglang_config` refuses such a config before anything starts;
- `POST /load_lora_adapter {lora_name, lora_path}` / `POST /unload_lora_adapter {lora_name}` answer
  `{success, error_message, loaded_adapters}` (200, or 400 e.g. for a name that is already loaded);
  an unload waits until that adapter's in-flight requests finish;
- `POST /generate {input_ids, sampling_params, return_logprob, lora_path}` answers `output_ids` and
  `meta_info.output_token_logprobs` as `[logprob, token_id, text]` triples (after temperature); with
  `logprob_start_len` and `max_new_tokens: 0` it scores given tokens (`meta_info.input_token_logprobs`).

Versions: each loads under a new name (`<prefix>-v<N>`). A version that leaves the window of
`rollout.live_versions` is unloaded only once this engine has no request on it in flight (so an unload
never waits on a request, the deadlock seen when a server is paused mid-request), and at most
`rollout.max_loaded_loras` adapters are ever loaded (loading a name per step and never unloading grows the
server's memory until it hangs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path

from lora_rl.config import Config, ConfigError
from lora_rl.rollout.base import Completion, RolloutError, SamplingParams, prompt_seed
from lora_rl.rollout.server_common import HTTPFailure, ServerEngine

LAUNCHER = "sglang.launch_server"  # the module `python -m` starts
# SGLang's LoRA target modules for the dense decoder models lora-rl trains, in peft's names: its
# --lora-target-modules takes these (SUPPORTED_LORA_TARGET_MODULES) and maps them onto its fused layers
# itself. `all` covers every one of them.
SGLANG_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pool_rank(config: Config) -> int:
    """--max-lora-rank: the configured one, else lora.lora_rank (SGLang takes any rank)."""
    return config.rollout.max_lora_rank or config.lora.lora_rank


def trained_modules(config: Config) -> tuple[str, ...]:
    """The modules the adapter will hold, in HF names: lora.target_modules as the backend trains them
    (Megatron adapts fused layers whole: q_proj brings k_proj and v_proj; linear_qkv is q, k and v)."""
    from lora_rl.backends import adapter_lora
    from lora_rl.lora import hf_target_names

    targets = adapter_lora(config).target_modules
    return tuple(targets) if {"all", "all-linear"} & set(targets) else hf_target_names(targets)


def pool_modules(config: Config) -> tuple[str, ...]:
    """--lora-target-modules: rollout.lora_target_modules, else the modules the adapter holds; all-linear
    becomes all."""
    modules = config.rollout.lora_target_modules or trained_modules(config)
    return ("all",) if {"all", "all-linear"} & set(modules) else tuple(modules)


def pool_capacity(config: Config) -> int:
    """--max-loaded-loras: the window of live versions plus one that may still be draining."""
    return config.rollout.max_loaded_loras or config.rollout.live_versions + 1


def _covered(modules) -> set[str]:
    return set(SGLANG_MODULES) if {"all", "all-linear"} & set(modules) else set(modules)


def check_sglang_config(config: Config) -> None:
    """SGLang's LoRA pool rules as config errors (no model needed): every version this run will publish must
    fit the pool the server is started with."""
    lora, rollout = config.lora, config.rollout
    if not lora.use_lora:
        raise ConfigError("rollout.engine='sglang' with lora.use_lora=false: the SGLang engine receives each policy "
                          "version as a LoRA adapter and never full weights. Set lora.use_lora=true, or use "
                          "rollout.engine=embedded for full fine-tuning.")
    if rollout.max_lora_rank and lora.lora_rank > rollout.max_lora_rank:
        raise ConfigError(f"lora.lora_rank={lora.lora_rank} is above rollout.max_lora_rank={rollout.max_lora_rank}: "
                          "SGLang sizes its LoRA pool at start-up and would refuse every version. Raise "
                          "rollout.max_lora_rank or set it to 0 (the pool takes lora.lora_rank)")
    for field, modules in (("lora.target_modules", trained_modules(config)),
                           ("rollout.lora_target_modules", rollout.lora_target_modules)):
        bad = sorted(set(modules) - set(SGLANG_MODULES) - {"all", "all-linear"})
        if bad:
            raise ConfigError(f"{field}={list(modules)}: SGLang cannot serve LoRA on {bad}; its pool covers "
                              f"{list(SGLANG_MODULES)} (or all). Drop those modules or use [all-linear].")
    missing = sorted(_covered(trained_modules(config)) - _covered(pool_modules(config)))
    if missing:
        widened = (f" (backend.name={config.backend.name} trains {list(trained_modules(config))} for them)"
                   if list(trained_modules(config)) != list(lora.target_modules) else "")
        raise ConfigError(f"rollout.lora_target_modules={list(rollout.lora_target_modules)} leaves out {missing}, which "
                          f"lora.target_modules={list(lora.target_modules)}{widened} trains: SGLang would refuse the "
                          "adapter. Add them, or leave rollout.lora_target_modules empty to size the pool from the "
                          "adapter")
    if rollout.max_loaded_loras and rollout.max_loaded_loras < rollout.live_versions + 1:
        raise ConfigError(f"rollout.max_loaded_loras={rollout.max_loaded_loras} is below rollout.live_versions + 1 = "
                          f"{rollout.live_versions + 1}: the server must hold the window of versions plus the next "
                          "one while the oldest drains. Raise it, lower rollout.live_versions, or set 0 (automatic)")
    if rollout.max_loras_per_batch > pool_capacity(config):
        raise ConfigError(f"rollout.max_loras_per_batch={rollout.max_loras_per_batch} is above the adapters the server "
                          f"holds ({pool_capacity(config)}, rollout.max_loaded_loras): SGLang refuses to start. "
                          "Lower it or raise rollout.max_loaded_loras")


def check_model_for_pool(model, config: Config) -> None:
    """Every layer [all-linear] adapts on this model is one SGLang serves LoRA on (a meta model will do;
    `lora-rl validate` runs this). Other architectures name their linears otherwise (GPT-2: c_attn,
    c_fc, c_proj)."""
    if "all-linear" in config.lora.target_modules:
        from lora_rl.lora import linear_module_names

        _refuse_unservable(linear_module_names(model), config)


def _refuse_unservable(names, config: Config) -> None:
    bad = sorted(set(names) - set(SGLANG_MODULES))
    if bad:
        raise ConfigError(f"lora.target_modules={list(config.lora.target_modules)} on model.path={config.model.path!r}: "
                          f"SGLang cannot serve LoRA on {bad}; its pool covers {list(SGLANG_MODULES)}. Use "
                          "rollout.engine=embedded for this model (it adapts any linear layer), or a model whose layers "
                          "carry those names (Qwen2.5, Llama, SmolLM2).")


def check_adapter_fits(model, config: Config) -> None:
    """The injected adapter as peft resolved it: plain LoRA whose rank and modules fit the pool."""
    peft_config = model.peft_config["default"]
    targets = peft_config.target_modules
    names = {m.rsplit(".", 1)[-1] for m in ([targets] if isinstance(targets, str) else targets)}
    _refuse_unservable(names, config)
    outside = sorted(names - _covered(pool_modules(config)))
    if outside:
        raise ConfigError(f"the adapter trains {outside}, outside SGLang's LoRA pool {list(pool_modules(config))}: "
                          "set rollout.lora_target_modules to cover them (or [all])")
    if peft_config.r > pool_rank(config):
        raise ConfigError(f"the adapter's rank {peft_config.r} is above the pool's rollout.max_lora_rank="
                          f"{pool_rank(config)}: raise rollout.max_lora_rank")
    if getattr(peft_config, "use_dora", False) or peft_config.bias != "none" or peft_config.modules_to_save:
        raise ConfigError("the adapter uses DoRA, LoRA bias or modules_to_save, which SGLang does not load: "
                          "use plain LoRA (lora.peft_type=lora)")


def server_command(base_model_dir: Path, config: Config, port: int, initial: dict[str, str] | None = None,
                   api_key: str = "") -> list[str]:
    """`python -m sglang.launch_server` with the LoRA pool sized for every version of this run; `initial`
    maps adapter names to folders loaded at start-up (--lora-paths)."""
    rollout = config.rollout
    command = [sys.executable, "-m", LAUNCHER, "--model-path", str(base_model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", config.model.dtype, "--random-seed", str(config.run.seed),
               "--mem-fraction-static", str(rollout.engine_memory),
               "--enable-lora", "--max-lora-rank", str(pool_rank(config)),
               "--lora-target-modules", *pool_modules(config),
               "--max-loras-per-batch", str(rollout.max_loras_per_batch),
               "--max-loaded-loras", str(pool_capacity(config))]
    if initial:
        command += ["--lora-paths", *(f"{name}={path}" for name, path in initial.items())]
    if api_key:
        command += ["--api-key", api_key]  # SGLang takes its key only as a flag
    return command


def _answer(body: str) -> dict:
    """SGLang's JSON answer to a load/unload, or {} when the body is something else (a proxy's error page)."""
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _finish_reason(reason) -> str:
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        raise RolloutError(f"sglang aborted a request ({reason}): the server was paused or is shutting down")
    return "length" if kind == "length" else "stop"


class SGLangEngine(ServerEngine):
    name = "sglang"
    label = "SGLang"
    attach_hint = ("Start one with `python -m sglang.launch_server --model-path MODEL --enable-lora --max-lora-rank R "
                   "--lora-target-modules all --max-loaded-loras C` (see the README's SGLang section)")

    def __init__(self, *, base_model_dir: Path, model, config: Config, run_dir: Path):
        check_adapter_fits(model, config)
        if not config.rollout.server_url and importlib.util.find_spec(LAUNCHER.split(".")[0]) is None:
            raise RolloutError(f"rollout.engine=sglang with no rollout.server_url launches `python -m {LAUNCHER}`, but "
                               "SGLang is not installed in this environment: install it (a CUDA machine), or start "
                               "a server elsewhere on this filesystem and set rollout.server_url")
        self.capacity = pool_capacity(config)
        self.retiring: list[int] = []  # out of the window, still loaded until their requests drain
        self._in_flight: Counter[int] = Counter()  # this process's requests in flight, by version
        self._drained = threading.Condition()
        self._retire_lock = threading.Lock()
        super().__init__(base_model_dir=base_model_dir, config=config, run_dir=run_dir)

    def command(self, base_model_dir: Path, config: Config, port: int, initial: dict[str, str]) -> list[str]:
        return server_command(base_model_dir, config, port, initial, api_key=self.api_key)

    def _relaunch(self) -> None:
        """A fresh server loads the live versions at start-up; draining ones are gone with the old server."""
        self._stop_server()  # what is left of the dead one (its workers) holds memory the new one needs
        for old in self.retiring:
            self.versions.delete(old)
        self.retiring.clear()
        self.url = self._launch({self.versions.name(v): str(self.versions.path(v).resolve())
                                 for v in self.versions.live})

    # --- adapters -------------------------------------------------------------------------------------

    def _update(self, path: str, payload: dict) -> None:
        """A load or unload; SGLang answers {success, error_message, loaded_adapters}, a failure with 400."""
        answer = self._post(path, payload)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise HTTPFailure(200, json.dumps(answer))

    def _load(self, version: int, cleared: bool = False) -> None:
        self._make_room()
        name, path = self.versions.name(version), str(self.versions.path(version).resolve())
        try:
            self._update("/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": False})
        except HTTPFailure as err:
            answer = _answer(err.body)
            loaded = answer.get("loaded_adapters")
            # A retried load whose first attempt did land is refused as already loaded: fine if it is ours.
            if err.status == 400 and isinstance(loaded, dict) and loaded.get(name) == path:
                return
            # An earlier process on this run folder that never closed (killed, then --resume) left its versions
            # loaded on an attached server: they fill the pool, so the run failed at its second load. Unload
            # them (their folders are ours to delete) and load again; SGLang lists them only in its answers.
            root = str(self.versions.root.resolve())
            stale = [old for old, where in (loaded.items() if isinstance(loaded, dict) else ())
                     if str(where).startswith(root + "/") and not old.startswith(self.versions.prefix + "-v")]
            if err.status == 400 and stale and not cleared:  # once: a server that keeps them must not loop
                for old in stale:
                    try:
                        self._update("/unload_lora_adapter", {"lora_name": old})
                    except HTTPFailure as cut:
                        raise RolloutError(f"sglang at {self.url}: unloading {old}, left loaded from {loaded[old]} "
                                           f"by an earlier run, failed ({cut}); unload it, or restart the server") \
                            from None
                    shutil.rmtree(loaded[old], ignore_errors=True)
                return self._load(version, cleared=True)
            raise RolloutError(f"sglang at {self.url}: loading adapter {name} from {path} failed ({err}). The server's "
                               "LoRA pool must fit the adapter: --max-lora-rank >= lora.lora_rank, "
                               "--lora-target-modules covering lora.target_modules, and --max-loaded-loras >= "
                               "rollout.live_versions + 1 (adapters of other runs count too)") from None

    def _unload(self, version: int) -> None:
        name = self.versions.name(version)
        try:
            self._update("/unload_lora_adapter", {"lora_name": name})
        except HTTPFailure as err:
            loaded = _answer(err.body).get("loaded_adapters")
            if isinstance(loaded, dict) and name not in loaded:
                return  # already gone (e.g. a retried unload that had landed)
            raise RolloutError(f"sglang at {self.url}: unloading {name} failed ({err}); its folder is kept") from None

    def _retire(self, versions: list[int]) -> None:
        with self._drained:
            # Switch new requests to the version just loaded first, so none starts on a version being retired.
            self.version = self.versions.live[-1]
            self.retiring += versions
        self._unload_drained()

    def _unload_drained(self) -> None:
        """Unload (then delete) each retiring version that has no request of ours in flight."""
        with self._retire_lock:
            for old in list(self.retiring):
                with self._drained:
                    if self._in_flight[old]:
                        continue
                self._unload(old)
                self.versions.delete(old)
                self.retiring.remove(old)

    def _make_room(self) -> None:
        """Before a load: if the server already holds max_loaded_loras adapters, wait for the oldest draining
        version (at most rollout.request_timeout) and unload it."""
        while self.retiring and len(self.versions.live) + len(self.retiring) >= self.capacity:
            oldest = self.retiring[0]
            with self._drained:
                if not self._drained.wait_for(lambda: not self._in_flight[oldest], timeout=self.timeout):
                    raise RolloutError(f"sglang: version {oldest} still has requests in flight after "
                                       f"rollout.request_timeout={self.timeout}s and the server holds "
                                       f"rollout.max_loaded_loras={self.capacity} adapters: raise "
                                       "rollout.max_loaded_loras")
            self._unload_drained()

    @contextlib.contextmanager
    def _using(self):
        """The current version, its requests counted as in flight until they return; then unload what drained."""
        with self._drained:
            version = self.version
            self._in_flight[version] += 1
        try:
            yield version
        finally:
            with self._drained:
                self._in_flight[version] -= 1
                self._drained.notify_all()
        if self.main and self.retiring:
            self._unload_drained()

    # --- protocol -------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        greedy = params.temperature == 0
        # Every sampling parameter is explicit: SGLang otherwise takes defaults from generation_config.json.
        sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": 1.0 if greedy else params.top_p, "top_k": -1, "min_p": 0.0}
        with self._using() as version:
            name = self.versions.name(version)
            # One request per prompt holding its n samples as a batch (SGLang discourages n > 1).
            payloads = [{"input_ids": [p] * params.n, "lora_path": [name] * params.n, "return_logprob": True,
                         "sampling_params": [sampling if greedy else
                                             {**sampling, "sampling_seed": prompt_seed(params.seed, i) + j}
                                             for j in range(params.n)]}
                        for i, p in enumerate(prompts)]
            answers = self._recovering(lambda: self._ask_all("/generate", payloads))
        return [c for i, answer in enumerate(answers) for c in self._samples(answer, i, params.n, version)]

    def _samples(self, answer, prompt_index: int, n: int, version: int) -> list[Completion]:
        """The n samples of one prompt (SGLang answers a batch of n inputs with a list of n). Anything else is an
        error: fewer samples would pair the next prompt's samples with this one (GRPO groups by position)."""
        expected = f"a list of {n} samples with meta_info.output_token_logprobs"
        if not isinstance(answer, list) or len(answer) != n:
            raise self._unexpected("/generate", answer, expected)
        try:
            # The triples carry each sampled id with its log-prob, so ids and log-probs always align.
            return [Completion(prompt_index=prompt_index,
                               token_ids=[int(t[1]) for t in sample["meta_info"]["output_token_logprobs"]],
                               logprobs=[float(t[0]) for t in sample["meta_info"]["output_token_logprobs"]],
                               finish_reason=_finish_reason(sample["meta_info"].get("finish_reason")),
                               version=version) for sample in answer]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise self._unexpected("/generate", answer, expected) from None

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
        with self._using() as version:
            payloads = [{"input_ids": seq, "lora_path": self.versions.name(version), "return_logprob": True, "logprob_start_len": start,
                         "sampling_params": {"max_new_tokens": 0, "temperature": 1.0}}
                        for seq, start in zip(sequences, prompt_lengths, strict=True)]
            answers = self._recovering(lambda: self._ask_all("/generate", payloads))
        out = []
        for answer, seq, start in zip(answers, sequences, prompt_lengths, strict=True):
            try:
                triples = answer["meta_info"]["input_token_logprobs"]  # one per token from logprob_start_len on
                ids, logprobs = [int(t[1]) for t in triples], [float(t[0]) for t in triples]
            except (KeyError, IndexError, TypeError, ValueError):
                raise self._unexpected("/generate", answer, "meta_info.input_token_logprobs") from None
            if ids != seq[start:]:
                raise RolloutError(f"sglang at {self.url}: input_token_logprobs do not match the scored tokens "
                                   f"({len(triples)} entries for {len(seq) - start} tokens)")
            out.append(logprobs)
        return out

    def close(self) -> None:
        # Draining versions are unloaded (attached server) and deleted like the live ones.
        self.versions.live[:0] = self.retiring
        self.retiring = []
        super().close()
