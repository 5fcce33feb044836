"""A stand-in for SGLang's HTTP server, written for tests/test_sglang.py: SGLang itself cannot run here
(FIELD_NOTES §3). It is a server the tests drive, not a test, so it lives outside tests/.

It implements only what lora-rl's SGLang engine uses, with SGLang 0.5.23's documented semantics, over a real
Hugging Face model and real PEFT adapters read from the folders the engine writes:
- launch flags as `python -m sglang.launch_server` takes them (`--enable-lora --max-lora-rank
  --lora-target-modules --max-loras-per-batch --max-loaded-loras --lora-paths NAME=PATH --api-key ...`),
  with SGLang's start-up rules: without `--lora-paths` the rank and target modules are required, and
  `--max-loaded-loras` must hold `--max-loras-per-batch` and the initial adapters;
- `GET /health`;
- `POST /load_lora_adapter {lora_name, lora_path}` and `POST /unload_lora_adapter {lora_name}` answering
  `{success, error_message, loaded_adapters}` with 200, or 400 for a name already loaded (or not loaded),
  an adapter whose rank or modules do not fit the pool, or a full pool. An unload first forgets the name
  (new requests on it fail) and then waits until that adapter's in-flight requests have finished;
- `POST /generate {input_ids, sampling_params, return_logprob, logprob_start_len, lora_path}`, one prompt or a
  batch: `output_ids`, `meta_info.finish_reason` (`{"type": "stop"|"length", ...}`), and
  `meta_info.output_token_logprobs` / `input_token_logprobs` as `[logprob, token_id, text]` triples (text
  None; the first prompt token's logprob None). Logprobs are after temperature, before top-k/top-p.

Run it like SGLang: `PYTHONPATH=standins python -m sglang_standin --model-path DIR --enable-lora ...`.
`PYTHONPATH=standins python -m sglang_standin --write-test-model DIR` writes the tiny model the SGLang
tests use, to launch real SGLang on.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

# SGLang's LoRA target modules for Llama-shaped models; `all` means every one of them.
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BASE = "__base__"  # an adapter with zero B matrices: requests without lora_path see the base model


def parse_args(argv: list[str]) -> argparse.Namespace:
    """SGLang's flags that lora-rl uses; an unknown flag is an error, as in SGLang."""
    parser = argparse.ArgumentParser(prog="sglang_standin")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-lora-rank", type=int, default=None)
    parser.add_argument("--lora-target-modules", nargs="+", default=None)
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-loaded-loras", type=int, default=None)
    parser.add_argument("--lora-paths", nargs="*", default=None)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    if not args.enable_lora:
        parser.error("the stand-in serves LoRA only: pass --enable-lora")
    if not args.lora_paths and (args.max_lora_rank is None or args.lora_target_modules is None):
        parser.error("without --lora-paths, both --max-lora-rank and --lora-target-modules are required")
    bad = set(args.lora_target_modules or ()) - set(MODULES) - {"all"}
    if bad:
        parser.error(f"--lora-target-modules: unsupported {sorted(bad)}")
    if args.max_loaded_loras is not None:
        if args.max_loaded_loras < args.max_loras_per_batch:
            parser.error("--max-loaded-loras must be >= --max-loras-per-batch")
        if len(args.lora_paths or ()) > args.max_loaded_loras:
            parser.error("more --lora-paths than --max-loaded-loras")
    return args


def _adapter_config(path: str) -> dict:
    return json.loads((Path(path) / "adapter_config.json").read_text())


class _Refused(Exception):
    """A request SGLang answers with 400."""


