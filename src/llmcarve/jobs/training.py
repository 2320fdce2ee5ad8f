"""What every training run shares: where its checkpoints live and the precision it trains in."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch


def run_hash(config, *blocks: torch.Tensor) -> str:
    """A run's checkpoints live under this hash of its trainer config and data: a rerun with both unchanged
    resumes, a changed one starts over."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for tensor in blocks:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


def frozen_model_dtype(device: torch.device) -> str:
    """The dtype of a frozen model that heads train against: bf16 on a GPU (the method's recipe), fp32 on a
    CPU, where it is the exact reference."""
    return "bfloat16" if device.type == "cuda" else "float32"
