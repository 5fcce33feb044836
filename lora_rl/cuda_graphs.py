"""Each decoder layer's training forward and backward replayed as CUDA graphs (`backend.cuda_graphs`).

Why: a LoRA step on a mid-size model waits on the host. With compiled layers and the fused operators'
C++ bodies, a profiled 1.5B-shaped LoRA step on an H200 left the GPU idle for 35-70 ms of 140-160
(README, issue 8): every layer launches a few dozen kernels forward and backward, each costing host
time the GPU work cannot hide. A CUDA graph launches a layer's whole forward (or backward) at once.

How: `torch.cuda.make_graphed_callables` captures every layer at the first training forward of a batch
shape, and each layer's call is routed to its graph while the model trains with gradients on a CUDA
device; scoring passes (no gradient) and sampling keep the compiled or eager layers. A graph replays
fixed addresses and shapes, so each (batch, length, mask) shape gets its own capture, which keeps its
activation memory: at most `MAX_SHAPES` are kept, the least recently used is dropped. Inputs are copied
into the graph's buffers, outputs are the graph's buffers: one micro-batch's backward must run before
the next micro-batch's forward, as the GRPO update does.

Gradients: a graph writes each parameter's gradient into the same buffer on every replay. autograd
would adopt that buffer as `.grad` when `.grad` is None (and the next replay would overwrite an
accumulated gradient), so the trainable parameters keep allocated gradients that autograd adds into
(`keep_grads`), and the optimizer zeroes them in place instead of freeing them.

Not with FSDP2 sharding (its hooks gather and free shards per layer; the engine refuses it) nor with
activation checkpointing (which re-runs the layer; the config refuses it).

What it gave (README, H200): the profiled GPU idle time of a 1.5B LoRA step fell from 39 to 11 ms, but
the timed step did not get faster (0.141 against 0.139 s); at 0.5B it did (0.071 against 0.078 s).
With the memory each captured shape keeps, that is why it is a switch, off by default.
"""

from __future__ import annotations

import collections

import torch

MAX_SHAPES = 2


class _LayerCall(torch.nn.Module):
    """One layer's call with positional tensors only (what make_graphed_callables takes); the layer is
    a child so that its parameters are the graph's parameters."""

    def __init__(self, layer: torch.nn.Module, call, kwargs: dict):
        super().__init__()
        self.layer = layer
        self._call = call  # the layer's own (compiled) call, not the routing installed below
        self._kwargs = kwargs

    def forward(self, hidden, cos, sin, *mask):
        return self._call(hidden, attention_mask=mask[0] if mask else None, position_embeddings=(cos, sin),
                          **self._kwargs)


class GraphedLayers:
    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module]):
        self.model = model
        self.layers = layers
        self.calls = []
        self.graphs: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self.captures = 0
        self.replays = 0  # layer calls served by a graph
        self.active = None  # (input shape, graphs) of the forward under way
        self.params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        for i, layer in enumerate(layers):
            # nn.Module.__call__ runs `_compiled_call_impl` when set (layer.compile() sets it): routing
            # there keeps the module tree, its parameter names and checkpoints unchanged.
            own = layer._compiled_call_impl or layer._call_impl
            self.calls.append(own)
            layer._compiled_call_impl = self._route(i, own)

    def _route(self, i: int, own):
        def call(hidden_states, *args, attention_mask=None, position_embeddings=None, **kwargs):
            if args or position_embeddings is None or not self._training(hidden_states) \
                    or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
                if i == 0:
                    self.active = None
                return own(hidden_states, *args, attention_mask=attention_mask,
                           position_embeddings=position_embeddings, **kwargs)
            cos, sin = position_embeddings
            mask = () if attention_mask is None else (attention_mask,)
            if i == 0:  # a new forward: its shapes pick (or capture) the graphs every layer replays
                keep_grads(self.params)
                key = (tuple(hidden_states.shape), tuple(cos.shape), hidden_states.dtype,
                       None if attention_mask is None else (tuple(attention_mask.shape), attention_mask.dtype),
                       hidden_states.requires_grad)  # the embeddings train (full fine-tuning) or not
                if key not in self.graphs:
                    self._capture(key, hidden_states, cos, sin, mask, kwargs)
                self.graphs.move_to_end(key)
                self.active = (key[0], self.graphs[key])
            elif self.active is None or tuple(hidden_states.shape) != self.active[0]:
                return own(hidden_states, *args, attention_mask=attention_mask,
                           position_embeddings=position_embeddings, **kwargs)
            self.replays += 1
            return self.active[1][i](hidden_states, cos, sin, *mask)
        return call

    def _training(self, hidden: torch.Tensor) -> bool:
        return hidden.is_cuda and torch.is_grad_enabled() and self.model.training

    def _capture(self, key, hidden, cos, sin, mask, kwargs) -> None:
        while len(self.graphs) >= MAX_SHAPES:
            self.graphs.popitem(last=False)  # its memory pool goes with its graphs
        calls = tuple(_LayerCall(layer, own, dict(kwargs)) for layer, own in zip(self.layers, self.calls, strict=True))
        samples = []
        for i in range(len(self.layers)):
            # The first layer's input needs a gradient only where the embeddings train (full fine-tuning).
            h = hidden.detach().clone().requires_grad_(hidden.requires_grad if i == 0 else True)
            samples.append((h, cos.detach(), sin.detach(), *(m.detach() for m in mask)))
        self.graphs[key] = list(torch.cuda.make_graphed_callables(calls, tuple(samples), num_warmup_iters=2))
        self.captures += 1


def keep_grads(params: list[torch.Tensor]) -> None:
    """Allocate the gradients that graphed backward passes add into (see the module docstring)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
