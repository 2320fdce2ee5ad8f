"""Hard straight-through Gumbel masks: the forward pass is binary, the backward pass is smooth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcarve.methods.tomoe.distributed import SINGLE, Shard


def uniform_noise(shape, generator: torch.Generator, device, dtype, shard: Shard = SINGLE) -> torch.Tensor:
    """U(0, 1) noise in (1e-6, 1 - 1e-6). For per-token tensors under data parallelism (`shard`), every
    process draws the whole batch's noise and keeps its rows: a token's noise, and so the training,
    does not depend on how the batch is split over processes."""
    if shard.world > 1:
        whole = torch.rand((shape[0] * shard.world, *shape[1:]), generator=generator, device=device, dtype=dtype)
        return shard.rows(whole).clamp_(1e-6, 1 - 1e-6)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp_(1e-6, 1 - 1e-6)


def hard_sigmoid_mask(
    logits: torch.Tensor, temperature: float, offset: float, generator: torch.Generator | None, shard: Shard = SINGLE
) -> torch.Tensor:
    """straight_through_mask with its noise drawn here from `generator` (None: no noise)."""
    uniform = None if generator is None else uniform_noise(logits.shape, generator, logits.device, logits.dtype, shard)
    return straight_through_mask(logits, uniform, temperature, offset)


def straight_through_mask(logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float, offset: float) -> torch.Tensor:
    """Binary mask in the forward pass; gradient of sigmoid((logits + noise + offset) / T).

    `offset` starts training near all-ones (sigmoid(3 / 0.4) ~ 0.9995), so the student begins as the
    dense teacher. With uniform=None there is no noise: the mask is exactly (logits + offset > 0),
    which is what conversion and deterministic evaluation use. The noise comes in as uniform draws
    (not a generator) so that the function is pure and a compiled model can trace it.
    """
    shifted = logits + offset
    if uniform is not None:
        # The difference of two Gumbel(0, 1) samples is Logistic(0, 1), log(u) - log(1 - u): the
        # correct noise for a binary concrete (Gumbel-sigmoid) relaxation. (The official code adds a
        # single Gumbel sample, which biases every mask logit by +0.577; the +3 offset hides it but we
        # do not copy it.)
        shifted = shifted + (uniform.log() - torch.log1p(-uniform))
    soft = torch.sigmoid(shifted / temperature)
    hard = (shifted > 0).to(soft.dtype)
    return hard + soft - soft.detach()


def straight_through_one_hot(logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Top-1 routing: one-hot in the forward pass, softmax gradients; uniform=None routes by argmax."""
    noisy = logits if uniform is None else logits - torch.log(-torch.log(uniform))
    soft = F.softmax(noisy / temperature, dim=-1)
    hard = F.one_hot(noisy.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def keep_at_least_one(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Switch on the strongest entry of every all-zero row of `mask` (last dim).

    An attention layer with no Q/K dims would attend uniformly, an expert with no channel would
    output zeros: neither is a useful model, so training and conversion both keep one entry. The
    added ones carry no gradient (the row's soft values still do).
    """
    empty = (mask.detach().sum(-1, keepdim=True) == 0).to(mask.dtype)
    strongest = torch.zeros_like(mask).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return mask + (empty * strongest).detach()
