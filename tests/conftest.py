"""Shared fixtures: tiny models built from config in a temporary folder (nothing downloaded)."""

from __future__ import annotations

import dataclasses
import os

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


def _build(tmp_path_factory, recipe: TinyRecipe, name: str, warm: bool):
    """A tiny model from `recipe`, random or after a short supervised warm-start on 1-digit sums."""
    if warm:
        recipe = dataclasses.replace(recipe, warmstart_steps=150, warmstart_lr=5e-3)
    return build_tiny(recipe, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialised tiny Llama with a locally trained tokenizer."""
    return _build(tmp_path_factory, TEST_RECIPE, "random-tiny", warm=False)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory):
    """The same shape after a short warm-start: RL has signal to work with."""
    return _build(tmp_path_factory, TEST_RECIPE, "warm-tiny", warm=True)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """TEST_RECIPE with heads vLLM can serve on the CPU; random weights."""
    return _build(tmp_path_factory, VLLM_RECIPE, "vllm-tiny", warm=False)


@pytest.fixture(scope="session")
def vllm_warm_model_dir(tmp_path_factory):
    return _build(tmp_path_factory, VLLM_RECIPE, "vllm-warm-tiny", warm=True)
