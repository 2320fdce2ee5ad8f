"""The carved model: one Hugging Face model class for every carving method.

A carved model is a dense Llama / Qwen2 / Mistral decoder whose projections keep only some of their
rows and columns, with per-layer shapes stored in config.json and in the weights:

- Q/K keep `qk_dims[i]` dims of every head (one index list, `qk_index`, shared by all q and k heads).
  The list keeps RoPE's rotate-half partners (j, j + hd/2) together and is sorted, so its first half
  holds the j < hd/2 and its second half their partners: `rotate_half` on the carved vector pairs the
  right elements, and RoPE's cos/sin are just gathered at `qk_index`.
- V keeps `v_dims[i]` dims of every head (v_proj rows, o_proj input columns), optionally gated per
  token by a small learned mask (ToMoE's dynamic V).
- The SwiGLU MLP keeps `mlp_dims[i]` channels, optionally split into top-1 routed experts (ToMoE)
  that each use a subset of them.

`import llmcarve` registers the classes with the Auto classes, so a saved carved model loads with
`AutoModelForCausalLM.from_pretrained(dir)` and no remote code. Converting a dense model into one
is `llmcarve.models.carve.carve`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
# Llama, Qwen2 and Mistral share these (their RMSNorm and rotary classes are copies of Llama's), so
# one carved class serves all three families.
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmcarve.kernels import moe_mlp as moe_kernels
from llmcarve.models.adapters import Geometry

# How a carved MoE MLP runs (`config.moe_impl`; the same logits from each, tested):
# - "auto": llmcarve.kernels.moe_mlp, its algorithm picked by the number of tokens (one token reads
#   only its expert; a few compute the kept channels with the expert mask fused; many run two grouped
#   GEMMs over tokens sorted by expert). No host synchronisation. The kernels have no backward: with
#   autograd on, "auto" trains through "masked" (see CarvedMLP.forward for why not "grouped").
# - "grouped": always the kernels' grouped GEMMs; with autograd on, the same two grouped GEMMs over
#   expert weights gathered afresh from the live weights, so gradients reach them. No host sync in
#   bfloat16 (torch's float32 grouped GEMM on CUDA reads the group sizes back: one sync a call).
# - "sorted": tokens grouped by expert, one pair of matmuls per expert over pre-sliced weights (a
#   Python loop over experts that reads the token counts on the host: slow, kept for comparison).
# - "masked": the reference: every kept channel computed, then the token's expert's channels kept.
#   No host sync either: the dense-matmul way to train (FLOPs of the whole kept width).
MOE_IMPLEMENTATIONS = ("auto", "grouped", "sorted", "masked")


class CarvedConfig(PreTrainedConfig):
    """The base model's architecture fields, plus one list entry per layer for what was kept.

    The architecture fields carry the same names as in Llama/Qwen2/Mistral configs, so code that
    reads a config's geometry (`Geometry.from_config`) sees the ORIGINAL dense shapes; `head_dim`
    in particular stays the original head dim, which fixes RoPE's frequencies and the softmax scale.
    Per-layer lists left as None mean "nothing carved" (a dense-equivalent model).
    """

    model_type = "llmcarve"

    base_model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj and the MLP never have one
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True
    # Sliding-window attention per layer (Mistral, some Qwen2 layers); None attends to all earlier
    # tokens. Deliberately not called `sliding_window`: transformers would then build a cache that
    # drops old keys, which the full-length masks here do not expect.
    attention_windows: list[int | None] | None = None

    qk_dims: list[int] | None = None
    v_dims: list[int] | None = None
    v_active: list[int] | None = None  # the most V dims one token can use (< v_dims with a router)
    v_router: list[bool] | None = None
    v_router_dim: int = 0  # embedding size of the dynamic V masks (0: none in the model)
    v_mask_offset: float = 3.0
    mlp_dims: list[int] | None = None
    num_experts: list[int] | None = None  # 0: a plain MLP
    moe_impl: str = "auto"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        layers = self.num_hidden_layers
        self.attention_windows = self.attention_windows or [None] * layers
        self.qk_dims = self.qk_dims or [self.head_dim] * layers
        self.v_dims = self.v_dims or [self.head_dim] * layers
        self.v_active = self.v_active or list(self.v_dims)
        self.v_router = self.v_router or [False] * layers
        self.mlp_dims = self.mlp_dims or [self.intermediate_size] * layers
        self.num_experts = self.num_experts or [0] * layers
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        per_layer = ("attention_windows", "qk_dims", "v_dims", "v_active", "v_router", "mlp_dims", "num_experts")
        wrong = [name for name in per_layer if len(getattr(self, name)) != self.num_hidden_layers]
        if wrong:
            raise ValueError(f"{wrong} must have one entry per layer ({self.num_hidden_layers})")
        if any(dims % 2 for dims in self.qk_dims):
            raise ValueError(f"qk_dims must be even (RoPE pairs are kept together), got {self.qk_dims}")
        if any(router for router in self.v_router) and self.v_router_dim < 1:
            raise ValueError("layers with a V router need v_router_dim > 0")
        if self.moe_impl not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLEMENTATIONS}, got '{self.moe_impl}'")


# ------------------------------------------------------------------------------------------------
# Attention


class DynamicVMask(nn.Module):
    """ToMoE's per-token V mask: (decoder(gelu(norm(router(x) + state))) + offset > 0).

    At most `max_width` dims stay on per token (those with the largest logits), so `v_active`,
    which the parameter accounting reports, is a guarantee rather than an estimate.
    """

    def __init__(self, hidden_size: int, embedding_dim: int, width: int, max_width: int, offset: float):
        super().__init__()
        self.router = nn.Linear(hidden_size, embedding_dim, bias=False)
        self.state = nn.Parameter(torch.zeros(embedding_dim))
        self.norm = nn.LayerNorm(embedding_dim)
        self.decoder = nn.Linear(embedding_dim, width, bias=False)
        self.max_width, self.offset = max_width, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask [B, T, width] in x's dtype."""
        logits = self.decoder(F.gelu(self.norm(self.router(x) + self.state))) + self.offset
        mask = logits > 0
        if self.max_width < mask.shape[-1]:
            strongest = logits.topk(self.max_width, dim=-1).indices
            mask &= torch.zeros_like(mask).scatter_(-1, strongest, True)
        return mask.to(x.dtype)


