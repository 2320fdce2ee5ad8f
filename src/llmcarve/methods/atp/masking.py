"""Apply ATP's decisions to a (LoRA-wrapped) Hugging Face model through hooks.

Two forwards, as the method requires (see docs of the method: pitfall "two forwards"):
- FROZEN_BRANCH, for LoRA updates: y = m * (W0 x) + B A x. The decision masks only the frozen
  pretrained branch, so the LoRA rows of pruned structures keep acting and keep their gradients;
  the group lasso (lora.py) is what removes their contribution.
- PRUNED, for the generator's loss and for every evaluation: y = m * ((W0 + B A) x), the model as it
  will be after physical removal.

Masked outputs: q_proj and k_proj (head dims, pairs, shared by every head: GQA-correct), v_proj (V
dims, shared by every KV head) and gate_proj, up_proj (MLP channels; act(0) * 0 = 0). In the PRUNED
forward nothing reaches a pruned o_proj column or down_proj column: a zeroed V dim averages to zero
in every head's output, a zeroed channel's product is zero. So slicing them away changes nothing,
and the carved model computes exactly this forward. Q/K are masked before RoPE: RoPE only mixes the
partners j and j + hd/2, which are kept or dropped together.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from llmcarve.methods.atp.generator import LayerMasks
from llmcarve.models.adapters import Geometry, adapter_for


class Forward(Enum):
    FROZEN_BRANCH = "frozen-branch"  # LoRA updates: masks on W0 x only
    PRUNED = "pruned"  # generator loss and evaluation: masks on the whole projection
    DENSE = "dense"  # masks off


class ATPMasker:
    """Hooks on q/k/v/gate/up of every layer; `use(masks, forward)` sets what the next passes do."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter, self.geometry = adapter_for(model.config), Geometry.from_config(model.config)
        self.masks: list[LayerMasks] | None = None
        self.forward = Forward.DENSE
        self._handles: list = []

    def use(self, masks: list[LayerMasks] | None, forward: Forward) -> None:
        if forward is not Forward.DENSE and masks is None:
            raise ValueError(f"the {forward.value} forward needs masks")
        self.masks, self.forward = masks, forward

    def attach(self) -> "ATPMasker":
        for index, layer in enumerate(self.adapter.layers(self.model)):
            attention, mlp = self.adapter.attention(layer), self.adapter.mlp(layer)
            for projection, kind in (
                (attention.q_proj, "qk"),
                (attention.k_proj, "qk"),
                (attention.v_proj, "v"),
                (mlp.gate_proj, "mlp"),
                (mlp.up_proj, "mlp"),
            ):
                # A PEFT LoRA layer wraps the frozen nn.Linear as `base_layer`; without LoRA both
                # forwards are the same and both hooks sit on the projection itself.
                frozen = getattr(projection, "base_layer", projection)
                self._handles += [
                    projection.register_forward_hook(self._hook(index, kind, Forward.PRUNED)),
                    frozen.register_forward_hook(self._hook(index, kind, Forward.FROZEN_BRANCH)),
                ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int, kind: str, forward: Forward):
        def hook(_module, _args, output: torch.Tensor):
            if self.forward is not forward:
                return None
            mask = getattr(self.masks[index], kind).to(output.dtype)
            if kind == "mlp":
                return output * mask
            shape = output.shape  # [..., heads * hd]: one mask over hd shared by every head
            return (output.view(*shape[:-1], -1, self.geometry.head_dim) * mask).view(shape)

        return hook
