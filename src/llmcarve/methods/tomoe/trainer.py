"""Train ToMoE's hypernetwork and heads against a frozen model, with checkpoints and exact resume.

Randomness is a pure function of (seed, step): the data order of a step and its Gumbel noise come from
generators seeded with them (methods/training.py, shared with ATP). A run killed at any point and resumed
from its last checkpoint therefore replays exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from llmcarve.methods import training
from llmcarve.methods.tomoe import losses
from llmcarve.methods.tomoe.budget import active_ratio
from llmcarve.methods.tomoe.config import ToMoEConfig  # the trainer's argument (declared torch-free)
from llmcarve.methods.tomoe.distributed import SINGLE, Shard, average_gradients, batch_max, batch_mean
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.methods.tomoe.masking import MaskSettings, ToMoEMasker
from llmcarve.methods.training import (  # noqa: F401  NonFiniteLossError: stages and tests import it from here
    NonFiniteLossError,
    batch_for_step,
    check_finite,
    checkpoint_due,
    noise_generator,
    restore_optimizer,
    run_fingerprint,
)
from llmcarve.models.adapters import Geometry

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    heads: ToMoEHeads
    v_topk: list[int]
    history: list[dict] = field(default_factory=list)


def loss_parts(config: ToMoEConfig, masker: ToMoEMasker, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    layers, shard = masker.layers, masker.shard
    ratio = active_ratio(masker.geometry, layers, shard)

    def balance(route: torch.Tensor) -> torch.Tensor:
        share = batch_mean(route.reshape(-1, route.shape[-1]).mean(0), shard)  # the whole batch's expert loads
        return losses.load_balance(route, share)

    return {
        "kd": losses.distillation(student, teacher),
        "budget": losses.log_ratio_penalty(ratio, config.p),
        "union": torch.stack([losses.union_coverage(d.expert_masks) for d in layers]).mean(),
        "balance": torch.stack([balance(d.route) for d in layers]).mean(),
        "ratio": ratio,  # logged, not optimised directly
    }


def total_loss(config: ToMoEConfig, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return (
        config.kd_weight * parts["kd"]
        + config.lam * parts["budget"]
        + config.alpha_union * parts["union"]
        + config.alpha_balance * parts["balance"]
    )


def save_checkpoint(
    directory: Path,
    heads: ToMoEHeads,
    optimizer: torch.optim.Optimizer,
    step: int,
    v_widths: list[list[int]],
    history: list[dict],
    config_hash: str | None = None,
) -> None:
    """The heads, their optimizer state and both logs after `step` steps (`config_hash=None`: a warm start any run takes)."""
    tensors = {f"heads.{k}": v for k, v in heads.state_dict().items()}
    metadata = {"v_widths": v_widths, "history": history}
    training.save_checkpoint(directory, step, tensors, {"heads": optimizer.state_dict()}, metadata, config_hash)


def load_checkpoint(
    directory: Path, heads: ToMoEHeads, optimizer: torch.optim.Optimizer, config_hash: str | None = None
) -> tuple[int, list[list[int]], list[dict]]:
    """(steps done, per-step V widths, per-step loss parts) of the checkpoint; a resumed run continues both logs."""
    checkpoint = training.load_checkpoint(directory, config_hash, log)
    if checkpoint is None:
        return 0, [], []
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in checkpoint.tensors.items() if k.startswith("heads.")})
    restore_optimizer(optimizer, checkpoint.optimizer("heads"))
    return checkpoint.step, checkpoint.metadata["v_widths"], checkpoint.metadata["history"]


def v_topk_from_widths(v_widths: list[list[int]], steps: int) -> list[int]:
    """Per-layer cap on per-token V width: the median of the per-step maxima over the last 10% of steps.

    The budget loss constrains the widest token of every step, so this is the width training
    converged to; the converted model enforces it as a fixed cap instead of a data-dependent one.
    """
    tail = v_widths[-max(1, steps // 10) :]
    if not tail:  # no step was trained
        return []
    return [max(1, int(statistics.median(step[layer] for step in tail))) for layer in range(len(tail[0]))]


def train_tomoe(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    config: ToMoEConfig,
    checkpoint_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
    shard: Shard = SINGLE,
    compile_student: bool | None = None,
) -> TrainResult:
    """Train to config.steps (resuming from checkpoint_dir if it holds a checkpoint).

    `stop_after` ends the run early after that many steps of this call (used to simulate a kill).
    Under data parallelism (`shard`, see distributed.py) each process trains on its rows of every
    batch and ends with the heads one process would have; only rank 0 writes checkpoints.
    `compile_student` (default: on a GPU) runs the masked student through torch.compile, hooks
    included, as one graph: eagerly the hooks add ~8,600 small kernels to a step and leave it bound
    by the host at about twice the dense step's time (bench/PERFORMANCE_NOTES.md). Compiling takes
    minutes, once per run; the CPU default stays eager (no compiler toolchain needed).
    """
    device = next(model.parameters()).device
    geometry = Geometry.from_config(model.config)
    model.requires_grad_(False).eval()
    heads = ToMoEHeads(geometry, config.num_experts, seed=config.seed).to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(config, blocks)
    start, v_widths, history = load_checkpoint(checkpoint_dir, heads, optimizer, fingerprint)
    masker = ToMoEMasker(model, heads, MaskSettings(config.temperature, config.offset), shard).attach()
    if compile_student is None:
        compile_student = device.type == "cuda"
    student = torch.compile(model) if compile_student else model
    try:
        bar = tqdm(range(start, config.steps), desc="tomoe", unit="step", initial=start, total=config.steps, disable=shard.rank != 0)
        for step in bar:
            batch = shard.rows(blocks[batch_for_step(len(blocks), config.batch_size, step, config.seed)]).to(device)
            with torch.no_grad(), masker.disabled():
                teacher = model(input_ids=batch).logits
            masker.step(noise_generator(device, config.seed, step), batch.shape)
            parts = loss_parts(config, masker, student(input_ids=batch).logits, teacher)
            # whole-batch values, so every process logs (and stops on a NaN) alike
            whole_batch = {name: batch_mean(value, shard) for name, value in parts.items()}
            check_finite(whole_batch, step)
            optimizer.zero_grad(set_to_none=True)
            total_loss(config, parts).backward()
            average_gradients(heads.parameters(), shard)
            optimizer.step()
            v_widths.append([int(batch_max(d.v_mask.detach().sum(-1), shard)) for d in masker.layers])
            logged = {name: value.item() for name, value in whole_batch.items()}
            history.append({"step": step, **logged})
            bar.set_postfix(kd=f"{logged['kd']:.3f}", ratio=f"{logged['ratio']:.3f}", union=f"{logged['union']:.3f}", bal=f"{logged['balance']:.3f}")
            if on_step is not None:
                on_step(step, logged)
            done = step + 1
            if shard.rank == 0 and checkpoint_due(done, config.checkpoint_every, config.steps):
                save_checkpoint(checkpoint_dir, heads, optimizer, done, v_widths, history, fingerprint)
            if stop_after is not None and done - start >= stop_after:
                break
    finally:
        masker.detach()
    return TrainResult(heads, v_topk_from_widths(v_widths, config.steps), history)

