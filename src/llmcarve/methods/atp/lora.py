"""LoRA through PEFT on all seven projections, and the group lasso on the factors of pruned structures.

A LoRA factor slice "feeds" a pruned structure when, after merging W0 + B A, it would write into a
pruned row or read from a pruned column:
- Q/K dim j pruned: the rows j of every head in B_q and B_k;
- V dim j pruned: the rows j of every KV head in B_v, and the columns j of every query head in A_o;
- MLP channel c pruned: row c of B_gate and B_up, column c of A_down.
Each such row or column is one group; its L2 norm is what must reach zero for removal to leave the
LoRA-tuned model unchanged.

The penalty lam * sum ||w_g|| is applied as its proximal step after every LoRA update,
w_g <- w_g * max(0, 1 - lam * lr / ||w_g||): unlike a loss term under Adam it puts groups exactly at
zero, and only the groups of pruned structures are touched, so there is no constant floor from
the kept ones (a pitfall of the official loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from llmcarve.methods.atp.generator import LayerMasks
from llmcarve.models.adapters import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Geometry, adapter_for
from llmcarve.models.carve import per_head_index


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 8.0  # scale alpha / rank = 1, as ATP
    dropout: float = 0.05


def add_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap the seven projections of every layer; only the LoRA factors are trainable."""
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(ATTENTION_PROJECTIONS + MLP_PROJECTIONS),
        bias="none",
    )
    return get_peft_model(model, config)


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel (hooks and adapters address its layers)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


@dataclass
class FactorSlice:
    """Rows (dim 0, of a B factor) or columns (dim 1, of an A factor) of one LoRA weight; each is a group."""

    weight: nn.Parameter
    dim: int
    index: torch.LongTensor

    def norms(self) -> torch.Tensor:
        return self.weight.detach().index_select(self.dim, self.index).float().norm(dim=1 - self.dim)

    @torch.no_grad()
    def shrink(self, amount: float) -> None:
        groups = self.weight.index_select(self.dim, self.index)
        norms = groups.float().norm(dim=1 - self.dim, keepdim=True)
        scale = (1 - amount / norms.clamp_min(1e-12)).clamp_min(0).to(groups.dtype)
        self.weight.index_copy_(self.dim, self.index, groups * scale)


def pruned_slices(model: nn.Module, masks: list[LayerMasks]) -> list[FactorSlice]:
    """The LoRA factor slices that feed the pruned structures of `masks` (see the module docstring)."""
    hf_model = base_model(model)
    adapter, geometry = adapter_for(hf_model.config), Geometry.from_config(hf_model.config)
    heads, kv_heads, hd = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    slices = []
    for layer, decision in zip(adapter.layers(hf_model), masks):
        attention, mlp = adapter.attention(layer), adapter.mlp(layer)
        qk = (decision.qk == 0).nonzero().flatten().cpu()
        v = (decision.v == 0).nonzero().flatten().cpu()
        channels = (decision.mlp == 0).nonzero().flatten().cpu()
        wanted = [
            (attention.q_proj, "B", per_head_index(qk, heads, hd)),
            (attention.k_proj, "B", per_head_index(qk, kv_heads, hd)),
            (attention.v_proj, "B", per_head_index(v, kv_heads, hd)),
            (attention.o_proj, "A", per_head_index(v, heads, hd)),
            (mlp.gate_proj, "B", channels),
            (mlp.up_proj, "B", channels),
            (mlp.down_proj, "A", channels),
        ]
        for projection, factor, index in wanted:
            if len(index):
                weight = (projection.lora_B if factor == "B" else projection.lora_A)["default"].weight
                slices.append(FactorSlice(weight, 0 if factor == "B" else 1, index.to(weight.device)))
    return slices


def group_norms(slices: list[FactorSlice]) -> torch.Tensor:
    """Every pruned group's L2 norm (empty when nothing is pruned)."""
    if not slices:
        return torch.zeros(0)
    return torch.cat([piece.norms().cpu() for piece in slices])


def proximal_group_lasso(slices: list[FactorSlice], amount: float) -> None:
    """One proximal step of amount * sum ||w_g|| (amount = strength * learning rate)."""
    for piece in slices:
        piece.shrink(amount)
