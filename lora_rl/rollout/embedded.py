"""The embedded rollout engine: in-process sampling with the trainer's own transformers model.

It needs no server and always samples from the current adapter, so publishing a version costs
nothing. The sampling loop is written out (prefill, then one token at a time on the KV cache)
rather than calling `generate()`, so that it returns the log-prob of every sampled token at the
sampling temperature - exactly what the trainer recomputes - without keeping [steps, B, V] logits.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule

from lora_rl import distributed
from lora_rl.lora import adapter_rows
from lora_rl.models import set_training
from lora_rl.rollout.base import AdapterRequest, Completion, SamplingParams, SyncStats


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p; [B, V] -> [B, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the token that crosses top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample(model, prompts: list[list[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
           version: int = 0) -> list[Completion]:
    (completions,) = sample_groups(model, [AdapterRequest(adapter=None, prompts=prompts, params=params)],
                                   eos_id=eos_id, pad_id=pad_id, versions=[version])
    return completions


@torch.no_grad()
def sample_groups(model, requests: list[AdapterRequest], *, eos_id: int, pad_id: int,
                  versions: list[int]) -> list[list[Completion]]:
    """Sample every request in one batch; a list of completions per request.

    Each request draws from a generator seeded with its own `params.seed` over its own rows, so a
    request samples what it would sample alone. With adapter names (a model holding several peft
    adapters), each row goes through its request's adapter (`lora.adapter_rows`)."""
    first = requests[0].params
    for r in requests:
        if (r.params.max_new_tokens, r.params.temperature, r.params.top_p) != \
                (first.max_new_tokens, first.temperature, first.top_p):
            raise ValueError("requests sampled in one batch must share max_new_tokens, temperature and top_p")
    rows = [p for r in requests for p in r.prompts for _ in range(r.params.n)]
    bounds = list(itertools.accumulate((len(r.prompts) * r.params.n for r in requests), initial=0))
    named = any(r.adapter is not None for r in requests)
    segments = [(r.adapter, len(r.prompts) * r.params.n) for r in requests]
    with adapter_rows(model, segments) if named else contextlib.nullcontext():
        # The transformers model inside a peft wrapper: its LoRA layers are in place either way, and the
        # wrapper's forward adds only Python work to every generated token (sampling is host-bound).
        # Not under FSDP2, whose root module must run its own forward (its hooks manage the shards).
        inner = model.get_base_model() if isinstance(model, PeftModel) and not isinstance(model, FSDPModule) \
            else model
        return _sample_rows(inner, requests, rows, bounds, eos_id=eos_id, pad_id=pad_id, versions=versions)


def _sample_rows(model, requests: list[AdapterRequest], rows: list[list[int]], bounds: list[int], *, eos_id: int,
                 pad_id: int, versions: list[int]) -> list[list[Completion]]:
    first = requests[0].params
    device = next(model.parameters()).device
    batch, width = len(rows), max(len(p) for p in rows)
    # Left-pad so every row's next token is at the last column; positions skip the padding.
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, p in enumerate(rows):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        attention[i, width - len(p):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(r.params.seed) for r in requests]

    was_training = model.training
    set_training(model, False)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]  # [B, V]
    next_pos = positions[:, -1] + 1  # [B]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for _ in range(first.max_new_tokens):
        if first.temperature == 0:
            logp = F.log_softmax(logits.float(), dim=-1)
            token = logp.argmax(-1)
        else:
            logp = F.log_softmax(logits.float() / first.temperature, dim=-1)  # [B, V]
            probs = logp.exp()
            if first.top_p < 1.0:
                probs = _top_p_filter(probs, first.top_p)
            token = torch.cat([torch.multinomial(probs[lo:hi], 1, generator=g).squeeze(-1)
                               for lo, hi, g in zip(bounds[:-1], bounds[1:], generators, strict=True)])
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        # The behaviour log-prob is at the sampling temperature and before top-p, which is what
        # the trainer recomputes; with top_p < 1 the two differ slightly (documented in config).
        logps.append(logp.gather(-1, token[:, None]).squeeze(-1))
        done = done | (token == eos_id)
        # Under FSDP2 every forward is a collective: stop only when every rank has finished.
        if not distributed.any_rank(not bool(done.all()), device):
            break
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    set_training(model, was_training)

    token_rows = torch.stack(tokens, dim=1).tolist()  # [B, steps]
    logp_rows = torch.stack(logps, dim=1).tolist()
    out = []
    for r, lo, hi, version in zip(requests, bounds[:-1], bounds[1:], versions, strict=True):
        completions = []
        for i in range(lo, hi):
            ids, lps = token_rows[i], logp_rows[i]
            stop = ids.index(eos_id) + 1 if eos_id in ids else len(ids)
            completions.append(Completion(prompt_index=(i - lo) // r.params.n, token_ids=ids[:stop],
                                          logprobs=lps[:stop], finish_reason="stop" if eos_id in ids else "length",
                                          version=version))
        out.append(completions)
    return out


class EmbeddedEngine:
    """Samples with the trainer's model object itself: the adapter in use is always the current one."""

    name = "embedded"
    needs_adapter = False  # it samples with the trainer's own weights

    def __init__(self, model, tokenizer, generation_context=None):
        self.model = model
        # The backend's context for generating (FSDP2 gathers all shards once per rollout).
        self.generation_context = generation_context or contextlib.nullcontext
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.version = 0
        self.versions: dict[str, int] = {}  # per adapter, when the model holds several

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with self.generation_context():
            return sample(self.model, prompts, params, eos_id=self.eos_id, pad_id=self.pad_id, version=self.version)

    def generate_adapters(self, requests: list[AdapterRequest]) -> list[list[Completion]]:
        """One batch over several adapters of the trainer's model (multi-LoRA jobs)."""
        with self.generation_context():
            return sample_groups(self.model, requests, eos_id=self.eos_id, pad_id=self.pad_id,
                                 versions=[self.versions.get(r.adapter, self.version) for r in requests])

    def publish(self, version: int, adapter_dir: Path | None, adapter: str | None = None) -> SyncStats:
        start = time.perf_counter()
        # Same weights in memory: nothing travels.
        if adapter is None:
            self.version = version
        else:
            self.versions[adapter] = version
        return SyncStats(bytes=0, seconds=time.perf_counter() - start)

    def close(self) -> None:
        pass
