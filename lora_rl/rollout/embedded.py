"""The embedded rollout engine: in-process sampling with the trainer's own transformers model.

It needs no server and always samples from the current adapter, so publishing a version costs
nothing. The sampling loop is written out (prefill, then one token at a time on the KV cache)
rather than calling `generate()`, so that it returns the log-prob of every sampled token at the
sampling temperature - exactly what the trainer recomputes - without keeping [steps, B, V] logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.distributed.fsdp import FSDPModule
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from lora_rl import distributed
from lora_rl.lora import adapter_rows
from lora_rl.models import set_training
from lora_rl.rollout.base import AdapterRequest, Completion, RolloutError, SamplingParams, SyncStats


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p; [B, V] -> [B, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the token that reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample(model, prompts: list[list[int]], params: SamplingParams, *, eos_id: int | tuple[int, ...], pad_id: int,
           version: int = 0, cuda_graphs: bool = False) -> list[Completion]:
    (completions,) = sample_groups(model, [AdapterRequest(adapter=None, prompts=prompts, params=params)],
                                   eos_id=eos_id, pad_id=pad_id, versions=[version], cuda_graphs=cuda_graphs)
    return completions


@torch.no_grad()
def sample_groups(model, requests: list[AdapterRequest], *, eos_id: int | tuple[int, ...], pad_id: int,
                  versions: list[int], cuda_graphs: bool = False) -> list[list[Completion]]:
    """Sample every request in one batch; a list of completions per request.

    Each request draws from a generator seeded with its own `params.seed` over its own rows, so a
    request samples what it would sample alone. With adapter names (a model holding several peft
    adapters), each row goes through its request's adapter (`lora.adapter_rows`).

    cuda_graphs: on a GPU, each generated token's forward replays a CUDA graph captured for this call
    (`rollout.cuda_graphs`). Not with several adapters in one batch, nor under FSDP2, whose hooks run
    per forward: those decode eagerly."""
    first = requests[0].params
    for r in requests:
        if (r.params.max_new_tokens, r.params.temperature, r.params.top_p) != \
                (first.max_new_tokens, first.temperature, first.top_p):
            raise ValueError("requests sampled in one batch must share max_new_tokens, temperature and top_p")
    rows = [p for r in requests for p in r.prompts for _ in range(r.params.n)]
    if not rows:  # nothing to sample on this process (an empty share of the eval set)
        if distributed.active():
            # The other processes' sampling meets this one's at every collective (FSDP2's forwards, the
            # all-finished check): one padding row decodes greedily in step with them, and is dropped.
            sample_groups(model, [AdapterRequest(adapter=None, prompts=[[pad_id]],
                                                 params=dataclasses.replace(first, n=1, temperature=0.0))],
                          eos_id=eos_id, pad_id=pad_id, versions=[0], cuda_graphs=cuda_graphs)
        return [[] for _ in requests]
    bounds = list(itertools.accumulate((len(r.prompts) * r.params.n for r in requests), initial=0))
    named = any(r.adapter is not None for r in requests)
    segments = [(r.adapter, len(r.prompts) * r.params.n) for r in requests]
    with adapter_rows(model, segments) if named else contextlib.nullcontext():
        # The transformers model inside a peft wrapper: its LoRA layers are in place either way, and the
        # wrapper's forward adds only Python work to every generated token (sampling is host-bound).
        # Not under FSDP2, whose root module must run its own forward (its hooks manage the shards).
        inner = model.get_base_model() if isinstance(model, PeftModel) and not isinstance(model, FSDPModule) \
            else model
        graphs = (cuda_graphs and not named and next(model.parameters()).is_cuda
                  and not any(isinstance(m, FSDPModule) for m in model.modules()))
        return _sample_rows(inner, requests, rows, bounds, eos_id=eos_id, pad_id=pad_id, versions=versions,
                            graphs=graphs)


class _SlotCache(Cache):
    """A static KV cache written at slots the sampler chooses (`slots`, a device tensor it sets before each
    forward), not at a counter of its own: a CUDA graph replays the same decode forward for every token,
    and a warm-up run before capturing it must not move anything. Every layer holds [B, kv_heads, length,
    head_dim] keys and values from the prefill on; the sampler's 4D mask says which slots each query sees."""

    def __init__(self, length: int):
        super().__init__(layers=[])
        self.length = length
        self.slots: torch.Tensor | None = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.keys:  # the prefill allocates; decode forwards only write in place
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(b, h, self.length, d)
            self.values[layer_idx] = value_states.new_zeros(b, h, self.length, value_states.shape[-1])
        self.keys[layer_idx].index_copy_(2, self.slots, key_states)
        self.values[layer_idx].index_copy_(2, self.slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and the mask are always given, so nothing reads this beyond an unused default


def _attention_bias(seen: torch.Tensor, queries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, q, L] additive mask: query slot i of row b sees slot j <= i if j holds one of b's tokens
    (`seen`, [B, L]). Masked scores get the dtype's lowest finite value, not -inf, so a left-padding query
    that sees nothing averages finite values instead of making NaN. Additive, in the model dtype, as both
    sdpa and eager attention take it."""
    slots = torch.arange(seen.shape[1], device=seen.device)
    visible = (slots[None, :] <= queries[:, None]) & seen[:, None, :]
    return torch.zeros(visible.shape, dtype=dtype, device=seen.device).masked_fill_(
        ~visible, torch.finfo(dtype).min)[:, None]


def stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's eos and every id of the model's generation config,
    as Hugging Face's generate and vLLM stop (an instruct model's end-of-turn token is often only there:
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def sliding_window(config) -> int | None:
    """The model's sliding attention window where some layer uses one (Mistral, Gemma 2/3, Qwen2 with
    use_sliding_window), else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    active = window is not None and getattr(config, "use_sliding_window", True) is not False and (
        not layer_types or "sliding_attention" in layer_types)
    return window if active else None


