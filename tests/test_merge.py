"""`lora-rl merge` on input a user plausibly gives: a new output folder, an adapter that does not name its base.

Bad input is one `lora-rl: error:` line (rc 2) found before the base model is loaded, and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_rl.cli import main
from lora_rl.config import LoRAConfig
from lora_rl.lora import inject_lora, save_adapter

TOKENS = torch.tensor([[5, 9, 17, 33, 41, 2, 8, 12]])


@pytest.fixture
def adapter(random_model_dir, tmp_path):
    """A saved adapter with non-zero weights over the tiny test model, and the logits it gives."""
    torch.manual_seed(0)
    model = inject_lora(AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.float32),
                        LoRAConfig(lora_rank=4))
    with torch.no_grad():  # lora_B starts at zero: give it a value so the merged model differs from the base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        expected = model(TOKENS).logits
    return save_adapter(model, tmp_path / "adapter", random_model_dir), expected


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if merge loads the base model: every refusal here must come before it."""
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the base model was loaded before the input was checked"))


def test_merge_makes_a_missing_parent_folder(adapter, tmp_path):
    adapter_dir, expected = adapter
    out = tmp_path / "new" / "dir" / "merged"
    assert main(["merge", str(adapter_dir), str(out)]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # the temporary folder was renamed into place
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit, shown", [
    (lambda cfg: cfg.update(base_model_name_or_path=None), "is null"),  # what peft writes for a model from a config
    (lambda cfg: cfg.pop("base_model_name_or_path"), "is missing"),
], ids=["null", "missing"])
def test_adapter_without_a_base_path_is_one_clear_error(adapter, tmp_path, capsys, no_model_load, edit, shown):
    adapter_dir, _ = adapter
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    out = tmp_path / "new" / "merged"
    assert main(["merge", str(adapter_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-rl: error: {config_path}: base_model_name_or_path {shown}")
    assert "set it to the folder (with config.json) of the model the adapter was trained on" in err
    assert not out.parent.exists()


def test_unwritable_output_place_is_refused_before_the_model_loads(adapter, tmp_path, capsys, no_model_load):
    adapter_dir, _ = adapter
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["merge", str(adapter_dir), str(tmp_path / "a-file" / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-rl: error: cannot write the merged model in {str(tmp_path / 'a-file')!r}")
    assert "choose an output folder in a writable place" in err
