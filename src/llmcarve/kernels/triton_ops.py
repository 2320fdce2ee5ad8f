"""Triton kernels for the MoE MLP's elementwise step (CUDA only; callers fall back to torch elsewhere).

SwiGLU's `silu(gate) * up` and the masked path's per-token expert mask are one pass over the
activations here instead of two or three torch kernels, and they read gate and up through strides,
so the grouped path can hand in the two halves of one [T, 2w] GEMM output without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, expert_ptr, mask_ptr,
    width, gate_stride, up_stride, out_stride, mask_stride,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=inside, other=0.0).to(tl.float32)
    hidden = gate * tl.sigmoid(gate) * up
    if HAS_MASK:
        expert = tl.load(expert_ptr + row).to(tl.int64)
        keep = tl.load(mask_ptr + expert * mask_stride + cols, mask=inside, other=0)
        hidden = tl.where(keep != 0, hidden, 0.0)
    tl.store(out_ptr + row * out_stride + cols, hidden.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _routed_silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, x_ptr, router_ptr, mask_ptr,
    width, d, experts, gate_stride, up_stride, out_stride, x_stride, mask_stride,
    BLOCK: tl.constexpr, BK: tl.constexpr, E_PAD: tl.constexpr,
):
    """The masked union's SwiGLU with the router folded in: each program recomputes its token's
    router logits (E x d multiply-adds, next to nothing) instead of two extra launches."""
    row = tl.program_id(0).to(tl.int64)
    cols_e = tl.arange(0, E_PAD)
    logits = tl.zeros([E_PAD], dtype=tl.float32)
    for k0 in range(0, d, BK):
        ks = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + row * x_stride + ks, mask=ks < d, other=0.0).to(tl.float32)
        r = tl.load(router_ptr + cols_e[:, None] * d + ks[None, :], mask=(cols_e[:, None] < experts) & (ks[None, :] < d), other=0.0)
        logits += tl.sum(r.to(tl.float32) * xk[None, :], axis=1)
    logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's logits are rounded
    expert = tl.argmax(tl.where(cols_e < experts, logits, float("-inf")), axis=0, tie_break_left=True)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=inside, other=0.0).to(tl.float32)
    keep = tl.load(mask_ptr + expert.to(tl.int64) * mask_stride + cols, mask=inside, other=0)
    hidden = tl.where(keep != 0, gate * tl.sigmoid(gate) * up, 0.0)
    tl.store(out_ptr + row * out_stride + cols, hidden.to(out_ptr.dtype.element_ty), mask=inside)


def routed_silu_mul(gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, router_weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * mask[argmax(router(x))] per token, the router computed in the kernel."""
    rows, width = gate.shape
    experts, d = router_weight.shape
    assert gate.stride(1) == 1 and up.stride(1) == 1 and x.stride(1) == 1 and router_weight.is_contiguous()
    out = torch.empty(rows, width, dtype=gate.dtype, device=gate.device)
    if rows == 0:
        return out
    _routed_silu_mul_kernel[(rows, triton.cdiv(width, BLOCK))](
        gate, up, out, x, router_weight, mask, width, d, experts,
        gate.stride(0), up.stride(0), out.stride(0), x.stride(0), mask.stride(0),
        BLOCK=BLOCK, BK=256, E_PAD=triton.next_power_of_2(experts),
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor, expert: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up over [T, w] views (unit column stride), times mask[expert[t]] when given."""
    rows, width = gate.shape
    assert gate.stride(1) == 1 and up.stride(1) == 1 and up.shape == gate.shape
    out = torch.empty(rows, width, dtype=gate.dtype, device=gate.device)
    if rows == 0:
        return out
    has_mask = mask is not None
    grid = (rows, triton.cdiv(width, BLOCK))
    _silu_mul_kernel[grid](
        gate, up, out,
        expert if has_mask else gate, mask if has_mask else gate,
        width, gate.stride(0), up.stride(0), out.stride(0), mask.stride(0) if has_mask else 0,
        HAS_MASK=has_mask, BLOCK=BLOCK,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Routing for the grouped path: argmax over the router's logits, then each token's place in the
# expert-sorted order, in two parallel passes (per-chunk expert counts, then places). This replaces
# a device sort (radix passes over int64 keys), `searchsorted` and a scatter to undo the sort.

ROUTE_BLOCK = 1024


@triton.jit
def _route_count_kernel(logits_ptr, expert_ptr, counts_ptr, tokens, experts, logit_stride,
                        BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    rows = chunk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, E_PAD)
    inside = rows < tokens
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * logit_stride + cols[None, :],
                     mask=inside[:, None] & (cols[None, :] < experts), other=float("-inf")).to(tl.float32)
    expert = tl.argmax(logits, axis=1, tie_break_left=True)  # the first maximum, as torch.argmax
    tl.store(expert_ptr + rows, expert.to(tl.int64), mask=inside)
    onehot = ((expert[:, None] == cols[None, :]) & inside[:, None]).to(tl.int32)
    tl.store(counts_ptr + chunk * E_PAD + cols, tl.sum(onehot, axis=0))


@triton.jit
def _route_place_kernel(expert_ptr, counts_ptr, dest_ptr, order_ptr, offsets_ptr, tokens, experts, chunks,
                        BLOCK: tl.constexpr, E_PAD: tl.constexpr, C_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    chunk_ids = tl.arange(0, C_PAD)
    counts = tl.load(counts_ptr + chunk_ids[:, None] * E_PAD + cols[None, :], mask=chunk_ids[:, None] < chunks, other=0)
    total = tl.sum(counts, axis=0)
    before = tl.sum(tl.where(chunk_ids[:, None] < chunk, counts, 0), axis=0)  # this expert's tokens in earlier chunks
    start = tl.cumsum(total, axis=0) - total  # where each expert's group begins
    if chunk == 0:
        tl.store(offsets_ptr + cols, (start + total).to(tl.int32), mask=cols < experts)
    rows = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = rows < tokens
    expert = tl.load(expert_ptr + rows, mask=inside, other=E_PAD)  # E_PAD matches no column
    onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - 1  # earlier tokens of the same expert in this chunk
    dest = tl.sum(onehot * (rank + (start + before)[None, :]), axis=1)
    tl.store(dest_ptr + rows, dest.to(tl.int64), mask=inside)
    tl.store(order_ptr + dest, rows.to(tl.int64), mask=inside)


def route_sorted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert [T], dest [T], order [T], offsets [E] int32) from router logits [T, E].

    order lists the tokens grouped by expert (ascending within a group), dest[t] is token t's place
    in it (order[dest[t]] == t), offsets are the groups' ends, as torch._grouped_mm wants them.
    """
    tokens, experts = logits.shape
    chunks = triton.cdiv(tokens, ROUTE_BLOCK)
    e_pad, c_pad = triton.next_power_of_2(experts), triton.next_power_of_2(chunks)
    device = logits.device
    expert = torch.empty(tokens, dtype=torch.int64, device=device)
    counts = torch.empty(chunks, e_pad, dtype=torch.int32, device=device)
    dest, order = torch.empty_like(expert), torch.empty_like(expert)
    offsets = torch.empty(experts, dtype=torch.int32, device=device)
    _route_count_kernel[(chunks,)](logits, expert, counts, tokens, experts, logits.stride(0), BLOCK=ROUTE_BLOCK, E_PAD=e_pad)
    _route_place_kernel[(chunks,)](expert, counts, dest, order, offsets, tokens, experts, chunks,
                                   BLOCK=ROUTE_BLOCK, E_PAD=e_pad, C_PAD=c_pad)
    return expert, dest, order, offsets


# ------------------------------------------------------------------------------------------------
# One token (batch-1 decode): the token's expert is all that is read. Two launches: (1) router,
# argmax and the expert's gate/up rows with SwiGLU, (2) the expert's down projection. Matrix-vector
# work, so the kernels are plain loads and reductions sized to keep every SM streaming weights.

ONE_TOKEN_ROWS = 8  # measured best of 8/16/32 rows x 128/256/512 K on an H100 (PERFORMANCE_NOTES.md)
ONE_TOKEN_K = 512


@triton.jit
def _one_token_gate_up_kernel(x_ptr, router_ptr, gate_up_ptr, expert_ptr, hidden_ptr, d, width, experts, expert_stride,
                              BN: tl.constexpr, BK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    cols_e = tl.arange(0, E_PAD)
    logits = tl.zeros([E_PAD], dtype=tl.float32)
    for k0 in range(0, d, BK):
        ks = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + ks, mask=ks < d, other=0.0).to(tl.float32)
        r = tl.load(router_ptr + cols_e[:, None] * d + ks[None, :], mask=(cols_e[:, None] < experts) & (ks[None, :] < d), other=0.0)
        logits += tl.sum(r.to(tl.float32) * xk[None, :], axis=1)
    # the reference rounds the router's logits to the input dtype before its argmax
    logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(cols_e < experts, logits, float("-inf"))
    expert = tl.argmax(logits, axis=0, tie_break_left=True)
    if pid == 0:
        tl.store(expert_ptr, expert.to(tl.int64))
    rows = pid * BN + tl.arange(0, BN)
    base = gate_up_ptr + expert.to(tl.int64) * expert_stride
    acc_gate = tl.zeros([BN], dtype=tl.float32)
    acc_up = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, d, BK):
        ks = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + ks, mask=ks < d, other=0.0).to(tl.float32)
        inside = (rows[:, None] < width) & (ks[None, :] < d)
        gate = tl.load(base + rows[:, None] * d + ks[None, :], mask=inside, other=0.0)
        up = tl.load(base + (rows[:, None] + width) * d + ks[None, :], mask=inside, other=0.0)
        acc_gate += tl.sum(gate.to(tl.float32) * xk[None, :], axis=1)
        acc_up += tl.sum(up.to(tl.float32) * xk[None, :], axis=1)
    hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(hidden_ptr + rows, hidden.to(hidden_ptr.dtype.element_ty), mask=rows < width)