def _check_attention_span(config, length: int) -> None:
    """The sampler passes its own mask over the whole sequence, so a model whose layers attend over a sliding
    window would sample from another model than the trainer scores once a sequence passes the window:
    refuse rather than train on mismatched log-probs. (train() checks the task's prompts before the run.)"""
    window = sliding_window(config)
    if window is not None and length > window:
        raise RolloutError(f"this rollout's sequences reach {length} tokens (longest prompt + rollout.max_new_tokens), "
                           f"past the model's sliding attention window of {window} tokens, which the embedded "
                           "sampler does not apply: lower rollout.max_new_tokens or the prompt length, or use "
                           "rollout.engine=vllm for this model")


def _grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa for one new token per row against the whole KV cache, without copying the keys and values
    once per query head: transformers' sdpa path repeats them for grouped-query models whenever a mask is
    given, which was 35% of a 0.5B rollout's GPU time on an H100. The query heads that share a KV head
    become that head's rows of queries (transformers' repeat puts them next to each other), and the
    [B, 1, 1, L] mask is the same for each."""
    b, heads, q, d = query.shape
    groups = key.shape[1]
    if q != 1:
        raise ValueError(f"the decode attention takes one new token per row, got {q}")
    out = F.scaled_dot_product_attention(query.reshape(b, groups, heads // groups, d), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, d).transpose(1, 2), None


AttentionInterface.register("lora_rl_decode", _grouped_decode_attention)


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    """The model's attention function for the duration (transformers looks it up at every call)."""
    before = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


def _decode_runner(forward, graphs: bool):
    """`forward` itself, or on a GPU a CUDA graph of it: one launch per generated token instead of the
    model's ~1,000 (sampling a small model is bound by the host's launches, not by the GPU). The
    graph reads and writes only tensors `forward` closes over, which the sampler updates in place.
    A model whose forward cannot be captured (a host sync, say) stops with the switch that avoids it."""
    if not graphs:
        return forward
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces); writes what the replay writes
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            logits = forward()
    except RuntimeError as error:
        raise RuntimeError(f"rollout.cuda_graphs=true: this model's decode forward could not be captured as a "
                           f"CUDA graph ({error}); set rollout.cuda_graphs=false to decode eagerly") from error

    def replay():
        graph.replay()
        return logits  # overwritten by the next replay: the sampler reads it before then

    return replay


_DONE_EVERY = 8  # tokens between checks that every row has finished (each check waits for the GPU)


