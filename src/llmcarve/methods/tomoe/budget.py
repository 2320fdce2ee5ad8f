"""Active attention+MLP weights per token, GQA-aware, as a differentiable function of the masks.

Per layer: d * (H + H_kv) * (w_qk + w_v) + 3 * d * w_mlp, where w_qk is the kept Q/K head dims, w_v the
WIDEST per-token V mask in the batch and w_mlp the WIDEST expert. Counting maxima (not means) is what
makes the budget hold after conversion: every token's expert and V mask then fit within it.
H counts query heads (q and o), H_kv key/value heads (k and v).
"""

from __future__ import annotations

import torch

from llmcarve.methods.tomoe.distributed import SINGLE, Shard, batch_max
from llmcarve.models.adapters import Geometry


def dense_weights(geometry: Geometry) -> int:
    return geometry.num_layers * (geometry.attention_weights_per_layer + geometry.mlp_weights_per_layer)


def active_ratio(geometry: Geometry, layers, shard: Shard = SINGLE) -> torch.Tensor:
    """Kept fraction of attention+MLP weights per token, from a masker's LayerDecisions.

    Under data parallelism the widest V mask is the whole batch's, not this process's share's.
    """
    total = 0
    for decisions in layers:
        qk_width = decisions.qk_mask.sum()
        v_width = batch_max(decisions.v_mask.sum(-1), shard)
        mlp_width = decisions.expert_masks.sum(-1).max()
        total = total + geometry.layer_weights(qk_width, v_width, mlp_width)
    return total / dense_weights(geometry)
