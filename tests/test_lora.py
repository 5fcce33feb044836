"""LoRA through peft: targets, dtype, sizes, PEFT-format save/reload and merge give the same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, MixtralConfig

from lora_rl.config import ConfigError, LoRAConfig
from lora_rl.lora import (adapter_bytes, check_dense, inject_lora, linear_module_names, load_adapter, merge_adapter,
                          save_adapter, trainable_parameters)

TOKENS = torch.tensor([[5, 9, 17, 33, 41, 2, 8, 12]])


def _model(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def _perturb(model):
    # lora_B starts at zero; give every adapter weight a value so reload checks compare something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_linear_names_exclude_the_output_head(random_model_dir):
    names = linear_module_names(_model(random_model_dir))
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_target_that_matches_nothing_lists_the_real_layers(random_model_dir):
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\] match no linear layer.*'down_proj', 'gate_proj'"):
        inject_lora(_model(random_model_dir), LoRAConfig(target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(ConfigError, match=r"mixes all-linear with names"):
        inject_lora(_model(random_model_dir), LoRAConfig(target_modules=("all-linear", "q_proj")))


def test_mixture_of_experts_is_refused():
    with pytest.raises(ConfigError, match=r"'mixtral' is a mixture-of-experts model \(num_local_experts=8\).*dense"):
        check_dense(MixtralConfig())


def test_lora_at_init_leaves_logits_unchanged_and_counts_match_the_formula(random_model_dir):
    base = _model(random_model_dir)
    before = base(TOKENS).logits
    cfg = base.config
    model = inject_lora(base, LoRAConfig(lora_rank=4, lora_alpha=8))
    assert torch.equal(model(TOKENS).logits, before)
    h, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # r * (in + out) per adapted linear: q, k, v, o, gate, up, down
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + inter) + (h + inter) + (inter + h))
    assert trainable_parameters(model) == per_layer * cfg.num_hidden_layers
    assert adapter_bytes(model) == 4 * trainable_parameters(model)


def test_adapters_stay_in_the_model_dtype(random_model_dir):
    model = inject_lora(_model(random_model_dir, torch.bfloat16), LoRAConfig(lora_rank=8))
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert adapter_bytes(model) == 2 * trainable_parameters(model)


def test_save_reload_gives_identical_logits_in_standard_peft_format(random_model_dir, tmp_path):
    model = inject_lora(_model(random_model_dir), LoRAConfig(lora_rank=8, lora_alpha=16))
    _perturb(model)
    expected = model(TOKENS).logits
    out = save_adapter(model, tmp_path / "adapter", random_model_dir)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(random_model_dir.resolve())
    assert (saved["r"], saved["lora_alpha"], saved["peft_type"], saved["bias"]) == (8, 16, "LORA", "none")
    # The standard loader, pointed only at the folder, finds the base and reproduces the logits.
    reloaded = PeftModel.from_pretrained(_model(saved["base_model_name_or_path"]), str(out))
    assert torch.equal(reloaded(TOKENS).logits, expected)
    assert torch.equal(load_adapter(_model(random_model_dir), out)(TOKENS).logits, expected)


def test_saving_over_an_adapter_replaces_it_whole(random_model_dir, tmp_path):
    model = inject_lora(_model(random_model_dir), LoRAConfig(lora_rank=8))
    save_adapter(model, tmp_path / "adapter", random_model_dir)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter", random_model_dir)
    reloaded = load_adapter(_model(random_model_dir), tmp_path / "adapter")
    assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporaries left behind


def test_an_adapter_is_never_missing_while_it_is_replaced(random_model_dir, tmp_path, monkeypatch):
    """A process killed while replacing an adapter (a run's end, or `train` again over a finished run) must
    leave a whole adapter under the name. Two renames (old aside, new in) left none between them: the folders
    are swapped in one step instead."""
    model = inject_lora(_model(random_model_dir), LoRAConfig(lora_rank=8))
    out = tmp_path / "adapter"
    save_adapter(model, out, random_model_dir)
    before = model(TOKENS).logits
    real_replace = os.replace

    def killed_on_the_way_in(src, dst):
        if Path(dst) == out:
            raise SystemExit("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_the_way_in)
    _perturb(model)
    save_adapter(model, out, random_model_dir)  # os.replace is never asked to put a folder at `out`
    torch.testing.assert_close(load_adapter(_model(random_model_dir), out)(TOKENS).logits, model(TOKENS).logits)
    assert not torch.equal(model(TOKENS).logits, before)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_where_folders_cannot_be_swapped_two_renames_replace_the_adapter(random_model_dir, tmp_path, monkeypatch):
    """Another OS or file system: the old folder goes aside first (a resume puts it back if the process died
    between the renames: test_trainer)."""
    import lora_rl.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    model = inject_lora(_model(random_model_dir), LoRAConfig(lora_rank=8))
    save_adapter(model, tmp_path / "adapter", random_model_dir)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter", random_model_dir)
    torch.testing.assert_close(load_adapter(_model(random_model_dir), tmp_path / "adapter")(TOKENS).logits,
                               model(TOKENS).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_merged_model_matches_the_adapter_model(random_model_dir):
    model = inject_lora(_model(random_model_dir), LoRAConfig(lora_rank=8))
    _perturb(model)
    expected = model(TOKENS).logits
    merged = merge_adapter(model)
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(merged(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_command_writes_a_plain_model_with_the_adapter_folded_in(random_model_dir, tmp_path):
    from lora_rl.cli import main

    model = inject_lora(_model(random_model_dir), LoRAConfig(lora_rank=8))
    _perturb(model)
    expected = model(TOKENS).logits
    save_adapter(model, tmp_path / "adapter", random_model_dir)
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(_model(tmp_path / "merged")(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2  # never overwrites


def test_gpt2_conv1d_layers_are_targets_and_its_adapter_merges(tmp_path):
    """GPT-2 keeps its linears in transformers' Conv1D (weight [in, out]); peft adapts them under
    all-linear, so naming them must work too, and `merge` must accept the adapter it trained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_rl.cli import main

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    base.save_pretrained(tmp_path / "gpt2")
    assert linear_module_names(base) == ["c_attn", "c_fc", "c_proj"]
    model = inject_lora(base, LoRAConfig(lora_rank=4, target_modules=("c_attn",)))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} \
        == {"c_attn"}
    _perturb(model)
    expected = model(TOKENS).logits
    save_adapter(model, tmp_path / "adapter", tmp_path / "gpt2")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(_model(tmp_path / "merged")(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_rank_above_an_adapted_layers_smaller_side_is_warned_about(random_model_dir):
    """The tiny model's k_proj and v_proj are 64 in, 32 out: rank 48 cannot be reached there, so the extra
    rank only adds parameters and shrinks the update through lora_alpha / lora_rank."""
    import warnings

    from lora_rl.lora import check_model

    model = _model(random_model_dir)
    with pytest.warns(UserWarning, match=r"lora.lora_rank=48 is above the smaller side of an adapted layer "
                                         r"\(model.layers.0.self_attn.k_proj: 64 in, 32 out\).*lora_rank <= 32"):
        check_model(model, LoRAConfig(lora_rank=48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model(model, LoRAConfig(lora_rank=32))
        check_model(model, LoRAConfig(lora_rank=48, target_modules=("q_proj", "o_proj")))  # 64 x 64 layers


def test_the_output_head_or_embedding_as_a_target_is_named_as_such(random_model_dir):
    for target, role in (("lm_head", "output head"), ("embed_tokens", "input embedding")):
        with pytest.raises(ConfigError, match=rf"\['{target}'\] is the model's {role}, which lora-rl does not adapt"):
            inject_lora(_model(random_model_dir), LoRAConfig(target_modules=("q_proj", target)))


def test_a_mixture_of_experts_counted_in_a_sub_config_is_refused():
    """DBRX keeps its expert count in ffn_config (moe_num_experts), a multimodal MoE in text_config: neither is
    on the top-level config, and DBRX passed as dense (all-linear then put LoRA on its router)."""
    from transformers import DbrxConfig

    dbrx = DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=320, attn_config={"kv_n_heads": 2},
                      ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 16, "moe_top_k": 4})
    with pytest.raises(ConfigError, match=r"'dbrx' is a mixture-of-experts model \(ffn_config.moe_num_experts=16\)"):
        check_dense(dbrx)


def test_a_dense_model_whose_config_says_is_moe_false_is_not_refused():
    """Doge's config always carries num_experts (16384 by default) with is_moe=false for its dense models
    (SmallDoge/Doge-20M ... 320M): they were refused as mixture-of-experts."""
    from transformers import DogeConfig

    check_dense(DogeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320))
    with pytest.raises(ConfigError, match=r"'doge' is a mixture-of-experts model \(num_experts=16384\)"):
        check_dense(DogeConfig(is_moe=True))