def _sample_rows(model, requests: list[AdapterRequest], rows: list[list[int]], bounds: list[int], *,
                 eos_id: int | tuple[int, ...], pad_id: int, versions: list[int], graphs: bool) -> list[list[Completion]]:
    first = requests[0].params
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    batch, width, steps = len(rows), max(len(p) for p in rows), first.max_new_tokens
    _check_attention_span(model.config, width + steps)
    stop_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
    stops = torch.tensor(stop_ids, device=device)
    # Left-pad so every row's next token is at the last column; positions skip the padding. The KV cache
    # has a slot per prompt column and per generated token: generated token k sits at slot width + k.
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    seen = torch.zeros((batch, width + steps), dtype=torch.bool, device=device)
    for i, p in enumerate(rows):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
        seen[i, width - len(p):width] = True
    positions = (seen[:, :width].long().cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(r.params.seed) for r in requests]

    was_training = model.training
    set_training(model, False)
    cache = _SlotCache(width + steps)
    cache.slots = torch.arange(width, device=device)
    out = model(input_ids=input_ids, attention_mask=_attention_bias(seen, cache.slots, dtype),
                position_ids=positions, past_key_values=cache, use_cache=True)
    logits = out.logits[:, -1]  # [B, V]
    # The decode forward's inputs, updated in place before each call (a CUDA graph reads them by address).
    token_in = torch.zeros((batch, 1), dtype=torch.long, device=device)
    position_in = positions[:, -1:] + 1
    bias_in = torch.full((batch, 1, 1, width + steps), torch.finfo(dtype).min, dtype=dtype, device=device)
    bias_in[:, 0, 0, :width].masked_fill_(seen[:, :width], 0.0)
    cache.slots = torch.full((1,), width, dtype=torch.long, device=device)

    def forward():
        # A model that soft-caps its attention logits (Gemma 2) decodes with its own attention function, as
        # it scores in training: the grouped decode attention has no soft-capping.
        with (contextlib.nullcontext() if getattr(model.config, "attn_logit_softcapping", None)
              else _attention_implementation(model, "lora_rl_decode")):
            return model(input_ids=token_in, attention_mask=bias_in, position_ids=position_in,
                         past_key_values=cache, use_cache=True).logits[:, -1]

    decode = None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for step in range(steps):
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
        done = done | torch.isin(token, stops)
        if step + 1 == steps:
            break
        # Under FSDP2 every forward is a collective: stop only when every rank has finished.
        if step % _DONE_EVERY == _DONE_EVERY - 1 and not distributed.any_rank(not bool(done.all()), device):
            break
        token_in.copy_(token[:, None])
        cache.slots.fill_(width + step)
        bias_in[:, 0, 0, width + step] = 0.0
        if decode is None:
            decode = _decode_runner(forward, graphs)
        logits = decode()
        position_in.add_(1)
    set_training(model, was_training)

    token_rows = torch.stack(tokens, dim=1).tolist()  # [B, steps]
    logp_rows = torch.stack(logps, dim=1).tolist()
    out = []
    for r, lo, hi, version in zip(requests, bounds[:-1], bounds[1:], versions, strict=True):
        completions = []
        for i in range(lo, hi):
            ids, lps = token_rows[i], logp_rows[i]
            ended = next((k for k, t in enumerate(ids) if t in stop_ids), None)
            stop = len(ids) if ended is None else ended + 1
            completions.append(Completion(prompt_index=(i - lo) // r.params.n, token_ids=ids[:stop],
                                          logprobs=lps[:stop], finish_reason="length" if ended is None else "stop",
                                          version=version))
        out.append(completions)
    return out


class EmbeddedEngine:
    """Samples with the trainer's model object itself: the adapter in use is always the current one."""

    name = "embedded"
    needs_adapter = False  # it samples with the trainer's own weights

    def __init__(self, model, tokenizer, generation_context=None, cuda_graphs: bool = False):
        self.model = model
        self.cuda_graphs = cuda_graphs
        # The backend's context for generating (FSDP2 gathers all shards once per rollout).
        self.generation_context = generation_context or contextlib.nullcontext
        self.eos_id = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.version = 0
        self.versions: dict[str, int] = {}  # per adapter, when the model holds several

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        with self.generation_context():
            return sample(self.model, prompts, params, eos_id=self.eos_id, pad_id=self.pad_id, version=self.version,
                          cuda_graphs=self.cuda_graphs)

    def generate_adapters(self, requests: list[AdapterRequest]) -> list[list[Completion]]:
        """One batch over several adapters of the trainer's model (multi-LoRA jobs)."""
        with self.generation_context():
            return sample_groups(self.model, requests, eos_id=self.eos_id, pad_id=self.pad_id,
                                 versions=[self.versions.get(r.adapter, self.version) for r in requests],
                                 cuda_graphs=self.cuda_graphs)

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
