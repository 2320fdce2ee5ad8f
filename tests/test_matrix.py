"""The shared test matrix: every carving method on every supported family, carve -> save -> load.

One table of methods (METHODS) and one of families (FAMILIES); pytest runs every pair. Each run
carves a tiny random-weight model at the budget P with the library's own entry points (the ones
stages/remove.py calls), saves it as a Hugging Face directory, loads it back with
`AutoModelForCausalLM` (after `import llmcarve`, no remote code) and checks

- the loaded model computes the same logits as the carved model in memory, bit for bit: the
  weights go through safetensors unchanged and the same float32 kernels run on the same bits, so
  any difference means the directory lost or changed something (a tolerance would hide a
  perturbed weight whose effect is below it);
- the active ratio measured on the loaded model is P, within what the method's granularity allows.

Adding a method (recovery, say) is one more `Method` row: how it carves a tiny dense model at P,
and how far from P its granularity lets the ratio land. What each method computes beyond that
(conversion against the masked model, removal, budgets under training) is tested in its own module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmcarve  # noqa: F401  (registers the carved model with the Auto classes)
from llmcarve.calibration import collect_channel_stats
from llmcarve.eval.accounting import parameter_report
from llmcarve.methods.atp.convert import convert_atp
from llmcarve.methods.atp.lora import lora_parameters
from llmcarve.methods.atp.trainer import ATPConfig, LoraRunConfig, train_atp
from llmcarve.methods.baselines.static import prune_static
from llmcarve.methods.tomoe.convert import convert_to_moe
from llmcarve.methods.tomoe.trainer import ToMoEConfig, train_tomoe
from llmcarve.models.adapters import Geometry
from llmcarve.models.carved import CarvedForCausalLM
from tests.tiny import save_tiny, tiny_llama, tiny_mistral, tiny_qwen2

P = 0.5  # the kept fraction every method is asked for


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


TRAINING_BLOCKS = _ids(24, 24, seed=0)  # ToMoE trains on the first 16; ATP tunes LoRA on them and searches on the rest
PROBE = _ids(2, 12, seed=1)  # longer than tiny_mistral's window of 4, so the window drops keys here


# ------------------------------------------------------------------------------------------------
# Families: the tiny dense models, one per supported architecture

FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama-mha": lambda: tiny_llama(),
    "llama-gqa": lambda: tiny_llama(gqa=True),
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
}


# ------------------------------------------------------------------------------------------------
# Methods: carve a tiny dense model at P, and the slack of the realised ratio around P


def _dense_weights(geometry: Geometry) -> int:
    return geometry.num_layers * (geometry.attention_weights_per_layer + geometry.mlp_weights_per_layer)


def carve_static(build: Callable, workdir: Path) -> CarvedForCausalLM:
    dense = build()
    return prune_static(dense, collect_channel_stats(dense, TRAINING_BLOCKS[:4], progress=False), P)


def static_slack(geometry: Geometry) -> float:
    """uniform_widths fixes Q/K and V widths, then rounds the MLP width to whole channels so the layer
    hits P: every layer lands within half an MLP channel (3d / 2 weights) of P."""
    return geometry.num_layers * 1.5 * geometry.hidden_size / _dense_weights(geometry)


# 20 steps at a high learning rate take the tiny models' ratio to P within a few percent (the
# trainer's own budget test runs 60 steps at a lower rate); the round trip needs no more.
TOMOE = ToMoEConfig(p=P, steps=20, lr=5e-2, checkpoint_every=20, num_experts=4)


def carve_tomoe(build: Callable, workdir: Path) -> CarvedForCausalLM:
    dense = build()
    result = train_tomoe(dense, TRAINING_BLOCKS[:16], TOMOE, workdir)
    return convert_to_moe(dense, result.heads, TOMOE.offset, result.v_topk)


def tomoe_slack(geometry: Geometry) -> float:
    """The budget is a loss term, not a cut, and the carved count takes the widest expert and the
    V cap: after a short training the ratio sits within training noise of P. 0.1, as the trainer's
    own budget test allows."""
    return 0.1


# Two generator steps, then the decision is frozen and cut to P (fit_to_budget) and LoRA trains on.
ATP = ATPConfig(lora=LoraRunConfig(steps=4, batch_size=2, lr=5e-3, checkpoint_every=4), p=P, generator_lr=5e-2)


def carve_atp(build: Callable, workdir: Path) -> CarvedForCausalLM:
    """As stages/remove.py does: train, then merge and remove on a fresh dense model."""
    result = train_atp(build(), TRAINING_BLOCKS[:16], TRAINING_BLOCKS[16:], ATP, workdir)
    lora_state = {name: value.detach().clone() for name, value in lora_parameters(result.model).items()}
    compact, _removal = convert_atp(build(), lora_state, result.masks, ATP.lora, PROBE)
    return compact


def atp_slack(geometry: Geometry) -> float:
    """fit_to_budget keeps units best first while they fit in P, so it stops less than one unit
    (at most a Q/K pair: 2d(H + H_kv) weights) below P; keep_at_least_one then gives any layer the
    cut emptied one Q/K pair, one V dim and one MLP channel back, above P."""
    d, heads = geometry.hidden_size, geometry.num_heads + geometry.num_kv_heads
    pair, v_dim, channel = 2 * d * heads, d * heads, 3 * d
    return max(pair, geometry.num_layers * (pair + v_dim + channel)) / _dense_weights(geometry)


@dataclass(frozen=True)
class Method:
    name: str
    carve: Callable[[Callable, Path], CarvedForCausalLM]  # (family builder, work dir) -> carved model at P
    slack: Callable[[Geometry], float]  # how far from P the measured active ratio may land


METHODS = [
    Method("static", carve_static, static_slack),
    Method("tomoe", carve_tomoe, tomoe_slack),
    Method("atp", carve_atp, atp_slack),
]


# ------------------------------------------------------------------------------------------------
# The matrix


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small gain nothing from a second thread, while on a shared, busy CPU the
    idle workers spin for their turn and slow every step several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=PROBE).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.name)
def test_carve_save_load_keeps_logits_and_budget(method, family, tmp_path):
    carved = method.carve(FAMILIES[family], tmp_path / "work")
    directory = Path(save_tiny(carved, tmp_path / "carved"))
    assert not list(directory.glob("*.py")) and not list(directory.glob("*.bin")), "no remote code, no pickles"
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llmcarve"
    assert config["base_model_type"] == FAMILIES[family]().config.model_type

    loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert type(loaded) is CarvedForCausalLM
    assert not loaded.training, "from_pretrained must return an eval-mode model"
    expected, actual = _logits(carved), _logits(loaded)
    assert torch.equal(actual, expected), (
        f"{method.name} on {family}: the reloaded model's logits differ from the carved model's by up to "
        f"{(actual - expected).abs().max().item():.3g}; save_pretrained or from_pretrained lost or changed a weight or a config field"
    )

    measured = parameter_report(loaded, context_len=PROBE.shape[1])["active_ratio"]
    slack = method.slack(Geometry.from_config(loaded.config))
    assert abs(measured - P) <= slack, (
        f"{method.name} on {family} was asked to keep {P} of the attention+MLP weights and keeps {measured:.4f}, "
        f"more than its granularity ({slack:.4f}) away"
    )
