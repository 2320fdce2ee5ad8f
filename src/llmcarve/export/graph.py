"""What is exported: one decoder graph, `input_ids` + past keys/values -> logits + present keys/values.

One graph serves prefill and decoding: prefill feeds a past of length 0, decoding feeds the presents
of the previous call. Two graphs (prefill, with-past) would store every weight twice on disk, which
is why optimum used to merge them afterwards; a single graph never has the copy.

The past is flat, one tensor per layer and kind (`past_key_values.{i}.key` [batch, kv_heads, past,
key_dim], `...value` [..., value_dim]), because carved models have their own K and V widths per layer
(`qk_dims`, `v_dims`): no [layers, ...] stack could hold them. Batch rows share one length (no
padding input; see `llmcarve.export` for why).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from llmcarve.models.adapters import Geometry, adapter_for

INPUT_IDS, LOGITS = "input_ids", "logits"
# Routing that the graph expresses with graph ops, every expert's channels included (see `export_ready`).
STATIC_ROUTING = "masked"


@dataclass(frozen=True)
class LayerCache:
    """The K/V cache shape of one layer (besides batch and length)."""

    kv_heads: int
    key_dim: int
    value_dim: int


def layer_caches(model: nn.Module) -> list[LayerCache]:
    """Read off the k/v projections, so dense and carved models (per-layer widths) are one case."""
    adapter, kv_heads = adapter_for(model.config), Geometry.from_config(model.config).num_kv_heads
    caches = []
    for layer in adapter.layers(model):
        attention = adapter.attention(layer)
        caches.append(LayerCache(kv_heads, attention.k_proj.out_features // kv_heads, attention.v_proj.out_features // kv_heads))
    return caches


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class CausalLMGraph(nn.Module):
    """The model behind a flat-tensor signature that an exporter can trace and onnxruntime can feed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        # The model's own cache class, filled from the flat inputs, so decoding runs the same code path
        # (positions from the past length, causal mask offset by it) as `generate` does in PyTorch.
        cache = DynamicCache()
        for layer, (key, value) in enumerate(zip(past[0::2], past[1::2])):
            cache.update(key, value, layer)
        logits = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
        presents = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (logits, *presents)

    def example_inputs(self, batch: int = 2, length: int = 3, past_length: int = 4) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tracing inputs. Every size is at least 2: torch.export specialises dims of size 0 and 1."""
        device = next(self.model.parameters()).device
        input_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        past = [
            torch.zeros(batch, cache.kv_heads, past_length, width, device=device)
            for cache in layer_caches(self.model)
            for width in (cache.key_dim, cache.value_dim)
        ]
        return input_ids, past

    def dynamic_shapes(self) -> tuple[dict, list[dict]]:
        batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
        # min=1: the cache reports an empty past through a size check (`numel() == 0`), which would
        # split the trace in two; with past >= 1 it resolves statically. A past of length 0 still
        # runs, because nothing in the graph depends on it being non-empty (prefill parity is tested
        # exactly that way).
        past_length = torch.export.Dim("past_sequence", min=1)
        layers = len(layer_caches(self.model))
        return {0: batch, 1: length}, [{0: batch, 2: past_length}] * (2 * layers)


@contextmanager
def export_ready(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and, for carved MoE models, the masked expert routing; both restored afterwards.

    The masked path computes every kept channel and multiplies by `expert_mask[argmax(router)]`, so
    top-1 routing is a Gather in the graph and every expert's weights are in it. torch.export refuses
    the other two (sorted: a Python loop over per-expert token counts read from the data; grouped: a
    weight cache keyed on data pointers), and a tracer that accepted the loop would bake in only the
    experts the example input happened to reach.
    """
    training, config = model.training, model.config
    carved = hasattr(config, "moe_impl")  # dense families have one MLP path
    routing = config.moe_impl if carved else None
    model.eval()
    if carved:
        config.moe_impl = STATIC_ROUTING
    try:
        yield model
    finally:
        model.train(training)
        if carved:
            config.moe_impl = routing
