"""The pruning-decision generator: one static keep/drop decision per structure, for the whole domain.

Per decoder layer it decides
- Q/K head dims, as hd/2 rotate-half pairs (j, j + hd/2) kept or dropped together, shared by every
  query and key head (so it is GQA-correct and RoPE cannot leak a dropped dim back in);
- V head dims, shared by every KV head, with the o_proj input columns that read them;
- MLP channels (gate/up rows, down_proj columns).

Architecture as in ATP: a fixed orthogonal embedding per layer, a small transformer encoder whose
sequence axis is the layers (so one layer's decision can depend on the others'), a LayerNorm and a
bias-free linear head per layer and structure type. Masks are hard straight-through Gumbel-sigmoid
samples with a positive offset, so training starts from the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcarve.methods.tomoe.gumbel import hard_sigmoid_mask, keep_at_least_one
from llmcarve.models.adapters import Geometry


@dataclass
class LayerMasks:
    """One layer's decisions; 1 keeps, 0 prunes. Straight-through tensors while training."""

    qk: torch.Tensor  # [hd], the pair decisions repeated as [pairs, pairs]
    v: torch.Tensor  # [hd]
    mlp: torch.Tensor  # [D_ff]

    def detach(self) -> "LayerMasks":
        return LayerMasks(self.qk.detach(), self.v.detach(), self.mlp.detach())

    def kept(self) -> tuple[int, int, int]:
        """Kept Q/K dims, V dims and MLP channels."""
        return int(self.qk.sum()), int(self.v.sum()), int(self.mlp.sum())


MASK_KINDS = ("qk", "v", "mlp")


def masks_state(masks: list[LayerMasks], prefix: str = "") -> dict[str, torch.Tensor]:
    """Flat tensors for a safetensors file: `<prefix><layer>.<kind>`."""
    return {f"{prefix}{i}.{kind}": getattr(m, kind).detach().float().cpu() for i, m in enumerate(masks) for kind in MASK_KINDS}


def masks_from_state(state: dict[str, torch.Tensor], prefix: str = "", device=None) -> list[LayerMasks] | None:
    """The inverse of masks_state; None when `state` holds no masks under `prefix`."""
    layers = sum(1 for key in state if key.startswith(prefix) and key.endswith(".qk"))
    if not layers:
        return None
    return [LayerMasks(*(state[f"{prefix}{i}.{kind}"].float().to(device) for kind in MASK_KINDS)) for i in range(layers)]


@dataclass
class LayerLogits:
    qk_pairs: torch.Tensor  # [hd / 2]
    v: torch.Tensor  # [hd]
    mlp: torch.Tensor  # [D_ff]


class DecisionGenerator(nn.Module):
    def __init__(self, geometry: Geometry, embedding_dim: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        half, count = geometry.head_dim // 2, geometry.num_layers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial decision must not depend on the caller's global RNG state
            embeddings = torch.empty(count, embedding_dim)
            # Orthogonal rows: every layer starts from a distinct, equally scaled input (a buffer, not trained).
            nn.init.orthogonal_(embeddings)
            self.register_buffer("layer_embeddings", embeddings)
            # dropout 0 (the official code keeps torch's 0.1): the Gumbel noise already explores, and a
            # noise-free generator makes the frozen decision a pure function of its weights.
            encoder_layer = nn.TransformerEncoderLayer(embedding_dim, heads, 4 * embedding_dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(encoder_layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(embedding_dim)
            self.qk_heads = nn.ModuleList(nn.Linear(embedding_dim, half, bias=False) for _ in range(count))
            self.v_heads = nn.ModuleList(nn.Linear(embedding_dim, geometry.head_dim, bias=False) for _ in range(count))
            self.mlp_heads = nn.ModuleList(nn.Linear(embedding_dim, geometry.intermediate_size, bias=False) for _ in range(count))

    def forward(self) -> list[LayerLogits]:
        states = self.norm(self.encoder(self.layer_embeddings.unsqueeze(0))).squeeze(0)
        return [
            LayerLogits(qk(state), v(state), mlp(state))
            for state, qk, v, mlp in zip(states, self.qk_heads, self.v_heads, self.mlp_heads)
        ]


def sample_masks(
    logits: list[LayerLogits], temperature: float, offset: float, generator: torch.Generator | None
) -> list[LayerMasks]:
    """Hard straight-through masks; generator=None gives the noise-free decision (logit + offset > 0).

    Every layer keeps at least one Q/K pair, V dim and MLP channel: an empty attention would attend
    uniformly, an empty MLP is better expressed by a smaller p elsewhere.
    """

    def mask(values: torch.Tensor) -> torch.Tensor:
        return keep_at_least_one(hard_sigmoid_mask(values, temperature, offset, generator), values)

    masks = []
    for layer in logits:
        pairs = mask(layer.qk_pairs)
        masks.append(LayerMasks(torch.cat([pairs, pairs]), mask(layer.v), mask(layer.mlp)))
    return masks
