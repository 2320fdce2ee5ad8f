"""Calibration blocks: the sample of a domain's training blocks whose activations rank channels."""

from __future__ import annotations

import torch

from llmcarve.errors import UserInputError


def select_calibration_blocks(blocks: torch.Tensor, count: int, seed: int, key: str) -> torch.Tensor:
    """A seeded sample of `count` blocks, in corpus order, so calibration does not only see the first documents.

    `key` names the setting in the error (`calibrate.num_blocks`, `--calibration-blocks`).
    """
    if count > len(blocks):
        raise UserInputError(f"{key}={count} but the domain has only {len(blocks)} blocks; lower {key}")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order[:count].sort().values]
