"""Convert a dense model into a `CarvedForCausalLM` by copying the kept rows and columns.

Every carving method ends here: it decides, per layer, a `LayerPlan` (which head dims, V dims and
MLP channels to keep, and optionally experts and a dynamic V mask), and `carve` slices the frozen
dense weights accordingly. Nothing is retrained or rescaled, so the carved model computes exactly
what the dense model computes with the dropped channels zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcarve.models.adapters import FamilyAdapter, Geometry, adapter_for
from llmcarve.models.carved import CarvedConfig, CarvedForCausalLM

# What `LayerPlan.v_router` holds; the decoder may have head_dim rows (sliced at v_index here) or
# already only the len(v_index) kept rows. An optional "offset" (float) overrides the config's 3.0.
V_ROUTER_KEYS = ("router", "state", "norm_weight", "norm_bias", "decoder")


@dataclass
class LayerPlan:
    """What one decoder layer keeps. Index tensors are sorted and refer to the dense model."""

    qk_index: torch.LongTensor  # kept head dims for Q/K, rotate-half pairs (j, j + hd/2) together
    v_index: torch.LongTensor  # kept V head dims
    mlp_index: torch.LongTensor  # kept MLP channels (for MoE: the union of the experts' channels)
    expert_mask: torch.BoolTensor | None = None  # [E, len(mlp_index)]: the kept channels each expert uses
    router_weight: torch.Tensor | None = None  # [E, d]
    v_router: dict[str, torch.Tensor] | None = None  # the dynamic V mask's weights, see V_ROUTER_KEYS
    v_active: int | None = None  # the most V dims one token may use; None: all of v_index

    @classmethod
    def dense(cls, geometry: Geometry) -> "LayerPlan":
        """A plan that keeps everything (carving with it reproduces the dense model)."""
        return cls(torch.arange(geometry.head_dim), torch.arange(geometry.head_dim), torch.arange(geometry.intermediate_size))

    @property
    def num_experts(self) -> int:
        return 0 if self.router_weight is None else self.router_weight.shape[0]


def check_plan(plan: LayerPlan, geometry: Geometry, layer: int) -> None:
    """Refuse a plan the carved model could not represent, naming the layer and the problem."""

    def fail(problem: str):
        raise ValueError(f"layer {layer}: {problem}")

    half = geometry.head_dim // 2
    for name, index, size in (
        ("qk_index", plan.qk_index, geometry.head_dim),
        ("v_index", plan.v_index, geometry.head_dim),
        ("mlp_index", plan.mlp_index, geometry.intermediate_size),
    ):
        if index.ndim != 1 or len(index) == 0:
            fail(f"{name} must be a non-empty 1-D index")
        if not bool((index[1:] > index[:-1]).all()) or index[0] < 0 or index[-1] >= size:
            fail(f"{name} must be sorted, without repeats, within [0, {size})")
    low, high = plan.qk_index[plan.qk_index < half], plan.qk_index[plan.qk_index >= half]
    if not torch.equal(low + half, high):
        fail("qk_index must keep RoPE pairs (j, j + head_dim/2) together")
    if (plan.expert_mask is None) != (plan.router_weight is None):
        fail("expert_mask and router_weight come together")
    if plan.expert_mask is not None and plan.expert_mask.shape != (plan.num_experts, len(plan.mlp_index)):
        fail(f"expert_mask must be [experts, len(mlp_index)] = [{plan.num_experts}, {len(plan.mlp_index)}]")
    if plan.v_router is not None and not set(V_ROUTER_KEYS) <= set(plan.v_router):
        fail(f"v_router needs the keys {V_ROUTER_KEYS}")
    if plan.v_active is not None and not 0 < plan.v_active <= len(plan.v_index):
        fail(f"v_active must be within [1, len(v_index)={len(plan.v_index)}]")
    if plan.v_active not in (None, len(plan.v_index)) and plan.v_router is None:
        fail("only a dynamic V mask (v_router) can use fewer V dims than v_index keeps")


def carved_config(dense_config, plans: list[LayerPlan]) -> CarvedConfig:
    """The dense config's architecture plus each layer's kept widths."""
    adapter, geometry = adapter_for(dense_config), Geometry.from_config(dense_config)
    routers = [plan.v_router for plan in plans if plan.v_router is not None]
    return CarvedConfig(
        base_model_type=adapter.model_type,
        vocab_size=dense_config.vocab_size,
        hidden_size=geometry.hidden_size,
        intermediate_size=geometry.intermediate_size,
        num_hidden_layers=geometry.num_layers,
        num_attention_heads=geometry.num_heads,
        num_key_value_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        rope_parameters=dict(dense_config.rope_parameters),
        attention_bias=adapter.qkv_bias,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        pad_token_id=dense_config.pad_token_id,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        attention_windows=attention_windows(dense_config),
        qk_dims=[len(plan.qk_index) for plan in plans],
        v_dims=[len(plan.v_index) for plan in plans],
        v_active=[plan.v_active or len(plan.v_index) for plan in plans],
        v_router=[plan.v_router is not None for plan in plans],
        v_router_dim=_one_value("V router embedding size", [r["router"].shape[0] for r in routers], default=0),
        v_mask_offset=_one_value("V mask offset", [float(r["offset"]) for r in routers if "offset" in r], default=3.0),
        mlp_dims=[len(plan.mlp_index) for plan in plans],
        num_experts=[plan.num_experts for plan in plans],
    )


def attention_windows(dense_config) -> list[int | None]:
    """Each layer's sliding window (None: full causal attention)."""
    layers, window = dense_config.num_hidden_layers, getattr(dense_config, "sliding_window", None)
    if window is None:  # Llama, and Qwen2 without use_sliding_window
        return [None] * layers
    layer_types = getattr(dense_config, "layer_types", None)
    if layer_types is None:  # Mistral: every layer slides
        return [window] * layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def _one_value(what: str, values: list, default):
    if len(set(values)) > 1:
        raise ValueError(f"every layer must use the same {what}, got {sorted(set(values))}")
    return values[0] if values else default


