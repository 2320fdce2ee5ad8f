"""One ToMoE run: train the heads against the frozen model, save them, convert them into the MoE model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmcarve.errors import UserInputError
from llmcarve.io import write_json
from llmcarve.methods.tomoe.config import ToMoEConfig
from llmcarve.methods.tomoe.convert import convert_to_moe
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.methods.tomoe.trainer import TrainResult
from llmcarve.models.adapters import Geometry

HEADS_FILE = "heads.safetensors"
TRAINING_FILE = "training.json"


def check_num_experts(num_experts: int, geometry: Geometry, key: str) -> None:
    """Each expert owns at least one MLP channel. `key` names the setting (`tomoe.num_experts`, `--num-experts`)."""
    if num_experts > geometry.intermediate_size:
        raise UserInputError(f"{key}={num_experts} exceeds the MLP width {geometry.intermediate_size}; lower {key}")


def save_tomoe_run(directory: Path, result: TrainResult, config: ToMoEConfig) -> None:
    """heads.safetensors and training.json (config, per-layer V width caps, loss history) of one trained run."""
    directory.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in result.heads.state_dict().items()}, directory / HEADS_FILE)
    write_json(directory / TRAINING_FILE, {"config": dataclasses.asdict(config), "v_topk": result.v_topk, "history": result.history})


def heads_from_state(state: dict[str, torch.Tensor], geometry: Geometry, num_experts: int) -> ToMoEHeads:
    """Heads on the CPU holding `state` (trained on any device)."""
    heads = ToMoEHeads(geometry, num_experts)
    heads.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    return heads


def load_tomoe_run(directory: Path, geometry: Geometry, num_experts: int) -> tuple[ToMoEHeads, dict]:
    """The heads and training.json that `save_tomoe_run` wrote."""
    heads = heads_from_state(load_file(directory / HEADS_FILE), geometry, num_experts)
    return heads, json.loads((directory / TRAINING_FILE).read_text())


def tomoe_model(dense: torch.nn.Module, heads: ToMoEHeads, offset: float, v_topk: list[int]):
    """The deterministic MoE model of trained heads (llmcarve.methods.tomoe.convert)."""
    return convert_to_moe(dense, heads, offset, v_topk)
