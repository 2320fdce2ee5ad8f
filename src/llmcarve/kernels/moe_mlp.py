"""The ToMoE MLP (top-1 of E experts, each a subset of the kept channels) without host synchronisation.

Three algorithms, picked from the input's shape (so the choice itself costs no sync):

- one token (batch-1 decode): only the token's expert's weights are read, half the dense MLP's bytes.
  On CUDA two fused Triton launches (router + argmax + gate/up + SwiGLU, then down).
- masked union (2 to 2047 tokens; to 8191 for a narrow model): every kept channel is computed and
  the channels of a token's expert are kept (the mask fused into SwiGLU). With a few tokens the work
  is reading weights, and the tokens' experts together cover nearly every channel (random half-width
  experts: 1 - 0.5**k of them for k experts), so reading the union once beats reading k padded
  experts (k/2 times its bytes); up to ~1000 tokens the grouped GEMMs' ragged groups cost more still.
- grouped (2048 tokens and more; 8192 for a narrow model): tokens sorted by expert, two grouped
  GEMMs over experts whose weights are sliced once and padded to the widest expert, so the FLOPs are
  the half-width MLP's.

Routing is the reference's: logits through the router's own linear, then the first maximum, so the
same tokens go to the same experts as in `CarvedMLP` (the one-token kernel computes the router itself
and rounds its logits to the input dtype as the reference does; ties at rounding can still differ).

Nothing asks the host for expert counts (`bincount` would, and it breaks CUDA graph capture too):
the sorted order and the group offsets are computed on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Where the grouped path takes over from the masked union (see prefers_grouped).
GROUPED_MIN_TOKENS = 2048
GROUPED_MIN_HIDDEN = 1024
GROUPED_MIN_TOKENS_NARROW = 8192
GROUPED_MIN_TOKENS_CPU = 256
# Where the masked union computes the router inside its SwiGLU kernel (see masked_union).
ROUTED_SWIGLU_MAX_HIDDEN = 1024
ROUTED_SWIGLU_MAX_TOKENS = 256


@dataclass
class PackedExperts:
    """One MLP's experts, sliced once from the layer's weights.

    gate_up: [E, 2w, d] (expert e's gate rows, then its up rows, each padded with zero rows to w, the
    widest expert rounded up to 8 so grouped-GEMM strides stay 16-byte aligned); down: [E, d, w].
    Zero padding adds exactly nothing (silu(0) * 0 = 0, zero down columns). Both are kept K-major,
    the layout the grouped GEMM reads without a transposing copy. mask_u8: [E, W] the experts'
    channels over the kept width, as bytes for the fused masking kernel.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    width: int
    mask_u8: torch.Tensor
    expert_ids: torch.Tensor  # arange(E): the searchsorted queries for group ends

    @classmethod
    @torch.no_grad()
    def from_mlp(cls, mlp) -> "PackedExperts":
        gate_w, up_w, down_w, mask = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.expert_mask
        experts, hidden = mask.shape[0], gate_w.shape[1]
        width = -(-int(mask.sum(1).max()) // 8) * 8
        gate_up = gate_w.new_zeros(experts, 2 * width, hidden)
        down = down_w.new_zeros(experts, hidden, width)
        for e, channels in enumerate(mask):
            index = channels.nonzero().squeeze(1)
            gate_up[e, : len(index)] = gate_w[index]
            gate_up[e, width : width + len(index)] = up_w[index]
            down[e, :, : len(index)] = down_w[:, index]
        expert_ids = torch.arange(experts, device=mask.device)
        return cls(gate_up, down, width, mask.to(torch.uint8).contiguous(), expert_ids)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, expert: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up (times mask[expert] per token): one Triton pass on CUDA, torch elsewhere."""
    if gate.is_cuda:
        from llmcarve.kernels import triton_ops

        return triton_ops.silu_mul(gate, up, expert, mask)
    hidden = F.silu(gate) * up
    if mask is not None:
        hidden = hidden * mask[expert].to(hidden.dtype)
    return hidden


def route(x2d: torch.Tensor, router: torch.nn.Linear) -> torch.Tensor:
    """Top-1 expert per token, exactly as CarvedMLP.forward computes it."""
    return router(x2d).argmax(-1)


def route_sorted(logits: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(expert, dest, order, offsets): argmax of the logits [T, E], the tokens grouped by expert
    (`order`, ascending within a group), each token's place in that order (`dest`) and the groups'
    ends (int32 `offsets`, as torch._grouped_mm takes them). Two small Triton kernels on CUDA."""
    if logits.is_cuda:
        from llmcarve.kernels import triton_ops

        return triton_ops.route_sorted(logits)
    expert = logits.argmax(-1)
    return (expert, *sort_by_expert(expert, expert_ids))


def sort_by_expert(expert: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dest, order, offsets) of `route_sorted` for given experts [T], in torch ops (no host sync)."""
    sorted_expert, order = expert.sort(stable=True)
    offsets = torch.searchsorted(sorted_expert, expert_ids, right=True).to(torch.int32)
    dest = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return dest, order, offsets


def grouped_experts(x2d: torch.Tensor, router: torch.nn.Linear, packed: PackedExperts) -> torch.Tensor:
    """Each token through its own expert: two grouped GEMMs over tokens sorted by expert."""
    _, dest, order, offsets = route_sorted(router(x2d), packed.expert_ids)
    gate_up = torch._grouped_mm(x2d.index_select(0, order), packed.gate_up.transpose(1, 2), offs=offsets)
    width = packed.width
    hidden = silu_mul(gate_up[:, :width], gate_up[:, width:])
    out = torch._grouped_mm(hidden, packed.down.transpose(1, 2), offs=offsets)
    return out.index_select(0, dest)  # back to token order (a gather: faster than scattering)


def one_token(x2d: torch.Tensor, router: torch.nn.Linear, packed: PackedExperts) -> torch.Tensor:
    """One token: only its expert's weights are read (two fused Triton launches on CUDA)."""
    if x2d.is_cuda:
        from llmcarve.kernels import triton_ops

        return triton_ops.one_token_moe(x2d.contiguous(), router.weight, packed.gate_up, packed.down)
    expert = route(x2d, router)
    offsets = (packed.expert_ids >= expert).to(torch.int32)  # its group holds it; every later group is empty
    gate_up = torch._grouped_mm(x2d, packed.gate_up.transpose(1, 2), offs=offsets)
    hidden = silu_mul(gate_up[:, : packed.width], gate_up[:, packed.width :])
    return torch._grouped_mm(hidden, packed.down.transpose(1, 2), offs=offsets)


def masked_union(x2d: torch.Tensor, router: torch.nn.Linear, mlp, packed: PackedExperts) -> torch.Tensor:
    """Every kept channel for every token, then only the token's expert's channels (fused mask)."""
    gate, up = mlp.gate_proj(x2d), mlp.up_proj(x2d)
    tokens, hidden_size = x2d.shape
    if x2d.is_cuda and hidden_size <= ROUTED_SWIGLU_MAX_HIDDEN and tokens <= ROUTED_SWIGLU_MAX_TOKENS:
        # the router and argmax folded into the SwiGLU kernel: two launches fewer, which matters
        # where launches dominate (a narrow model, few tokens); every program recomputes its token's
        # router logits, which costs more than it saves at hidden 4096 (measured: 0.93x -> 0.87x)
        from llmcarve.kernels import triton_ops

        hidden = triton_ops.routed_silu_mul(gate, up, x2d, router.weight, packed.mask_u8)
    else:
        hidden = silu_mul(gate, up, route(x2d, router), packed.mask_u8)
    return mlp.down_proj(hidden)


def prefers_grouped(tokens: int, hidden: int, on_gpu: bool) -> bool:
    """Many tokens: the grouped GEMMs' saved FLOPs outweigh sorting, gathering and padding.
    Measured crossovers on an H100 (PERFORMANCE_NOTES.md): between 1024 and 2048 tokens at
    hidden 4096 (grouped 0.64x vs masked 0.98x of dense at 1024, 1.27x vs 1.01x at 2048); at
    8192 tokens at hidden 576 (1.06x both). On a CPU, where the arithmetic dominates sooner,
    from about 256 tokens (hidden 576: grouped 1.06x vs masked 0.89x of dense at 256)."""
    if not on_gpu:
        return tokens >= GROUPED_MIN_TOKENS_CPU
    if hidden >= GROUPED_MIN_HIDDEN:
        return tokens >= GROUPED_MIN_TOKENS
    return tokens >= GROUPED_MIN_TOKENS_NARROW


def moe_mlp(mlp, x: torch.Tensor, packed: PackedExperts) -> torch.Tensor:
    """CarvedMLP.forward for a layer with experts, without host syncs (CUDA-graph safe)."""
    x2d = x.reshape(-1, x.shape[-1])
    tokens, hidden = x2d.shape
    if tokens == 1:
        out = one_token(x2d, mlp.router, packed)
    elif prefers_grouped(tokens, hidden, x2d.is_cuda):
        out = grouped_experts(x2d, mlp.router, packed)
    else:
        out = masked_union(x2d, mlp.router, mlp, packed)
    return out.view_as(x)


class FastMLP(torch.nn.Module):
    """Wraps a CarvedMLP for inference: its own forward for a plain MLP, `moe_mlp` for experts.

    The packed expert weights are built once, at wrapping; rewrap after changing the layer's weights.
    """

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.packed = PackedExperts.from_mlp(mlp) if mlp.router is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.mlp(x)
        return moe_mlp(self.mlp, x, self.packed)
