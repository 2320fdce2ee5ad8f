"""Apply ToMoE's masks to a frozen Hugging Face model through hooks, with no forked modeling file.

Where each mask acts (one decoder layer; H query heads, H_kv key/value heads, head dim hd):
- Q and K projections' outputs: one static mask over hd shared by every q and k head (GQA-correct,
  because it is indexed by head dim only), built from hd/2 pair logits repeated as [m, m] so the
  rotate-half partners (j, j + hd/2) are kept or dropped together. RoPE only mixes those partners,
  so masking before RoPE equals masking after it, and the pruned dims can be sliced away later.
- V projection's output: a per-token mask over hd (per source token), shared by the H_kv heads.
- o_proj's input: the same per-token mask, applied per QUERY token and broadcast over all H heads.
  Decision (the official code masks only V in training but also o_proj's input at inference): we
  mask both in training and in the converted model, so train and inference agree and o_proj really
  needs only the kept columns of each token.
- down_proj's input (the SwiGLU product act(gate x) * up x): the per-token mask of the expert the
  router chose. Masking the product equals masking gate and up rows, since m * m = m.
The softmax scale is never touched: masked dims are zeros, so 1/sqrt(hd) stays the model's scale,
and the converted model keeps the same scale after slicing (see llmcarve.models.carved).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from llmcarve.methods.tomoe.distributed import SINGLE, Shard
from llmcarve.methods.tomoe.gumbel import (
    hard_sigmoid_mask,
    keep_at_least_one,
    straight_through_mask,
    straight_through_one_hot,
    uniform_noise,
)
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.models.adapters import Geometry, adapter_for


@dataclass
class LayerDecisions:
    """What the last forward pass decided in one layer; the losses read these."""

    qk_mask: torch.Tensor | None = None  # [hd], pairs repeated
    v_mask: torch.Tensor | None = None  # [B, T, hd]
    route: torch.Tensor | None = None  # [B, T, E] straight-through one-hot
    expert_logits: torch.Tensor | None = None  # [E, D_ff], decoded once per step
    expert_masks: torch.Tensor | None = None  # [E, D_ff], independently sampled for the budget and union losses
    token_mlp_mask: torch.Tensor | None = None  # [B, T, D_ff]


@dataclass
class TokenNoise:
    """One layer's uniform draws for a step's per-token decisions, in [B, T, ...]."""

    v: torch.Tensor  # [B, T, hd]: the V mask
    route: torch.Tensor  # [B, T, E]: the router's Gumbel noise
    channels: torch.Tensor  # [B, T, D_ff]: the chosen expert's channel mask


@dataclass
class MaskSettings:
    temperature: float = 0.4
    offset: float = 3.0
    v_topk: list[int] | None = field(default=None)  # deterministic per-layer cap on per-token V width


def cap_top_k(mask: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep at most k of the mask's ones per token: those with the largest logits."""
    if k >= mask.shape[-1]:
        return mask
    ranked = logits.masked_fill(mask == 0, float("-inf")).topk(k, dim=-1).indices
    capped = torch.zeros_like(mask).scatter_(-1, ranked, 1.0)
    return mask * capped