class CarvedAttention(nn.Module):
    def __init__(self, config: CarvedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.heads, self.kv_heads = heads, kv_heads
        self.qk_dim, self.v_dim = config.qk_dims[layer_idx], config.v_dims[layer_idx]
        # Pruned Q/K dims contribute zero to every q.k product, so the carved scores equal the dense
        # model's masked scores only with the dense model's scale: 1/sqrt(ORIGINAL head dim).
        self.scaling = config.head_dim**-0.5
        self.q_proj = nn.Linear(d, heads * self.qk_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, kv_heads * self.qk_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, kv_heads * self.v_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * self.v_dim, d, bias=False)
        half = self.qk_dim // 2
        self.register_buffer("qk_index", torch.cat([torch.arange(half), torch.arange(half) + config.head_dim // 2]))
        self.v_mask = (
            DynamicVMask(d, config.v_router_dim, self.v_dim, config.v_active[layer_idx], config.v_mask_offset)
            if config.v_router[layer_idx]
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.v_dim).transpose(1, 2)
        cos, sin = rope  # computed at the full head dim: take the kept dims' frequencies
        q, k = apply_rotary_pos_emb(q, k, cos[..., self.qk_index], sin[..., self.qk_index])

        token_v_mask = self.v_mask(x).unsqueeze(1) if self.v_mask is not None else None  # [B, 1, T, v]
        if token_v_mask is not None:
            v = v * token_v_mask  # as a source token, over every kv head
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            is_causal=attention_mask is None,
            scale=self.scaling,
            enable_gqa=self.heads != self.kv_heads,
        )
        if token_v_mask is not None:
            # as a query token, over ALL query heads: each head's output only uses this token's dims
            out = out * token_v_mask
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.v_dim))


def attention_mask_for(
    padding_mask: torch.Tensor | None, query_length: int, past_length: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, T, S] mask of the keys each query may see; None when plain causal works.

    Keys are indexed by their place in the cache (0 .. past + T - 1), like `padding_mask` [B, S].
    """
    key_length = past_length + query_length
    unpadded = padding_mask is None or bool(padding_mask.all())
    if unpadded and past_length == 0 and (window is None or window >= query_length):
        return None  # SDPA's is_causal
    query_place = torch.arange(past_length, key_length, device=device)[:, None]
    key_place = torch.arange(key_length, device=device)[None, :]
    allowed = key_place <= query_place
    if window is not None:
        allowed &= query_place - key_place < window
    allowed = allowed[None, None]
    if not unpadded:
        allowed = allowed & padding_mask[:, None, None, :].bool()
        # A padding query (left padding) sees no key at all: a plain softmax (and some SDPA kernels)
        # turns that row into NaN, which the next layer would spread to real tokens through V
        # (0 * NaN). Letting every query see itself keeps its ignored output finite.
        allowed = allowed | (key_place == query_place)
    return allowed


# ------------------------------------------------------------------------------------------------
# MLP


class CarvedMLP(nn.Module):
    """SwiGLU over the kept channels; with experts, each token uses only its expert's channels."""

    def __init__(self, config: CarvedConfig, layer_idx: int):
        super().__init__()
        d, width, experts = config.hidden_size, config.mlp_dims[layer_idx], config.num_experts[layer_idx]
        self.gate_proj = nn.Linear(d, width, bias=False)
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.config = config  # read at call time, so `config.moe_impl` can be switched on a live model
        self.router = nn.Linear(d, experts, bias=False) if experts else None
        if experts:
            self.register_buffer("expert_mask", torch.ones(experts, width, dtype=torch.bool))
        self._expert_weights_cache: tuple[tuple, list] | None = None
        self._packed_cache: tuple[tuple, moe_kernels.PackedExperts] | None = None
        self._channels_cache: tuple[tuple, tuple] | None = None

    @property
    def active_width(self) -> int:
        """The most channels one token uses: the widest expert, or every kept channel."""
        if self.router is None:
            return self.down_proj.in_features
        return int(self.expert_mask.sum(1).max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        implementation = self.config.moe_impl
        if implementation in ("auto", "grouped") and not torch.is_grad_enabled():
            # The kernels route by themselves (the same argmax) and have no backward: inference only.
            if implementation == "grouped":
                flat = x.reshape(-1, x.shape[-1])
                return moe_kernels.grouped_experts(flat, self.router, self._packed_experts()).view_as(x)
            return moe_kernels.moe_mlp(self, x, self._packed_experts())
        logits = self.router(x)
        expert = logits.argmax(-1)  # what `route` returns, from the logits the gate below needs too
        if implementation in ("auto", "masked"):
            # "auto" trains through the masked union: one dense matmul per projection at the kept
            # width. The grouped GEMMs halve those FLOPs but gather each expert's weights afresh on
            # every step (E experts of half the width: 4x the kept weights for 8 experts, and as
            # much again for their gradients); they measured slower in whole training steps on a
            # GPU and per layer on the CPU (bench/recovery_step.py --moe-impls auto grouped).
            out = self._masked_experts(x, expert)
        elif implementation == "sorted":
            out = self._sorted_experts(x, expert)
        else:
            out = self._grouped_experts(x, expert)
        if self.training and torch.is_grad_enabled():
            # a factor of exactly 1 that carries the router's gradient; left out of eval-mode graphs
            # (ONNX export traces with autograd on), where it would only add operators
            out = out * straight_through_gate(logits, expert).to(out.dtype)
        return out

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's expert: deterministic top-1, the argmax of the router's logits (no Gumbel noise
        at inference). The kernels compute the same argmax in their own way (llmcarve.kernels.moe_mlp)."""
        return self.router(x).argmax(-1)

    def _masked_experts(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """The reference: compute every kept channel, then zero those the token's expert lacks."""
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden * self.expert_mask[expert].to(hidden.dtype))

    def _sorted_experts(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Group tokens by expert and run each group through its expert's own channels only."""
        flat, flat_expert = x.reshape(-1, x.shape[-1]), expert.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.bincount(flat_expert, minlength=self.router.out_features).tolist()
        # in the experts' output dtype: under autocast that is the autocast dtype, not x's
        out = flat.new_zeros(flat.shape, dtype=_compute_dtype(x, self.gate_proj.weight))
        start = 0
        for (gate_up, down), count in zip(self._expert_weights(), counts):
            if count:
                tokens = order[start : start + count]
                gate, up = F.linear(flat[tokens], gate_up).chunk(2, dim=-1)
                out[tokens] = F.linear(self.act_fn(gate) * up, down)
                start += count
        return out.view_as(x)

    def _grouped_experts(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Two grouped GEMMs over the tokens sorted by expert, each expert at its own (padded) width:
        the FLOPs of one expert per token, with no host sync and no loop over experts.

        The expert weights are gathered from the live weights on every call (autograd carries the
        gradients back through the gather). A padded slot gathers an arbitrary kept channel for gate
        and up but a zeroed down column, so it adds exactly 0 to the output and gets no gradient.
        """
        flat = x.reshape(-1, x.shape[-1])
        channels, valid, expert_ids = self._padded_expert_channels()
        experts, width = channels.shape
        hidden_size, flat_channels = flat.shape[-1], channels.reshape(-1)
        dtype = _compute_dtype(x, self.gate_proj.weight)
        gate_up = torch.cat(  # [E, 2w, d]: K-major, as the grouped GEMM reads it without a copy
            [self.gate_proj.weight.index_select(0, flat_channels).view(experts, width, hidden_size),
             self.up_proj.weight.index_select(0, flat_channels).view(experts, width, hidden_size)],
            dim=1,
        ).to(dtype)
        down = (self.down_proj.weight.index_select(1, flat_channels) * valid.reshape(-1))  # [d, E * w]
        down = down.view(hidden_size, experts, width).transpose(0, 1).contiguous().to(dtype)  # [E, d, w]
        dest, order, offsets = moe_kernels.sort_by_expert(expert.reshape(-1), expert_ids)
        gate_up_out = torch._grouped_mm(flat.index_select(0, order).to(dtype), gate_up.transpose(1, 2), offs=offsets)
        hidden = self.act_fn(gate_up_out[:, :width]) * gate_up_out[:, width:]
        out = torch._grouped_mm(hidden, down.transpose(1, 2), offs=offsets)
        return out.index_select(0, dest).view(*x.shape[:-1], hidden_size)  # back to token order

    def _padded_expert_channels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(channels [E, w], valid [E, w], arange(E)): each expert's kept-channel indices, ascending,
        padded to w (the widest expert rounded up to 8, for the grouped GEMM's 16-byte strides).

        Reading the widest expert's size is one host sync, so the result is cached, keyed on the
        mask's storage state like the other caches: the training steps themselves read nothing back.
        """
        key = _storage_state(self.expert_mask)
        if self._channels_cache is None or self._channels_cache[0] != key:
            mask = self.expert_mask
            counts = mask.sum(1)
            width = -(-int(counts.max()) // 8) * 8
            # a stable sort of "not in the expert" puts the expert's channels first, in order
            channels = (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
            channels = F.pad(channels, (0, width - channels.shape[1]))  # a width rounded past the kept one
            valid = torch.arange(width, device=mask.device) < counts[:, None]
            expert_ids = torch.arange(mask.shape[0], device=mask.device)
            self._channels_cache = (key, (channels, valid, expert_ids))
        return self._channels_cache[1]

    def _packed_experts(self) -> moe_kernels.PackedExperts:
        """The experts padded and stacked for the kernels, built once and rebuilt (like the slices of
        `_expert_weights`) when the weights are moved, cast or changed in place."""
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.expert_mask)
        key = tuple(_storage_state(w) for w in weights)
        if self._packed_cache is None or self._packed_cache[0] != key:
            self._packed_cache = (key, moe_kernels.PackedExperts.from_mlp(self))
        return self._packed_cache[1]

    def _expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert: gate and up rows stacked [2 * width_e, d] (one matmul) and down columns [d, width_e].

        Sliced once and cached (never saved). The cache is keyed on the weights' storage and version
        counter, so moving, casting or updating the weights in place rebuilds it. While autograd is
        on, the slices are taken afresh so gradients reach the live weights (and inputs).
        """
        if torch.is_grad_enabled():
            return self._slice_expert_weights()
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.expert_mask)
        key = tuple(_storage_state(w) for w in weights)
        if self._expert_weights_cache is None or self._expert_weights_cache[0] != key:
            self._expert_weights_cache = (key, self._slice_expert_weights())
        return self._expert_weights_cache[1]

    def _slice_expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sliced = []
        for channels in self.expert_mask:
            index = channels.nonzero().squeeze(1)
            gate_up = torch.cat([self.gate_proj.weight[index], self.up_proj.weight[index]])
            sliced.append((gate_up, self.down_proj.weight[:, index]))
        return sliced


def straight_through_gate(logits: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass (p - p is 0 for any finite p), so training computes what
    inference computes; in the backward pass, the gradient of the chosen expert's softmax
    probability (straight-through, as ToMoE trains its routers, here without noise or temperature),
    so the router, which an argmax alone leaves without gradient, trains with the rest. [..., 1],
    float32."""
    chosen = logits.float().softmax(-1).gather(-1, expert.unsqueeze(-1))
    return 1 + (chosen - chosen.detach())


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) returns: the autocast dtype where autocast is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _storage_state(tensor: torch.Tensor) -> tuple:
    """What changes when a tensor is moved, cast or modified in place (its version counter; tensors
    made under torch.inference_mode have none, and can only change inside it)."""
    version = None if tensor.is_inference() else tensor._version
    return tensor.data_ptr(), version, tensor.dtype, tensor.device


# ------------------------------------------------------------------------------------------------
# Decoder


class CarvedDecoderLayer(nn.Module):
    def __init__(self, config: CarvedConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = CarvedAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = CarvedMLP(config, layer_idx)

    def forward(self, hidden: torch.Tensor, rope, attention_mask, cache) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, attention_mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class CarvedPreTrainedModel(PreTrainedModel):
    config_class = CarvedConfig
    base_model_prefix = "model"
    _no_split_modules = ["CarvedDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DynamicVMask):
            torch.nn.init.zeros_(module.state)


class CarvedModel(CarvedPreTrainedModel):
    def __init__(self, config: CarvedConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(CarvedDecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=hidden.device)[None]
        rope = self.rotary_emb(hidden, position_ids)
        masks = {
            window: attention_mask_for(attention_mask, length, past_length, window, hidden.device)
            for window in set(self.config.attention_windows)
        }
        for layer, window in zip(self.layers, self.config.attention_windows):
            hidden = layer(hidden, rope, masks[window], past_key_values)
        return self.norm(hidden), past_key_values


class CarvedForCausalLM(CarvedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CarvedConfig):
        super().__init__(config)
        self.model = CarvedModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def active_attention_mlp_params(self) -> int:
        """Attention+MLP weights one token uses (GQA-aware; biases, routers and V masks excluded).

        Per layer: q and o span H heads, k and v the H_kv KV heads; V counts the widest mask a token
        can get (`v_active`) and the MLP the widest expert, so every token fits within the count.
        """
        geometry, config = Geometry.from_config(self.config), self.config
        return sum(
            geometry.layer_weights(qk, v, layer.mlp.active_width)
            for layer, qk, v in zip(self.model.layers, config.qk_dims, config.v_active)
        )


def _register() -> None:
    AutoConfig.register(CarvedConfig.model_type, CarvedConfig)
    AutoModelForCausalLM.register(CarvedConfig, CarvedForCausalLM)


_register()
