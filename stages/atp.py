"""Stage atp: LoRA fine-tuning on each domain jointly with a pruning-decision generator, per budget.

Reads `atp:` and the packed training blocks of each domain: the last `calibration_blocks` feed the
generator only, the rest LoRA (held-out documents were split off by prepare_data and are never
seen). Writes artifacts/atp/atp-<domain>@<p>/ (lora.safetensors, masks.safetensors, training.json)
and metrics/atp.json; the remove stage merges and slices. Checkpoints live in
artifacts/checkpoints/atp/ (persisted) under a hash of the config and data: a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import torch
from safetensors.torch import load_file, save_file

from llmcarve.io import atomic_directory, write_json
from llmcarve.methods.atp.generator import masks_state
from llmcarve.methods.atp.lora import lora_parameters
from llmcarve.methods.atp.trainer import ATPConfig, LoraRunConfig, train_atp
from llmcarve.models.loading import load_model
from llmcarve.params import ATPParams, Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main
from stages.tomoe import pick_device

OUT = ARTIFACTS / "atp"
CHECKPOINTS = ARTIFACTS / "checkpoints" / "atp"


def domain_blocks(section: ATPParams, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(LoRA blocks, generator calibration blocks) of a domain, disjoint by construction."""
    blocks = load_file(ARTIFACTS / "data" / domain / "train_blocks.safetensors")["blocks"][:, : section.seq_len].long()
    if len(blocks) <= section.calibration_blocks:
        raise ValueError(
            f"domain '{domain}' has {len(blocks)} training blocks, not more than atp.calibration_blocks="
            f"{section.calibration_blocks}: lower calibration_blocks or give the domain more training text"
        )
    return blocks[: -section.calibration_blocks], blocks[-section.calibration_blocks :]


def lora_run_config(section: ATPParams, seed: int) -> LoraRunConfig:
    lora = section.lora
    return LoraRunConfig(
        steps=section.steps, batch_size=section.batch_size, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
        lr=lora.lr, checkpoint_every=section.checkpoint_every, seed=seed,
    )


def atp_config(section: ATPParams, p: float, seed: int) -> ATPConfig:
    return ATPConfig(
        lora=lora_run_config(section, seed), p=p, search_fraction=section.search_fraction, generator_lr=section.generator_lr,
        temperature=section.temperature, offset=section.offset, ratio_weight=section.ratio_weight,
        group_lasso_search=section.group_lasso_search, group_lasso_final=section.group_lasso_final,
    )


def run_hash(config, *blocks: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for tensor in blocks:
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


def run(params: Params) -> None:
    section = params.atp
    splits = {domain: domain_blocks(section, domain) for domain in section.domains}  # before any model is loaded
    device = pick_device(section.device)
    with stage_run("atp", {"atp": section.model_dump(), "seed": params.seed}) as tracker:
        summary = {}
        with atomic_directory(OUT) as staging:
            for domain, (lora_blocks, calibration_blocks) in splits.items():
                for p in section.budgets:
                    name, config = f"atp-{domain}@{p:g}", atp_config(section, p, params.seed)
                    model, _ = load_model(ARTIFACTS / "model", "float32", str(device))  # LoRA wraps a fresh copy
                    start = time.perf_counter()
                    result = train_atp(
                        model, lora_blocks, calibration_blocks, config,
                        CHECKPOINTS / f"{name}-{run_hash(config, lora_blocks, calibration_blocks)}",
                        on_step=lambda step, parts, name=name: tracker.log_metrics({name: parts}, step=step),
                    )
                    (staging / name).mkdir()
                    save_file({k: v.detach().cpu().contiguous() for k, v in lora_parameters(result.model).items()}, staging / name / "lora.safetensors")
                    save_file(masks_state(result.masks), staging / name / "masks.safetensors")
                    write_json(staging / name / "training.json", {**result.report, "history": result.history})
                    summary[name] = {
                        **{k: v for k, v in result.report.items() if k not in ("config", "kept")},
                        "final": result.history[-1] if result.history else {},
                        "steps": section.steps,
                        "lora_tokens": section.steps * section.batch_size * section.seq_len,
                        "generator_tokens": config.search_steps * section.batch_size * section.seq_len,
                        "seconds_this_run": time.perf_counter() - start,
                        "device": str(device),
                    }
        write_json(METRICS / "atp.json", summary)


if __name__ == "__main__":
    main(run, __doc__)
