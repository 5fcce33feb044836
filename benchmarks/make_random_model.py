"""Write a random-init model folder of a named shape (no weights can be downloaded on the GPU machine).

    python benchmarks/make_random_model.py qwen2.5-0.5b /tmp/qwen2.5-0.5b-random

The tokenizer is lora-rl's small byte-level BPE trained on arithmetic text: the model keeps the
real vocabulary size (151,936 rows), and ids the tokenizer does not know decode to nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES  # noqa: E402

from lora_rl.models import _train_tokenizer  # noqa: E402
from lora_rl.tasks import format_prompt, load_problems  # noqa: E402


def main() -> None:
    shape, out = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape], max_position_embeddings=4096),
                                             dtype=torch.bfloat16)
    problems = load_problems("arithmetic", split="train", difficulty=3)
    tokenizer = _train_tokenizer([format_prompt(p.question) + p.solution for p in problems], 384)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
