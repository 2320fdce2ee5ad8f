"""Freeze trained ToMoE heads into a deterministic MoE model (a CarvedForCausalLM).

Noise-free everywhere (the official code samples Gumbel noise when freezing masks and at every
inference call, so its model is stochastic): expert masks and the Q/K mask are (logit + offset > 0),
routing is argmax, V masks are thresholded and capped at the width training converged to.
The result computes exactly what ToMoEMasker computes in deterministic mode (tested).
"""

from __future__ import annotations

import torch

from llmcarve.methods.tomoe.gumbel import keep_at_least_one
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.models.adapters import Geometry
from llmcarve.models.carve import LayerPlan, carve


def deterministic_mask(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """The noise-free mask the masker uses in deterministic mode, as booleans."""
    return keep_at_least_one((logits + offset > 0).float(), logits).bool()


def _qk_index(pair_logits: torch.Tensor, offset: float, head_dim: int) -> torch.Tensor:
    kept = deterministic_mask(pair_logits, offset).nonzero().flatten()
    return torch.cat([kept, kept + head_dim // 2])


def _mlp_experts(expert_logits: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    masks = deterministic_mask(expert_logits, offset)  # [E, D_ff]
    union = masks.any(0).nonzero().flatten()
    return union, masks[:, union]


@torch.no_grad()
def tomoe_plans(heads: ToMoEHeads, geometry: Geometry, offset: float, v_topk: list[int]) -> list[LayerPlan]:
    embeddings = heads.hypernetwork()
    plans = []
    for index in range(geometry.num_layers):
        attention, mlp = heads.attention[index], heads.mlp[index]
        attention_emb = embeddings[index, 0].mean(0)
        mlp_index, expert_mask = _mlp_experts(mlp.decoder(embeddings[index, 1]), offset)
        plans.append(
            LayerPlan(
                qk_index=_qk_index(attention.qk_pair_logits(attention_emb), offset, geometry.head_dim),
                # V stays whole in storage: which dims a token uses is decided per token by the router
                v_index=torch.arange(geometry.head_dim),
                mlp_index=mlp_index,
                expert_mask=expert_mask,
                router_weight=mlp.router.weight.detach().clone(),
                v_router={
                    "router": attention.router.weight.detach().clone(),
                    "state": attention_emb.detach().clone(),
                    "norm_weight": attention.decoder.norm.weight.detach().clone(),
                    "norm_bias": attention.decoder.norm.bias.detach().clone(),
                    "decoder": attention.decoder.linear.weight[: geometry.head_dim].detach().clone(),
                    "offset": offset,
                },
                v_active=min(v_topk[index], geometry.head_dim),
            )
        )
    return plans


def convert_to_moe(model, heads: ToMoEHeads, offset: float, v_topk: list[int]):
    return carve(model, tomoe_plans(heads, Geometry.from_config(model.config), offset, v_topk))
