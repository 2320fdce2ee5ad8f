"""Greedy decoding of a CarvedForCausalLM with a static KV cache, one decode step a CUDA graph.

`generate` in transformers re-plans every step on the host (cache bookkeeping, masks, logits
processors) and launches each layer's kernels one by one: for a small model the GPU mostly waits.
Here every shape is fixed ahead (batch, cache length), the position lives on the device, and the MLPs
run through `moe_mlp` (no host syncs), so a whole step (all layers, the head, and the argmax that
becomes the next input) is captured once and replayed per token. `compile_layers` additionally
fuses each layer's small ops with torch.compile (one compile shared by all layers of a shape).

The step runs the carved model's own modules (projections, norms, rotary embedding, V masks), so it
computes the model's function; `tests/test_kernels.py` checks its logits against the model's forward.
Only full attention is supported (no sliding windows), and a prompt fills the cache from position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llmcarve.kernels.moe_mlp import FastMLP


def _attention(attention, x, cos, sin, mask, places, keys, values, prefill: bool) -> torch.Tensor:
    batch, length, _ = x.shape
    q = attention.q_proj(x).view(batch, length, attention.heads, attention.qk_dim).transpose(1, 2)
    k = attention.k_proj(x).view(batch, length, attention.kv_heads, attention.qk_dim).transpose(1, 2)
    v = attention.v_proj(x).view(batch, length, attention.kv_heads, attention.v_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos[..., attention.qk_index], sin[..., attention.qk_index])
    token_v_mask = attention.v_mask(x).unsqueeze(1) if attention.v_mask is not None else None
    if token_v_mask is not None:
        v = v * token_v_mask
    gqa = attention.heads != attention.kv_heads
    if prefill:  # the prompt attends to itself only: plain causal attention, then fill the cache
        keys[:, :, :length].copy_(k)
        values[:, :, :length].copy_(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attention.scaling, enable_gqa=gqa)
    else:
        keys.index_copy_(2, places, k)
        values.index_copy_(2, places, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=gqa)
    if token_v_mask is not None:
        out = out * token_v_mask
    return attention.o_proj(out.transpose(1, 2).reshape(batch, length, attention.heads * attention.v_dim))


def decoder_layer(layer, mlp, hidden, cos, sin, mask, places, keys, values, prefill: bool) -> torch.Tensor:
    """CarvedDecoderLayer.forward over the static cache (the MLP through `mlp`)."""
    hidden = hidden + _attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, mask, places, keys, values, prefill)
    return hidden + mlp(layer.post_attention_layernorm(hidden))


class StaticDecoder:
    """Static-shape greedy decoding for `batch` sequences of at most `max_length` tokens (prompt and
    continuation); `generate` checks the length, `prefill`/`step` leave it to the caller."""

    def __init__(self, model, batch: int, max_length: int, mlps: list[FastMLP] | None = None):
        """`mlps`: FastMLP wrappers of the model's MLPs to share between decoders (packed experts
        take memory and time to build); built here when not given."""
        config = model.config
        if any(window is not None for window in config.attention_windows):
            raise ValueError("StaticDecoder supports full attention only (this model has sliding windows)")
        self.model, self.batch, self.max_length = model, batch, max_length
        layers = model.model.layers
        self.mlps = mlps if mlps is not None else [FastMLP(layer.mlp) for layer in layers]
        weight = model.lm_head.weight
        kv_heads = config.num_key_value_heads
        self.keys = [weight.new_zeros(batch, kv_heads, max_length, layer.self_attn.qk_dim) for layer in layers]
        self.values = [weight.new_zeros(batch, kv_heads, max_length, layer.self_attn.v_dim) for layer in layers]
        self.key_place = torch.arange(max_length, device=weight.device)
        self.position = torch.zeros((), dtype=torch.long, device=weight.device)  # tokens in the cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)  # the step's input
        self.graph: torch.cuda.CUDAGraph | None = None
        self._layer = decoder_layer

    # -- one forward over new tokens at places position .. position + T - 1 ---------------------------
    def forward(self, ids: torch.Tensor, prefill: bool) -> torch.Tensor:
        """Logits [B, vocab] of the last new token; writes the new tokens' keys and values."""
        inner = self.model.model
        length = ids.shape[1]
        places = self.position + torch.arange(length, device=ids.device)
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, places[None])
        # each new token sees the cache up to itself; unwritten slots lie beyond every query's place
        mask = None if prefill else (self.key_place[None, :] <= places[:, None])[None, None]
        for layer, mlp, keys, values in zip(inner.layers, self.mlps, self.keys, self.values):
            hidden = self._layer(layer, mlp, hidden, cos, sin, mask, places, keys, values, prefill)
        return self.model.lm_head(inner.norm(hidden[:, -1:]))[:, 0]

    def compile_layers(self) -> None:
        """torch.compile the per-layer step (norms, rotary, V mask, residuals fused into fewer
        kernels). Regional: every layer of one shape reuses the same compiled code."""
        self._layer = torch.compile(decoder_layer, dynamic=False)

    # -- the public steps -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start over with prompts ids [B, T]; returns the last position's logits."""
        self.position.zero_()
        logits = self.forward(ids, prefill=True)
        self.position += ids.shape[1]
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence [B, 1]; returns its logits."""
        logits = self.forward(token, prefill=False)
        self.position += 1
        return logits

    def _greedy_step(self) -> None:
        logits = self.step(self.token)
        self.token.copy_(logits.argmax(-1, keepdim=True))

    @torch.inference_mode()
    def capture(self, warmup_prompt: torch.Tensor) -> None:
        """Capture the greedy step in a CUDA graph (warms up on a side stream first)."""
        self.prefill(warmup_prompt)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._greedy_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._greedy_step()

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation [B, new_tokens] of prompt [B, T] (replays the graph if captured)."""
        if prompt.shape[1] + new_tokens > self.max_length:
            raise ValueError(f"{prompt.shape[1]} + {new_tokens} tokens exceed the cache ({self.max_length})")
        self.token.copy_(self.prefill(prompt).argmax(-1, keepdim=True))
        produced = []
        for _ in range(new_tokens):
            produced.append(self.token.clone())
            if self.graph is not None:
                self.graph.replay()
            else:
                self._greedy_step()
        return torch.cat(produced, 1)
