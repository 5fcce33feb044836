"""Shared fixtures: tiny models built from config in a temporary folder (nothing downloaded)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lora_rl.models import TinyRecipe, build_tiny

# Small enough to build in seconds; the warm-started one answers 1-digit sums most of the time.
TEST_RECIPE = TinyRecipe(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, vocab_size=320,
                         warmstart_difficulties=(1,), warmstart_steps=0, seed=7)


# vLLM's CPU attention needs a head size of 32 or more.
VLLM_RECIPE = dataclasses.replace(TEST_RECIPE, heads=2, kv_heads=1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Built-in models built by tests go to a throwaway cache, never the user's.
    os.environ.setdefault("LORA_RL_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True, scope="session")
def _worker_stacks_on_abort():
    # Processes the tests start (mp.spawn, torchrun, vLLM) inherit this: one that dies of SIGABRT or
    # SIGSEGV prints every thread's Python stack, so a rare C++ abort in CI says where it happened.
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def warm(recipe: TinyRecipe) -> TinyRecipe:
    """`recipe` with a short supervised warm-start on 1-digit sums: RL has signal to work with."""
    return dataclasses.replace(recipe, warmstart_steps=150, warmstart_lr=5e-3)


def _build(tmp_path_factory, recipe: TinyRecipe, name: str, warm_start: bool):
    """A tiny model from `recipe`, random or warm-started."""
    return build_tiny(warm(recipe) if warm_start else recipe, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialised tiny Llama with a locally trained tokenizer."""
    return _build(tmp_path_factory, TEST_RECIPE, "random-tiny", warm_start=False)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory):
    """The same shape after a short warm-start: RL has signal to work with."""
    return _build(tmp_path_factory, TEST_RECIPE, "warm-tiny", warm_start=True)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """TEST_RECIPE with heads vLLM can serve on the CPU; random weights."""
    return _build(tmp_path_factory, VLLM_RECIPE, "vllm-tiny", warm_start=False)


@pytest.fixture(scope="session")
def vllm_warm_model_dir(tmp_path_factory):
    return _build(tmp_path_factory, VLLM_RECIPE, "vllm-warm-tiny", warm_start=True)


# --- a scripted HTTP server on 127.0.0.1, for the server engines' failure paths -------------------------------


class _Script:
    """Answers per endpoint: a list of (status, body) consumed in order; the last one repeats."""

    def __init__(self, answers):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls: list[tuple[str, dict | None]] = []

    def answer(self, path, payload):
        self.calls.append((path, payload))
        queue = self.answers.get(path, [(404, {"error": "no such endpoint"})])
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
def scripted_server():
    servers = []

    def start(answers):
        script = _Script(answers)

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, payload):
                status, body = script.answer(self.path, payload)
                if status == "hang":
                    threading.Event().wait(3)
                    status, body = 200, {}
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(None)

            def do_POST(self):
                self._reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", script

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def peft_model(vllm_model_dir):
    """The vLLM-sized tiny model with a rank-8 adapter: what the HTTP engines' tests publish."""
    from lora_rl.config import LoRAConfig
    from lora_rl.lora import inject_lora
    from lora_rl.models import load_model

    model, _, _ = load_model(str(vllm_model_dir))
    return inject_lora(model, LoRAConfig(lora_rank=8, lora_alpha=16))


def vllm_server_engine(url, tmp_path, peft_model, model_dir, *overrides):
    """A vllm-server engine attached to `url` (a scripted server in the tests), its run folder tmp_path."""
    from lora_rl.config import load_config
    from lora_rl.rollout.vllm_server import VLLMServerEngine

    config = load_config(None, ["rollout.engine=vllm-server", f"rollout.server_url={url}",
                                "rollout.request_timeout=1", *overrides])
    return VLLMServerEngine(base_model_dir=model_dir, model=peft_model, config=config, run_dir=tmp_path)