class StandIn:
    def __init__(self, args: argparse.Namespace):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.args = args
        initial = dict(spec.split("=", 1) for spec in args.lora_paths or ())
        configs = [_adapter_config(p) for p in initial.values()]
        self.rank = args.max_lora_rank or max(c["r"] for c in configs)
        if args.lora_target_modules is None:
            self.modules = {m for c in configs for m in c["target_modules"]}
        else:
            self.modules = set(MODULES) if "all" in args.lora_target_modules else set(args.lora_target_modules)
        self.capacity = args.max_loaded_loras or 1 << 30
        dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
        base = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype).eval()
        self.eos = base.generation_config.eos_token_id if base.generation_config else base.config.eos_token_id
        self.model = get_peft_model(base, LoraConfig(r=self.rank, target_modules=sorted(self.modules)),
                                    adapter_name=_BASE).eval()
        self.forward_lock = threading.Lock()  # the model runs one forward at a time; adapters change between them
        self.state = threading.Condition()  # guards adapters and in_flight
        self.adapters: dict[str, str] = {}  # name -> folder, as SGLang's loaded_adapters
        self.in_flight: Counter[str] = Counter()
        self.max_loaded = 0  # most adapters ever loaded at once (tests check the engine's bound)
        self.unloads: list[tuple[str, float]] = []  # (name, time the unload finished)
        self.finished: list[tuple[str, float]] = []  # (adapter, time a request on it finished), server-side
        self.step_delay = 0.0  # seconds added per generated token (tests keep requests in flight with it)
        for name, path in initial.items():
            self.load(name, path)

    # --- adapters ---------------------------------------------------------------------------------

    def _answer(self, success: bool, error: str = "") -> dict:
        return {"success": success, "error_message": error, "loaded_adapters": dict(self.adapters)}

    def load(self, name: str, path: str) -> dict:
        with self.state:
            if name in self.adapters:
                raise _Refused(f"The LoRA adapter {name} is already loaded")
            if len(self.adapters) >= self.capacity:
                raise _Refused(f"Maximum number of loaded LoRA adapters ({self.capacity}) reached; unload one first")
            config = _adapter_config(path)
            targets = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}
            if config["r"] > self.rank:
                raise _Refused(f"LoRA adapter {name} has rank {config['r']}, above --max-lora-rank {self.rank}")
            if not targets <= self.modules:
                raise _Refused(f"LoRA adapter {name} targets {sorted(targets - self.modules)}, outside "
                               f"--lora-target-modules {sorted(self.modules)}")
            if config.get("use_dora") or config.get("bias", "none") != "none" or config.get("modules_to_save"):
                raise _Refused(f"LoRA adapter {name}: DoRA, bias and modules_to_save are not supported")
            with self.forward_lock:
                self.model.load_adapter(path, adapter_name=name)
            self.adapters[name] = path
            self.max_loaded = max(self.max_loaded, len(self.adapters))
            return self._answer(True)

    def unload(self, name: str) -> dict:
        with self.state:
            if name not in self.adapters:
                raise _Refused(f"The LoRA adapter {name} is not loaded")
            del self.adapters[name]  # new requests on it fail from now on
            self.state.wait_for(lambda: not self.in_flight[name])
            with self.forward_lock:
                self.model.delete_adapter(name)
            self.unloads.append((name, time.monotonic()))
            return self._answer(True)

    # --- generation -------------------------------------------------------------------------------

    def _logits(self, adapter: str | None, ids: list[int]) -> torch.Tensor:
        with self.forward_lock, torch.no_grad():
            self.model.set_adapter(adapter or _BASE)
            return self.model(torch.tensor([ids])).logits[0].float()  # [T, V]

    def _one(self, prompt: list[int], params: dict, adapter: str | None, return_logprob: bool, start: int) -> dict:
        if params.get("n", 1) != 1:
            raise _Refused("the stand-in implements n=1 only (send the prompt several times)")
        temperature = params.get("temperature", 1.0)
        greedy = temperature < 1e-6
        temperature = 1.0 if greedy else temperature
        top_p, top_k = params.get("top_p", 1.0), params.get("top_k", -1)
        max_new = params.get("max_new_tokens", 128)
        generator = torch.Generator()
        seed = params.get("sampling_seed")
        generator.manual_seed(seed if seed is not None else torch.seed())
        meta = {"prompt_tokens": len(prompt)}
        ids, out = list(prompt), []
        if return_logprob and start >= 0:
            logp = torch.log_softmax(self._logits(adapter, prompt) / temperature, dim=-1)
            meta["input_token_logprobs"] = [[None if t == 0 else float(logp[t - 1, prompt[t]]), prompt[t], None]
                                            for t in range(start, len(prompt))]
        finish = {"type": "length", "length": max_new}
        for _ in range(max_new):
            logp = torch.log_softmax(self._logits(adapter, ids)[-1] / temperature, dim=-1)  # [V]
            time.sleep(self.step_delay)
            if greedy:
                token = int(logp.argmax())
            else:
                probs = logp.exp()
                if top_k > 0:
                    probs[probs < probs.topk(top_k).values[-1]] = 0
                if top_p < 1.0:
                    ordered, order = probs.sort(descending=True)
                    drop = ordered.cumsum(0) - ordered > top_p
                    probs[order[drop]] = 0
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            ids.append(token)
            out.append([float(logp[token]), token, None])
            if token == self.eos:
                finish = {"type": "stop", "matched": token}
                break
        meta.update(completion_tokens=len(out), finish_reason=finish)
        if return_logprob:
            meta["output_token_logprobs"] = out
        return {"text": "", "output_ids": [t for _, t, _ in out], "meta_info": meta}

    def generate(self, body: dict):
        batch = bool(body["input_ids"]) and isinstance(body["input_ids"][0], list)
        prompts = body["input_ids"] if batch else [body["input_ids"]]

        def per_item(key, default):
            value = body.get(key, default)
            return value if batch and isinstance(value, list) else [value] * len(prompts)

        params, adapters = per_item("sampling_params", {}), per_item("lora_path", None)
        starts = per_item("logprob_start_len", -1)
        with self.state:
            missing = sorted({a for a in adapters if a is not None and a not in self.adapters})
            if missing:
                raise _Refused(f"LoRA adapters {missing} are not loaded")
            self.in_flight.update(a for a in adapters if a is not None)
        try:
            results = [self._one(p, s, a, bool(body.get("return_logprob")), st)
                       for p, s, a, st in zip(prompts, params, adapters, starts, strict=True)]
        finally:
            with self.state:
                self.in_flight.subtract(a for a in adapters if a is not None)
                self.finished.extend((a, time.monotonic()) for a in adapters if a is not None)
                self.state.notify_all()
        return results if batch else results[0]


