"""Train ToMoE's hypernetwork and heads against a frozen model, with checkpoints and exact resume.

Randomness is a pure function of (seed, step): the data order of a step and its Gumbel noise come from
generators seeded with them. A run killed at any point and resumed from its last checkpoint therefore
replays exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from llmcarve.methods.tomoe import losses
from llmcarve.methods.tomoe.budget import active_ratio
from llmcarve.methods.tomoe.distributed import SINGLE, Shard, average_gradients, batch_max, batch_mean
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.methods.tomoe.masking import MaskSettings, ToMoEMasker
from llmcarve.models.adapters import Geometry

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class ToMoEConfig:
    p: float = 0.5  # KEPT fraction of attention+MLP weights per token
    num_experts: int = 8
    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    temperature: float = 0.4
    offset: float = 3.0
    lam: float = 16.0
    alpha_union: float = 3.0
    alpha_balance: float = 1.0
    kd_weight: float = 2.0
    checkpoint_every: int = 50
    seed: int = 0


class NonFiniteLossError(RuntimeError):
    """A loss part became NaN or inf; training stops and keeps the last good checkpoint."""


@dataclass
class TrainResult:
    heads: ToMoEHeads
    v_topk: list[int]
    history: list[dict] = field(default_factory=list)


def batch_for_step(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the blocks step `step` trains on: epochs of seeded permutations, no state needed."""
    first = step * batch_size
    indices = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        indices.append(order[offset])
    return torch.stack(indices)


def noise_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


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


def check_finite(parts: dict[str, torch.Tensor], step: int) -> None:
    for name, value in parts.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(
                f"loss part '{name}' is {value.item()} at step {step}; training stopped, the last good "
                "checkpoint is kept and no model is written (lower the learning rate or check the data)"
            )


def save_checkpoint(
    directory: Path, heads: ToMoEHeads, optimizer: torch.optim.Optimizer, step: int, v_widths: list[list[int]], history: list[dict]
) -> None:
    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v).cpu() for k, v in state.items()})
    staging = directory / f".{CHECKPOINT}.tmp"
    save_file(tensors, staging, metadata={"step": str(step), "v_widths": json.dumps(v_widths), "history": json.dumps(history)})
    staging.replace(directory / CHECKPOINT)  # atomic: a kill mid-write leaves the previous checkpoint


def load_checkpoint(directory: Path, heads: ToMoEHeads, optimizer: torch.optim.Optimizer) -> tuple[int, list[list[int]], list[dict]]:
    """(steps done, per-step V widths, per-step loss parts) of the checkpoint; a resumed run continues both logs."""
    path = directory / CHECKPOINT
    if not path.exists():
        return 0, [], []
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(metadata["step"]), json.loads(metadata["v_widths"]), json.loads(metadata.get("history", "[]"))


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
    start, v_widths, history = load_checkpoint(checkpoint_dir, heads, optimizer)
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
            if shard.rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
                save_checkpoint(checkpoint_dir, heads, optimizer, done, v_widths, history)
            if stop_after is not None and done - start >= stop_after:
                break
    finally:
        masker.detach()
    return TrainResult(heads, v_topk_from_widths(v_widths, config.steps), history)

