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


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialised tiny Llama with a locally trained tokenizer."""
    return build_tiny(TEST_RECIPE, tmp_path_factory.mktemp("random-tiny"))


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory):
    """The same shape after a short supervised warm-start on 1-digit sums: RL has signal to work with."""
    recipe = dataclasses.replace(TEST_RECIPE, warmstart_steps=150, warmstart_lr=5e-3)
    return build_tiny(recipe, tmp_path_factory.mktemp("warm-tiny"))


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """TEST_RECIPE with heads vLLM can serve on the CPU; random weights."""
    return build_tiny(VLLM_RECIPE, tmp_path_factory.mktemp("vllm-tiny"))


@pytest.fixture(scope="session")
def vllm_warm_model_dir(tmp_path_factory):
    recipe = dataclasses.replace(VLLM_RECIPE, warmstart_steps=150, warmstart_lr=5e-3)
    return build_tiny(recipe, tmp_path_factory.mktemp("vllm-warm-tiny"))
