"""Freeze trained ToMoE heads into a deterministic MoE model (a CarvedForCausalLM).

Noise-free everywhere (the official code samples Gumbel noise when freezing masks and at every
inference call, so its model is stochastic): expert masks and the Q/K mask are (logit + offset > 0),
routing is argmax, V masks are thresholded and capped at the width training converged to.
The result computes exactly what ToMoEMasker computes in deterministic mode (tested).
"""

from __future__ import annotations

import torch

from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.models.adapters import Geometry
from llmcarve.models.carve import LayerPlan, carve


def _qk_index(pair_logits: torch.Tensor, offset: float, head_dim: int) -> torch.Tensor:
    kept = (pair_logits + offset > 0).nonzero().flatten()
    if len(kept) == 0:  # attention with no Q/K dims would be uniform; keep the strongest pair
        kept = pair_logits.argmax().view(1)
    return torch.cat([kept, kept + head_dim // 2])


def _mlp_experts(expert_logits: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    masks = expert_logits + offset > 0  # [E, D_ff]
    empty = ~masks.any(-1)
    if empty.any():  # an expert with no channel would output zeros; give it its strongest channel
        masks[empty, expert_logits[empty].argmax(-1)] = True
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
