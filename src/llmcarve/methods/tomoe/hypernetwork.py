"""The trainable part of ToMoE: a hypernetwork that makes expert embeddings, and per-layer heads.

Trainable sizes stay small (for SmolLM2-135M about 4M parameters, mostly MLP decoders); the frozen
model is never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertHypernetwork(nn.Module):
    """A bidirectional GRU over the 2L modules (attention, MLP per layer), batched over E experts.

    Its inputs are fixed random vectors (a buffer, not trained): everything the embeddings learn
    comes from the GRU weights, and the recurrence over depth lets expert e of one layer share
    information with expert e of the layers around it.
    """

    def __init__(self, num_layers: int, num_experts: int, input_dim: int = 32, hidden_dim: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("inputs", torch.randn(2 * num_layers, num_experts, input_dim, generator=generator))
        self.gru = nn.GRU(input_dim, hidden_dim, bidirectional=True)
        self.num_layers = num_layers

    @property
    def embedding_dim(self) -> int:
        return 2 * self.gru.hidden_size

    def forward(self) -> torch.Tensor:
        """Expert embeddings [L, 2, E, emb]: index 0 feeds a layer's attention head, 1 its MLP head."""
        output, _ = self.gru(self.inputs)
        return output.view(self.num_layers, 2, *output.shape[1:])


class Decoder(nn.Module):
    """Embedding -> mask logits: Linear(GELU(LayerNorm(embedding)))."""

    def __init__(self, embedding_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(embedding_dim)
        self.linear = nn.Linear(embedding_dim, out_dim, bias=False)

    def forward(self, embedding: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        # `rows` decodes only part of the output (the V logits of an attention head), so per-token
        # V masks do not pay for the Q/K rows they would throw away.
        return F.linear(F.gelu(self.norm(embedding)), self.linear.weight[rows])


class MLPHead(nn.Module):
    """Router (hidden -> E experts) and the decoder of expert embeddings into channel masks."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, embedding_dim: int):
        super().__init__()
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.decoder = Decoder(embedding_dim, intermediate_size)


class AttentionHead(nn.Module):
    """Per-token V logits (head_dim) from the token and the layer's mean expert embedding, and
    token-independent Q/K logits (head_dim / 2 rotate-half pairs) from the mean embedding alone."""

    def __init__(self, hidden_size: int, head_dim: int, embedding_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.router = nn.Linear(hidden_size, embedding_dim, bias=False)
        self.decoder = Decoder(embedding_dim, head_dim + head_dim // 2)

    def qk_pair_logits(self, mean_embedding: torch.Tensor) -> torch.Tensor:
        return self.decoder(mean_embedding, slice(self.head_dim, None))

    def v_logits(self, hidden: torch.Tensor, mean_embedding: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.router(hidden) + mean_embedding, slice(0, self.head_dim))


class ToMoEHeads(nn.Module):
    """Everything ToMoE trains: the hypernetwork and one attention and one MLP head per layer."""

    def __init__(self, geometry, num_experts: int, seed: int = 0):
        super().__init__()
        # nn.Linear and nn.GRU initialise from the global RNG, which no stage seeds: without this, two
        # runs with the same seed would start from different heads. fork_rng leaves the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hypernetwork = ExpertHypernetwork(geometry.num_layers, num_experts, seed=seed)
            emb = self.hypernetwork.embedding_dim
            self.attention = nn.ModuleList(AttentionHead(geometry.hidden_size, geometry.head_dim, emb) for _ in range(geometry.num_layers))
            self.mlp = nn.ModuleList(
                MLPHead(geometry.hidden_size, geometry.intermediate_size, num_experts, emb) for _ in range(geometry.num_layers)
            )
