"""Dense reference statistics on calibration data, for the pruning stages and baselines.

For every layer we accumulate, over all calibration tokens, the squared activation of:
- each MLP intermediate channel (the SwiGLU product act(gate(x)) * up(x), i.e. down_proj's input),
- each Q, K and V head dimension, per head ([heads, head_dim]; Q/K before RoPE, as projected),
- each attention-output head dimension (o_proj's input, per head).
Sums of squares (not means) are stored with the token count, so statistics from several shards add up.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from llmcarve.models.adapters import Geometry, adapter_for


def _per_head_sq(output: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return output.float().pow(2).reshape(-1, heads, head_dim).sum(0)


def _register_hooks(model: nn.Module, sums: dict[str, torch.Tensor]) -> list:
    adapter, geometry = adapter_for(model.config), Geometry.from_config(model.config)
    heads, kv_heads, head_dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim

    def accumulate(key: str, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value

    handles = []
    for index, layer in enumerate(adapter.layers(model)):
        attention, mlp = adapter.attention(layer), adapter.mlp(layer)
        prefix = f"layers.{index}"
        for name, n_heads in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            handles.append(
                getattr(attention, name).register_forward_hook(
                    lambda _m, _i, out, key=f"{prefix}.attn.{name[0]}_sq", h=n_heads: accumulate(key, _per_head_sq(out, h, head_dim))
                )
            )
        handles.append(
            attention.o_proj.register_forward_pre_hook(
                lambda _m, args, key=f"{prefix}.attn.o_in_sq": accumulate(key, _per_head_sq(args[0], heads, head_dim))
            )
        )
        handles.append(
            mlp.down_proj.register_forward_pre_hook(
                lambda _m, args, key=f"{prefix}.mlp.intermediate_sq": accumulate(
                    key, args[0].float().pow(2).reshape(-1, args[0].shape[-1]).sum(0)
                )
            )
        )
    return handles


@torch.inference_mode()
def collect_channel_stats(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the dense model over `blocks` [n, seq] and return the summed squared activations."""
    sums: dict[str, torch.Tensor] = {}
    handles = _register_hooks(model, sums)
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(blocks), batch_size), desc="calibrate", unit="batch", disable=not progress):
            model(input_ids=blocks[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    stats = {key: value.cpu() for key, value in sums.items()}
    stats["tokens"] = torch.tensor(blocks.numel())
    return stats