def serve(argv: list[str]):
    """Start a stand-in in this process; returns (server, StandIn, url). `server.shutdown()` stops it."""
    args = parse_args(argv)
    standin = StandIn(args)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                self._reply(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {})
            elif self._authorised():
                self._reply(404, {"detail": "Not Found"})

        def do_POST(self):
            if not self._authorised():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            try:
                if self.path == "/load_lora_adapter":
                    self._reply(200, standin.load(body["lora_name"], body["lora_path"]))
                elif self.path == "/unload_lora_adapter":
                    self._reply(200, standin.unload(body["lora_name"]))
                elif self.path == "/generate":
                    self._reply(200, standin.generate(body))
                else:
                    self._reply(404, {"detail": "Not Found"})
            except _Refused as err:
                with standin.state:
                    answer = standin._answer(False, str(err))
                self._reply(400, answer if "lora_adapter" in self.path else {"error": {"message": str(err)}})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, standin, f"http://{args.host}:{server.server_address[1]}"


def write_test_model(folder: Path) -> Path:
    """The tiny warm-started model the SGLang tests train (tests/conftest.py's VLLM_RECIPE, warm)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the recipe lives with the tests
    from conftest import VLLM_RECIPE, warm

    from lora_rl.models import build_tiny

    return build_tiny(warm(VLLM_RECIPE), folder)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write-test-model"]:
        print(write_test_model(Path(sys.argv[2])))
    else:
        _, _, url = serve(sys.argv[1:])
        print(f"sglang stand-in serving on {url}", flush=True)
        threading.Event().wait()