def per_head_index(index: torch.Tensor, heads: int, head_dim: int) -> torch.LongTensor:
    """Flat row (or column) numbers of `index` taken in every head of a [heads * head_dim] axis."""
    return (torch.arange(heads)[:, None] * head_dim + index[None, :]).flatten()


@torch.no_grad()
def carved_state_dict(model: nn.Module, plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """The carved model's weights: the dense ones, sliced to the kept rows and columns."""
    adapter, geometry = adapter_for(model.config), Geometry.from_config(model.config)
    _refuse_unsupported_biases(model, adapter)
    state = {name: tensor for name, tensor in model.state_dict().items() if ".layers." not in name}
    for number, (layer, plan) in enumerate(zip(adapter.layers(model), plans)):
        prefix = f"model.layers.{number}"
        state[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight
        state[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        state |= _attention_weights(adapter.attention(layer), plan, geometry, f"{prefix}.self_attn")
        state |= _mlp_weights(adapter.mlp(layer), plan, f"{prefix}.mlp")
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def _attention_weights(attention: nn.Module, plan: LayerPlan, geometry: Geometry, prefix: str) -> dict[str, torch.Tensor]:
    heads, kv_heads, head_dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    rows = {
        "q_proj": per_head_index(plan.qk_index, heads, head_dim),
        "k_proj": per_head_index(plan.qk_index, kv_heads, head_dim),
        "v_proj": per_head_index(plan.v_index, kv_heads, head_dim),
    }
    state = {f"{prefix}.qk_index": plan.qk_index.long()}
    for name, index in rows.items():
        projection = getattr(attention, name)
        state[f"{prefix}.{name}.weight"] = projection.weight[index]
        if projection.bias is not None:
            state[f"{prefix}.{name}.bias"] = projection.bias[index]
    # o_proj's input is per QUERY head: head h reads kv head h // groups, whose kept V dims are the
    # same v_index, so the columns are v_index in each of the H query heads.
    state[f"{prefix}.o_proj.weight"] = attention.o_proj.weight[:, per_head_index(plan.v_index, heads, head_dim)]
    if plan.v_router is not None:
        state |= _v_mask_weights(plan, head_dim, f"{prefix}.v_mask")
    return state


def _v_mask_weights(plan: LayerPlan, head_dim: int, prefix: str) -> dict[str, torch.Tensor]:
    router = plan.v_router
    decoder = router["decoder"][plan.v_index] if router["decoder"].shape[0] == head_dim else router["decoder"]
    return {
        f"{prefix}.router.weight": router["router"],
        f"{prefix}.state": router["state"],
        f"{prefix}.norm.weight": router["norm_weight"],
        f"{prefix}.norm.bias": router["norm_bias"],
        f"{prefix}.decoder.weight": decoder,
    }


def _mlp_weights(mlp: nn.Module, plan: LayerPlan, prefix: str) -> dict[str, torch.Tensor]:
    state = {
        f"{prefix}.gate_proj.weight": mlp.gate_proj.weight[plan.mlp_index],
        f"{prefix}.up_proj.weight": mlp.up_proj.weight[plan.mlp_index],
        f"{prefix}.down_proj.weight": mlp.down_proj.weight[:, plan.mlp_index],
    }
    if plan.router_weight is not None:
        state[f"{prefix}.router.weight"] = plan.router_weight
        state[f"{prefix}.expert_mask"] = plan.expert_mask.bool()
    return state


def _refuse_unsupported_biases(model: nn.Module, adapter: FamilyAdapter) -> None:
    allowed = ("q_proj", "k_proj", "v_proj") if adapter.qkv_bias else ()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None and name.rsplit(".", 1)[-1] not in allowed:
            raise ValueError(f"{name} has a bias; carving supports only Qwen2's q/k/v biases")


def carve(model: nn.Module, plans: list[LayerPlan]) -> CarvedForCausalLM:
    """A new carved model holding copies of the kept dense weights (the dense model is untouched)."""
    if isinstance(model, CarvedForCausalLM):
        raise ValueError("carve takes a dense model; carving a carved model again is not supported")
    geometry = Geometry.from_config(model.config)
    if len(plans) != geometry.num_layers:
        raise ValueError(f"one plan per layer: got {len(plans)} plans for {geometry.num_layers} layers")
    for number, plan in enumerate(plans):
        check_plan(plan, geometry, number)
    parameter = next(model.parameters())
    carved = CarvedForCausalLM(carved_config(model.config, plans)).to(dtype=parameter.dtype, device=parameter.device)
    # strict: every carved weight must come from the dense model or the plan, none left random.
    carved.load_state_dict(carved_state_dict(model, plans), strict=True)
    return carved.eval()
