"""Parameter and FLOP accounting, measured on the model object itself.

`active_ratio` is the KEPT fraction of attention+MLP weights that one token uses, relative to the
dense model of the same geometry: embeddings, LM head and norms are excluded, as in ToMoE and ATP.
Carved model classes report their own per-token active counts through `active_attention_mlp_params`;
a plain dense model uses all of its projections.
"""

from __future__ import annotations

from torch import nn

from llmcarve.models.adapters import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Geometry, adapter_for


def unique_parameter_count(model: nn.Module) -> int:
    """All parameters, counting tied tensors (embedding == LM head) once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel()
    return total


def attention_mlp_weights(model: nn.Module) -> int:
    """Weights of the q/k/v/o and gate/up/down projections actually present in the model."""
    adapter = adapter_for(model.config)
    total = 0
    for layer in adapter.layers(model):
        for module, names in ((adapter.attention(layer), ATTENTION_PROJECTIONS), (adapter.mlp(layer), MLP_PROJECTIONS)):
            total += sum(getattr(module, name).weight.numel() for name in names)
    return total


def active_attention_mlp_weights(model: nn.Module) -> int:
    if hasattr(model, "active_attention_mlp_params"):
        return model.active_attention_mlp_params()
    return attention_mlp_weights(model)


def dense_attention_mlp_weights(geometry: Geometry) -> int:
    return geometry.num_layers * (geometry.attention_weights_per_layer + geometry.mlp_weights_per_layer)


def measured_active_ratio(model: nn.Module) -> float:
    """The fraction of the dense model's attention+MLP weights one token uses: what a model's `@p` states."""
    return active_attention_mlp_weights(model) / dense_attention_mlp_weights(Geometry.from_config(model.config))


def parameter_report(model: nn.Module, context_len: int) -> dict:
    geometry = Geometry.from_config(model.config)
    dense_attention_mlp = dense_attention_mlp_weights(geometry)
    active = active_attention_mlp_weights(model)
    total = unique_parameter_count(model)
    stored_attention_mlp = attention_mlp_weights(model)
    lm_head = model.get_output_embeddings().weight.numel()
    return {
        "params_total": total,
        "params_active": total - stored_attention_mlp + active,
        "attention_mlp_params_dense": dense_attention_mlp,
        "attention_mlp_params_active": active,
        "active_ratio": active / dense_attention_mlp,
        "flops_per_token": flops_per_token(active + lm_head, geometry, context_len),
        "flops_context_len": context_len,
    }


def flops_per_token(matmul_weights: int, geometry: Geometry, context_len: int) -> int:
    """Forward FLOPs per token averaged over a causal prefill of `context_len` tokens.

    2 FLOPs per weight for the projections and the LM head, plus attention scores (QK^T) and mixing
    (AV) at 2 FLOPs per multiply-add each, over an average causal context of (context_len + 1) / 2.
    """
    average_context = (context_len + 1) / 2
    attention = 2 * 2 * geometry.num_layers * geometry.num_heads * geometry.head_dim * average_context
    return int(2 * matmul_weights + attention)
