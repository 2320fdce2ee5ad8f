"""Where the pipeline keeps its artifacts, relative to the project root that DVC runs every stage in.

One home for these paths, so a stage, the registry and the benchmarks never spell them twice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from llmcarve.errors import MissingInputError
from llmcarve.names import DENSE, ModelName

ARTIFACTS = Path("artifacts")


def model_dir(name: str, artifacts: Path = ARTIFACTS) -> Path:
    """The Hugging Face directory of a produced model: dense is the prepared model, the LoRA baselines come
    from their stage, every other carved model from the remove stage."""
    method = ModelName.parse(name).method
    if method == DENSE:
        return artifacts / "model"
    if method in ("lora", "twostage"):
        return artifacts / "lora_baselines" / name
    return artifacts / "remove" / name


def onnx_dir(name: str, artifacts: Path = ARTIFACTS) -> Path:
    """The export_onnx stage's directory of a model (model.onnx, export.json)."""
    return artifacts / "onnx" / name


def domain_dir(domain: str, artifacts: Path = ARTIFACTS) -> Path:
    """prepare_data's output for one domain: train.jsonl, heldout.jsonl, train_blocks.safetensors."""
    return artifacts / "data" / domain


def load_training_blocks(domain: str, seq_len: int | None = None, artifacts: Path = ARTIFACTS) -> torch.Tensor:
    """A domain's packed training blocks [n, block_size] as int64, each cut to its first `seq_len` tokens."""
    path = domain_dir(domain, artifacts) / "train_blocks.safetensors"
    if not path.exists():
        raise MissingInputError(f"{path} does not exist: run the prepare_data stage first (dvc repro prepare_data)")
    blocks = load_file(path)["blocks"]
    return (blocks if seq_len is None else blocks[:, :seq_len]).long()
