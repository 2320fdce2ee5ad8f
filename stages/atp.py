"""Stage atp: LoRA fine-tuning on each domain jointly with a pruning-decision generator, per budget.

Reads `atp:` and the packed training blocks of each domain: the last `calibration_blocks` feed the
generator only, the rest LoRA (held-out documents were split off by prepare_data and are never
seen). Writes artifacts/atp/atp-<domain>@<p>/ (lora.safetensors, masks.safetensors, training.json)
and metrics/atp.json; the remove stage merges and slices. Checkpoints live in
artifacts/checkpoints/atp/ (persisted) under a hash of the config and data: a rerun resumes.
"""

from __future__ import annotations

import time

import torch

from llmcarve.device import resolve_device
from llmcarve.io import atomic_directory, write_json
from llmcarve.jobs.atp import save_atp_run, split_generator_blocks
from llmcarve.jobs.layout import load_training_blocks
from llmcarve.jobs.training import run_hash
from llmcarve.methods.atp.trainer import train_atp
from llmcarve.models.loading import load_model
from llmcarve.names import ModelName
from llmcarve.params import ATPParams, Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "atp"
CHECKPOINTS = ARTIFACTS / "checkpoints" / "atp"


def domain_blocks(section: ATPParams, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(LoRA blocks, generator calibration blocks) of a domain, disjoint by construction."""
    blocks = load_training_blocks(domain, section.seq_len, ARTIFACTS)
    return split_generator_blocks(blocks, section.calibration_blocks, domain, "atp.calibration_blocks")


def run(params: Params) -> None:
    section = params.atp
    device = resolve_device(section.device, "atp.device")
    splits = {domain: domain_blocks(section, domain) for domain in section.domains}  # before any model is loaded
    with stage_run("atp", {"atp": section.model_dump(), "seed": params.seed}) as tracker:
        summary = {}
        with atomic_directory(OUT) as staging:
            for domain, (lora_blocks, calibration_blocks) in splits.items():
                for p in section.budgets:
                    name, config = str(ModelName("atp", domain=domain, budget=p)), section.trainer_config(p, params.seed)
                    model, _ = load_model(ARTIFACTS / "model", "float32", str(device))  # LoRA wraps a fresh copy
                    start = time.perf_counter()
                    result = train_atp(
                        model, lora_blocks, calibration_blocks, config,
                        CHECKPOINTS / f"{name}-{run_hash(config, lora_blocks, calibration_blocks)}",
                        on_step=lambda step, parts, name=name: tracker.log_metrics({name: parts}, step=step),
                    )
                    save_atp_run(staging / name, result)
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
