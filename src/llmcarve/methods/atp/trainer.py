"""ATP's schedule: alternate generator and LoRA updates, freeze the decision, then LoRA alone.

Each search step:
1. generator update on a calibration batch: cross-entropy of the PRUNED forward (LoRA included, no
   dropout) under freshly sampled hard masks + ratio_weight * |log(kept / p)|;
2. LoRA update on a training batch with the generator's current noise-free decision, masks on the
   frozen branch only, then the group-lasso proximal step with the weak search strength.
At the end of the search the decision is frozen (noise-free, cut to p: budget.fit_to_budget) and the
final steps train LoRA alone under the strong group-lasso strength, which puts the pruned groups at
zero so removal leaves the tuned model unchanged.

Randomness is a function of (seed, step): batches, Gumbel noise and LoRA dropout (methods/training.py,
shared with ToMoE). A killed run resumes from its checkpoint and replays what the uninterrupted run
would have done. Plain LoRA (the baselines) uses the same update on the same batches, without masks or
group lasso.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from llmcarve.methods import training
from llmcarve.methods.atp.budget import fit_to_budget, kept_ratio
from llmcarve.methods.atp.config import ATPConfig, LoraRunConfig
from llmcarve.methods.atp.generator import DecisionGenerator, LayerMasks, masks_from_state, masks_state, sample_masks
from llmcarve.methods.atp.lora import add_lora, base_model, group_norms, lora_parameters, proximal_group_lasso, pruned_slices
from llmcarve.methods.atp.masking import ATPMasker, Forward
from llmcarve.methods.tomoe.losses import log_ratio_penalty
from llmcarve.methods.training import (
    batch_for_step,
    check_finite,
    checkpoint_due,
    noise_generator,
    restore_optimizer,
    run_fingerprint,
    step_seed,
)
from llmcarve.models.adapters import Geometry

log = logging.getLogger(__name__)
LORA_GRAD_CLIP, GENERATOR_GRAD_CLIP = 1.0, 3.0


@dataclass
class ATPResult:
    model: nn.Module  # the PeftModel (masks detached)
    masks: list[LayerMasks]
    history: list[dict]
    report: dict


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


NAN_ADVICE = "lower the learning rates or check the data"


def with_lora(model: nn.Module, config: LoraRunConfig) -> nn.Module:
    """The frozen model with LoRA factors whose initialisation depends on the seed alone."""
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return add_lora(model, config.settings)


def lora_update(model, optimizer, blocks: torch.Tensor, config: LoraRunConfig, step: int) -> float:
    """One LoRA step on the training batch of `step` (dropout seeded by the step); returns its loss."""
    device = next(model.parameters()).device
    batch = blocks[batch_for_step(len(blocks), config.batch_size, step, config.seed)].to(device)
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(step_seed(config.seed, step))
        loss = lm_loss(model, batch)
        parameters = list(lora_parameters(model).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=parameters)
    torch.nn.utils.clip_grad_norm_(parameters, LORA_GRAD_CLIP)
    optimizer.step()
    return loss.item()


# ------------------------------------------------------------------------------------------------
# checkpoints (the file itself: methods/training.py)


def save_checkpoint(
    directory: Path, step: int, tensors: dict[str, torch.Tensor], optimizers: dict, metadata: dict, config_hash: str | None = None
) -> None:
    """`tensors` and the state of `optimizers` (label -> optimizer) after `step` steps, with JSON `metadata`."""
    states = {label: optimizer.state_dict() for label, optimizer in optimizers.items()}
    training.save_checkpoint(directory, step, tensors, states, metadata, config_hash)


def load_checkpoint(directory: Path, optimizers: dict, config_hash: str | None = None) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(steps done, the saved tensors other than optimizer state, metadata); (0, {}, {}) without one.

    Restores the state of `optimizers` (label -> optimizer) in place.
    """
    checkpoint = training.load_checkpoint(directory, config_hash, log)
    if checkpoint is None:
        return 0, {}, {}
    for label, optimizer in optimizers.items():
        restore_optimizer(optimizer, checkpoint.optimizer(label))
    return checkpoint.step, checkpoint.tensors, checkpoint.metadata


# ------------------------------------------------------------------------------------------------
# ATP