@triton.jit
def _one_token_down_kernel(hidden_ptr, down_ptr, expert_ptr, out_ptr, d, width, expert_stride,
                           BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    expert = tl.load(expert_ptr)
    base = down_ptr + expert * expert_stride
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, width, BK):
        ks = k0 + tl.arange(0, BK)
        hk = tl.load(hidden_ptr + ks, mask=ks < width, other=0.0).to(tl.float32)
        w = tl.load(base + rows[:, None] * width + ks[None, :], mask=(rows[:, None] < d) & (ks[None, :] < width), other=0.0)
        acc += tl.sum(w.to(tl.float32) * hk[None, :], axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < d)


def one_token_moe(x: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  rows: int = ONE_TOKEN_ROWS, block_k: int = ONE_TOKEN_K) -> torch.Tensor:
    """The MoE MLP for one token x [1, d]: gate_up [E, 2w, d], down [E, d, w] (PackedExperts)."""
    experts, width2, d = gate_up.shape
    width = width2 // 2
    assert x.is_contiguous() and router_weight.is_contiguous() and gate_up.is_contiguous() and down.is_contiguous()
    expert = torch.empty(1, dtype=torch.int64, device=x.device)
    hidden = torch.empty(width, dtype=x.dtype, device=x.device)
    out = torch.empty(1, d, dtype=x.dtype, device=x.device)
    _one_token_gate_up_kernel[(triton.cdiv(width, rows),)](
        x, router_weight, gate_up, expert, hidden, d, width, experts, gate_up.stride(0),
        BN=rows, BK=block_k, E_PAD=triton.next_power_of_2(experts))
    _one_token_down_kernel[(triton.cdiv(d, rows),)](hidden, down, expert, out, d, width, down.stride(0), BN=rows, BK=block_k)
    return out
