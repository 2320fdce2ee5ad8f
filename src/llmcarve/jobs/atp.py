"""One ATP run: split a domain's blocks between LoRA and the decision generator, save what training made,
merge and slice it into the compact model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmcarve.errors import UserInputError
from llmcarve.io import write_json
from llmcarve.methods.atp.config import LoraRunConfig
from llmcarve.methods.atp.convert import convert_atp
from llmcarve.methods.atp.generator import masks_from_state, masks_state
from llmcarve.methods.atp.lora import lora_parameters
from llmcarve.methods.atp.trainer import ATPResult

LORA_FILE = "lora.safetensors"
MASKS_FILE = "masks.safetensors"
TRAINING_FILE = "training.json"
PROBE_SHAPE = (2, 64)  # random token ids on which the compact model is checked against the masked one


def split_generator_blocks(blocks: torch.Tensor, calibration_blocks: int, domain: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(LoRA blocks, generator blocks): the last `calibration_blocks` feed the generator only, so the two
    are disjoint by construction. `key` names the setting (`atp.calibration_blocks`, `--calibration-blocks`)."""
    if len(blocks) <= calibration_blocks:
        raise UserInputError(
            f"domain '{domain}' has {len(blocks)} training blocks, not more than {key}={calibration_blocks}: "
            f"lower {key} or give the domain more training text"
        )
    return blocks[:-calibration_blocks], blocks[-calibration_blocks:]


def trained_lora(result: ATPResult) -> dict[str, torch.Tensor]:
    """The LoRA factors of a trained run, on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in lora_parameters(result.model).items()}


def save_atp_run(directory: Path, result: ATPResult) -> None:
    """lora.safetensors, masks.safetensors and training.json (report and loss history) of one trained run."""
    directory.mkdir()
    save_file(trained_lora(result), directory / LORA_FILE)
    save_file(masks_state(result.masks), directory / MASKS_FILE)
    write_json(directory / TRAINING_FILE, {**result.report, "history": result.history})


def load_atp_run(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], LoraRunConfig]:
    """(LoRA factors, masks state, LoRA settings) that `save_atp_run` wrote."""
    training = json.loads((directory / TRAINING_FILE).read_text())
    return load_file(directory / LORA_FILE), load_file(directory / MASKS_FILE), LoraRunConfig(**training["config"]["lora"])


def atp_model(dense: torch.nn.Module, lora: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], settings: LoraRunConfig, seed: int):
    """(compact model, removal report): LoRA merged into `dense` (which this consumes), the pruned structures
    sliced away, and the result checked against the masked model on seeded random tokens."""
    probe = torch.randint(0, dense.config.vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(seed))
    return convert_atp(dense, lora, masks_from_state(masks), settings, probe)