def train_atp(
    model: nn.Module,
    lora_blocks: torch.Tensor,
    calibration_blocks: torch.Tensor,
    config: ATPConfig,
    checkpoint_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> ATPResult:
    """Train to config.lora.steps, resuming from checkpoint_dir; `stop_after` ends early (a simulated kill)."""
    run = config.lora
    device = next(model.parameters()).device
    geometry = Geometry.from_config(model.config)
    peft_model = with_lora(model, run)
    generator = DecisionGenerator(geometry, seed=run.seed).to(device)
    lora_optimizer = torch.optim.AdamW(lora_parameters(peft_model).values(), lr=run.lr)
    generator_optimizer = torch.optim.AdamW(generator.parameters(), lr=config.generator_lr)
    optimizers = {"lora": lora_optimizer, "generator": generator_optimizer}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(config, lora_blocks, calibration_blocks)
    start, saved, metadata = load_checkpoint(checkpoint_dir, optimizers, fingerprint)
    if saved:
        generator.load_state_dict({k.removeprefix("generator."): v for k, v in saved.items() if k.startswith("generator.")})
        lora = lora_parameters(peft_model)
        with torch.no_grad():
            for name, value in saved.items():
                if name.startswith("lora."):
                    lora[name.removeprefix("lora.")].copy_(value)
    frozen = masks_from_state(saved, "frozen.", device)
    history: list[dict] = metadata.get("history", [])
    freeze_report: dict = metadata.get("freeze", {})
    masker = ATPMasker(base_model(peft_model)).attach()

    def generator_update(step: int) -> dict[str, float]:
        batch = calibration_blocks[batch_for_step(len(calibration_blocks), run.batch_size, step, run.seed + 1)].to(device)
        peft_model.eval()  # no LoRA dropout: the generator sees the model it is pruning
        masks = sample_masks(generator(), config.temperature, config.offset, noise_generator(device, run.seed, step))
        masker.use(masks, Forward.PRUNED)
        cross_entropy = lm_loss(peft_model, batch)
        ratio = kept_ratio(geometry, masks)
        penalty = log_ratio_penalty(ratio, config.p)
        generator_optimizer.zero_grad(set_to_none=True)
        (cross_entropy + config.ratio_weight * penalty).backward(inputs=list(generator.parameters()))
        torch.nn.utils.clip_grad_norm_(generator.parameters(), GENERATOR_GRAD_CLIP)
        generator_optimizer.step()
        return {"generator_ce": cross_entropy.item(), "sampled_ratio": ratio.item(), "ratio_penalty": penalty.item()}

    try:
        bar = tqdm(range(start, run.steps), desc=f"atp@{config.p:g}", unit="step", initial=start, total=run.steps)
        for step in bar:
            searching = step < config.search_steps
            parts: dict[str, float] = {}
            if searching:
                parts |= generator_update(step)
                with torch.no_grad():
                    decision = [m.detach() for m in sample_masks(generator(), config.temperature, config.offset, None)]
            else:
                if frozen is None:
                    with torch.no_grad():
                        logits = generator()
                        learned = sample_masks(logits, config.temperature, config.offset, None)
                        frozen = fit_to_budget(geometry, logits, config.offset, config.p)
                    freeze_report = {"step": step, "noise_free_ratio": kept_ratio(geometry, learned).item(), "fitted_ratio": kept_ratio(geometry, frozen).item()}
                decision = frozen
            masker.use(decision, Forward.FROZEN_BRANCH)
            parts["lora_ce"] = lora_update(peft_model, lora_optimizer, lora_blocks, run, step)
            slices = pruned_slices(peft_model, decision)
            strength = config.group_lasso_search if searching else config.group_lasso_final
            proximal_group_lasso(slices, strength * run.lr)
            norms = group_norms(slices)
            parts |= {
                "decision_ratio": kept_ratio(geometry, decision).item(),
                "pruned_group_norm_sum": norms.sum().item(),
                "pruned_group_norm_max": norms.max().item() if len(norms) else 0.0,
            }
            check_finite(parts, step, NAN_ADVICE)
            history.append({"step": step, "phase": "search" if searching else "frozen", **parts})
            bar.set_postfix(ce=f"{parts['lora_ce']:.3f}", kept=f"{parts['decision_ratio']:.3f}", gl=f"{parts['pruned_group_norm_max']:.1e}")
            if on_step is not None:
                on_step(step, parts)
            done = step + 1
            if checkpoint_due(done, run.checkpoint_every, run.steps):
                tensors = {f"generator.{k}": v for k, v in generator.state_dict().items()}
                tensors |= {f"lora.{k}": v for k, v in lora_parameters(peft_model).items()}
                tensors |= masks_state(frozen, "frozen.") if frozen is not None else {}
                save_checkpoint(checkpoint_dir, done, tensors, optimizers, {"history": history, "freeze": freeze_report}, fingerprint)
            if stop_after is not None and done - start >= stop_after:
                break
    finally:
        masker.detach()
    final = frozen if frozen is not None else decision
    norms = group_norms(pruned_slices(peft_model, final))
    report = {
        "config": dataclasses.asdict(config),
        "freeze": freeze_report,
        "kept_ratio": kept_ratio(geometry, final).item(),
        "kept": [list(m.kept()) for m in final],
        "removed_groups": len(norms),
        "removed_group_norm_max": norms.max().item() if len(norms) else 0.0,
        "removed_group_norm_sum": norms.sum().item(),
    }
    return ATPResult(peft_model.eval(), final, history, report)


# ------------------------------------------------------------------------------------------------
# plain LoRA: the dense reference and the second stage of two-stage pruning


def train_lora(
    model: nn.Module,
    blocks: torch.Tensor,
    config: LoraRunConfig,
    checkpoint_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[nn.Module, list[dict]]:
    peft_model = with_lora(model, config)
    optimizer = torch.optim.AdamW(lora_parameters(peft_model).values(), lr=config.lr)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(config, blocks)
    start, saved, metadata = load_checkpoint(checkpoint_dir, {"lora": optimizer}, fingerprint)
    lora = lora_parameters(peft_model)
    with torch.no_grad():
        for name, value in saved.items():
            lora[name.removeprefix("lora.")].copy_(value)
    history: list[dict] = metadata.get("history", [])
    for step in tqdm(range(start, config.steps), desc="lora", unit="step", initial=start, total=config.steps):
        parts = {"lora_ce": lora_update(peft_model, optimizer, blocks, config, step)}
        check_finite(parts, step, NAN_ADVICE)
        history.append({"step": step, **parts})
        if on_step is not None:
            on_step(step, parts)
        done = step + 1
        if checkpoint_due(done, config.checkpoint_every, config.steps):
            save_checkpoint(checkpoint_dir, done, {f"lora.{k}": v for k, v in lora.items()}, {"lora": optimizer}, {"history": history}, fingerprint)
    return peft_model.eval(), history
