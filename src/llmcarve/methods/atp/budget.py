"""The kept fraction of attention+MLP weights, and fitting a frozen decision to a target p.

`p` is the KEPT fraction everywhere. The count is GQA-aware and exact per module (the one formula
lives in Geometry.layer_weights): q d*H*k, k d*H_kv*k, v d*H_kv*v, o d*H*v, MLP 3*d*f for kept Q/K
dims k, V dims v and channels f. Embeddings, lm_head and norms are not counted (the ratio is over
what can be pruned).
"""

from __future__ import annotations

import torch

from llmcarve.methods.atp.generator import LayerLogits, LayerMasks
from llmcarve.methods.tomoe.gumbel import keep_at_least_one
from llmcarve.models.adapters import Geometry


def total_weights(geometry: Geometry) -> int:
    return geometry.num_layers * (geometry.attention_weights_per_layer + geometry.mlp_weights_per_layer)


def kept_ratio(geometry: Geometry, masks: list[LayerMasks]) -> torch.Tensor:
    """Differentiable through straight-through masks: the generator's ratio loss uses it."""
    kept = sum(geometry.layer_weights(m.qk.sum(), m.v.sum(), m.mlp.sum()) for m in masks)
    return kept / total_weights(geometry)


def fit_to_budget(geometry: Geometry, logits: list[LayerLogits], offset: float, p: float) -> list[LayerMasks]:
    """The noise-free decision with the threshold moved so that it keeps a fraction p (at most).

    Units (Q/K pairs, V dims, MLP channels of every layer) are ranked by logit + offset, exactly
    the quantity the noise-free decision thresholds at 0, and kept best first while their weights
    fit in p. The ranking the generator learned is kept; only the cut moves. When training has
    settled on p this is the noise-free decision itself; the trainer reports both ratios, so a cut
    that had to move far is visible.
    """
    d, heads = geometry.hidden_size, geometry.num_heads + geometry.num_kv_heads
    scores, weights = [], []
    for layer in logits:
        for values, weight in ((layer.qk_pairs, 2 * d * heads), (layer.v, d * heads), (layer.mlp, 3 * d)):
            scores.append(values.detach().float() + offset)
            weights.append(torch.full_like(values, float(weight), dtype=torch.float64))
    flat_scores, flat_weights = torch.cat(scores), torch.cat(weights)
    order = flat_scores.argsort(descending=True)
    fits = flat_weights[order].cumsum(0) <= p * total_weights(geometry)
    keep = torch.zeros_like(flat_scores, dtype=torch.bool)
    keep[order[fits]] = True

    masks, start = [], 0
    for layer in logits:
        parts = []
        for values in (layer.qk_pairs, layer.v, layer.mlp):
            chosen = keep[start : start + values.numel()].float()
            parts.append(keep_at_least_one(chosen, values.detach()))
            start += values.numel()
        pairs, v, mlp = parts
        masks.append(LayerMasks(torch.cat([pairs, pairs]), v, mlp))
    return masks
