"""One small adapter per supported model family.

An adapter tells the rest of llmcarve where a family keeps its decoder layers, attention and MLP
projections, and how many heads / KV heads / head dims it has. Pruning code only talks to adapters,
so adding a family (Phi, Gemma, ...) is one entry here, not a forked modeling file.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter; the message lists the supported ones."""


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    qkv_bias: bool  # Qwen2 has biases on q/k/v projections, Llama and Mistral have none
    description: str

    # Every supported family keeps its decoder stack at model.model.layers with SwiGLU MLPs and
    # self_attn.{q,k,v,o}_proj; the adapter is where a family that differs would say so.
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp


@dataclass(frozen=True)
class Geometry:
    """The shapes pruning decisions are made over, read from a config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "Geometry":
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
        )

    @property
    def attention_weights_per_layer(self) -> int:
        """q and o span all heads, k and v only the KV heads (GQA); biases are not counted."""
        return self.hidden_size * self.head_dim * 2 * (self.num_heads + self.num_kv_heads)

    @property
    def mlp_weights_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def layer_weights(self, qk_width, v_width, mlp_width):
        """Attention+MLP weights one token uses in one layer, for kept widths per head / channels.

        q: d*H*w_qk, k: d*H_kv*w_qk, v: d*H_kv*w_v, o: d*H*w_v, MLP: 3*d*w_mlp. The one home of this
        count: ToMoE's differentiable budget passes tensors, carved models pass their integers.
        """
        d = self.hidden_size
        return d * (self.num_heads + self.num_kv_heads) * (qk_width + v_width) + 3 * d * mlp_width


ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter("llama", qkv_bias=False, description="Llama 1/2/3, SmolLM2 (MHA and GQA)"),
    "mistral": FamilyAdapter("mistral", qkv_bias=False, description="Mistral (GQA, sliding window)"),
    "qwen2": FamilyAdapter("qwen2", qkv_bias=True, description="Qwen2 / Qwen2.5 (GQA, q/k/v biases)"),
    # Models carved by llmcarve keep the dense layout (model.layers[i].self_attn.q_proj, ...), so
    # loading and accounting read them like their base family. Whether they carry q/k/v biases is
    # their config's `attention_bias`, not a property of the family.
    "llmcarve": FamilyAdapter("llmcarve", qkv_bias=False, description="a model carved by llmcarve (any base family)"),
}


def adapter_for(config) -> FamilyAdapter:
    """The adapter for a transformers config, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = "; ".join(f"{name} ({a.description})" for name, a in ADAPTERS.items())
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported. Supported families: {supported}. "
            "Adding one is a new entry in llmcarve/models/adapters.py."
        )
    hidden_act = getattr(config, "hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise UnsupportedModelError(f"model_type '{model_type}' with hidden_act '{hidden_act}': only SwiGLU MLPs are supported")
    return ADAPTERS[model_type]