class ToMoEMasker:
    """Installs hooks on a frozen model; `step(generator)` samples this step's masks.

    generator=None is the deterministic mode: no noise, masks are (logit + offset > 0), routing is
    argmax. That is exactly the converted MoE model's behaviour.

    All of a step's noise is drawn in `step`, before the forward pass, in the order the hooks use
    it (per layer: V, route, channels), so the hooks are pure tensor code: a compiled model traces
    them into its graph (see trainer.py), and the draws equal those of drawing inside the hooks.
    """

    def __init__(self, model: nn.Module, heads: ToMoEHeads, settings: MaskSettings, shard: Shard = SINGLE):
        self.model, self.heads, self.settings = model, heads, settings
        self.shard = shard  # per-token noise is drawn for the whole batch and sliced to this process's rows
        self.adapter, self.geometry = adapter_for(model.config), Geometry.from_config(model.config)
        self.layers = [LayerDecisions() for _ in range(self.geometry.num_layers)]
        self.enabled = True
        self._noise: list[TokenNoise] | None = None
        self._embeddings: torch.Tensor | None = None
        self._handles: list = []

    # -- per step ------------------------------------------------------------------------------------
    def step(self, generator: torch.Generator | None, batch_shape: tuple[int, int] | None = None) -> None:
        """Decode this step's static masks (Q/K and the expert masks) from fresh embeddings, and draw
        the per-token noise for a batch of `batch_shape` ([B, T] of this process's rows)."""
        if generator is not None and batch_shape is None:
            raise ValueError("a noisy step needs the batch's shape [B, T] to draw the per-token noise")
        self._embeddings = self.heads.hypernetwork()
        settings = self.settings
        for index, decisions in enumerate(self.layers):
            attention_emb, mlp_emb = self._embeddings[index, 0].mean(0), self._embeddings[index, 1]
            pair_logits = self.heads.attention[index].qk_pair_logits(attention_emb)
            pairs = keep_at_least_one(hard_sigmoid_mask(pair_logits, settings.temperature, settings.offset, generator), pair_logits)
            decisions.qk_mask = torch.cat([pairs, pairs])
            decisions.expert_logits = self.heads.mlp[index].decoder(mlp_emb)
            decisions.expert_masks = keep_at_least_one(
                hard_sigmoid_mask(decisions.expert_logits, settings.temperature, settings.offset, generator),
                decisions.expert_logits,
            )
        self._noise = None if generator is None else [self._draw_token_noise(index, generator, batch_shape) for index in range(len(self.layers))]

    def _draw_token_noise(self, index: int, generator: torch.Generator, batch_shape) -> TokenNoise:
        device = self._embeddings.device

        def draw(width: int) -> torch.Tensor:
            return uniform_noise((*batch_shape, width), generator, device, torch.float32, self.shard)

        attention, mlp = self.heads.attention[index], self.heads.mlp[index]
        return TokenNoise(draw(attention.head_dim), draw(mlp.router.out_features), draw(mlp.decoder.linear.out_features))

    @contextmanager
    def disabled(self):
        """Run the unmasked teacher through the same hooked model."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    # -- hooks ---------------------------------------------------------------------------------------
    def attach(self) -> "ToMoEMasker":
        for index, layer in enumerate(self.adapter.layers(self.model)):
            attention, mlp = self.adapter.attention(layer), self.adapter.mlp(layer)
            self._handles += [
                attention.register_forward_pre_hook(self._attention_input(index), with_kwargs=True),
                attention.q_proj.register_forward_hook(self._qk_output(index)),
                attention.k_proj.register_forward_hook(self._qk_output(index)),
                attention.v_proj.register_forward_hook(self._v_output(index)),
                attention.o_proj.register_forward_pre_hook(self._o_input(index)),
                mlp.register_forward_pre_hook(self._mlp_input(index)),
                mlp.down_proj.register_forward_pre_hook(self._down_input(index)),
            ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _attention_input(self, index: int):
        def hook(_module, args, kwargs):
            if not self.enabled:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            head = self.heads.attention[index]
            logits = head.v_logits(hidden.float(), self._embeddings[index, 0].mean(0))
            noise = self._noise[index].v if self._noise else None
            mask = straight_through_mask(logits, noise, self.settings.temperature, self.settings.offset)
            if noise is None and self.settings.v_topk is not None:
                mask = cap_top_k(mask, logits, self.settings.v_topk[index])
            self.layers[index].v_mask = mask
            return None

        return hook

    def _per_head(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multiply a [..., heads * hd] activation by a [..., hd] mask shared by every head."""
        shape = output.shape
        return (output.view(*shape[:-1], -1, self.geometry.head_dim) * mask.unsqueeze(-2).to(output.dtype)).view(shape)

    def _qk_output(self, index: int):
        def hook(_module, _args, output):
            return self._per_head(output, self.layers[index].qk_mask) if self.enabled else None

        return hook

    def _v_output(self, index: int):
        def hook(_module, _args, output):
            return self._per_head(output, self.layers[index].v_mask) if self.enabled else None

        return hook

    def _o_input(self, index: int):
        def hook(_module, args):
            return (self._per_head(args[0], self.layers[index].v_mask),) if self.enabled else None

        return hook

    def _mlp_input(self, index: int):
        def hook(_module, args):
            if not self.enabled:
                return None
            decisions, head = self.layers[index], self.heads.mlp[index]
            noise = self._noise[index] if self._noise else None
            decisions.route = straight_through_one_hot(head.router(args[0].float()), noise and noise.route, self.settings.temperature)
            # The selected expert's logits, gathered through the one-hot so the router gets gradients;
            # the E x D_ff expert logits are decoded once per step (in `step`), not once per token.
            token_logits = decisions.route @ decisions.expert_logits
            token_mask = straight_through_mask(token_logits, noise and noise.channels, self.settings.temperature, self.settings.offset)
            decisions.token_mlp_mask = keep_at_least_one(token_mask, token_logits)
            return None

        return hook

    def _down_input(self, index: int):
        def hook(_module, args):
            if not self.enabled:
                return None
            return (args[0] * self.layers[index].token_mlp_mask.to(args[0].dtype),)

        return hook
