"""ToMoE's loss terms, as pure functions of tensors (testable alone).

Total = kd_weight * distillation + lam * budget + alpha_union * union + alpha_balance * balance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-3  # keeps the log-ratios finite at 0; the official code uses the same constant


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the unmasked teacher's distribution, per token.

    Equal to forward KL(teacher || student) up to the teacher's entropy, which has no gradient.
    """
    teacher = F.softmax(teacher_logits.float(), dim=-1)
    return -(teacher * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def log_ratio_penalty(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """|log((ratio + c) / (target + c))|: two-sided, so the ratio neither over- nor undershoots p."""
    return (torch.log(ratio + EPS) - torch.log(torch.tensor(target + EPS, device=ratio.device))).abs()


def union_coverage(expert_masks: torch.Tensor) -> torch.Tensor:
    """log((1 + c) / (u + c)), u = fraction of channels used by at least one expert.

    Without it the experts drift onto the same salient channels and ToMoE degenerates into static
    pruning; with it every channel stays reachable by some expert.
    """
    covered = 1 - torch.prod(1 - expert_masks, dim=0)
    return torch.log(torch.tensor(1 + EPS, device=expert_masks.device)) - torch.log(covered.mean() + EPS)


def load_balance(route: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style sum_e f_e * P_e over tokens; its minimum 1/E is reached at a uniform load.

    f_e (the hard share of tokens per expert) carries no gradient; P_e is the mean straight-through
    route, whose gradient reaches the router through the soft probabilities. `share` may be given
    when the tokens of the batch are spread over processes (the whole batch's f_e).
    """
    flat = route.reshape(-1, route.shape[-1])
    share = flat.detach().mean(0) if share is None else share
    return (share * flat.mean(0)).sum()
