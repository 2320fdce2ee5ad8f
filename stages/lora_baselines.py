"""Stage lora_baselines: what ATP is compared against, on the same tokens with the same LoRA settings.

For each ATP domain: lora-<domain>@1.0 (LoRA on the dense model, the tuned reference) and, per
budget p, twostage-<domain>@p (static pruning to p from the calibration statistics, then LoRA).
Both train on exactly ATP's LoRA blocks for atp.steps batches. Writes merged Hugging Face
directories to artifacts/lora_baselines/<name>/ and metrics/lora_baselines.json.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load_file

from llmcarve.device import resolve_device
from llmcarve.eval.accounting import parameter_report
from llmcarve.io import atomic_directory, write_json
from llmcarve.jobs.atp import split_generator_blocks
from llmcarve.jobs.layout import load_training_blocks
from llmcarve.jobs.models import save_named_model
from llmcarve.jobs.training import run_hash
from llmcarve.methods.atp.convert import merged_model
from llmcarve.methods.atp.trainer import train_lora
from llmcarve.methods.baselines.static import prune_static
from llmcarve.models.loading import load_model
from llmcarve.names import ModelName
from llmcarve.params import ATPParams, Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "lora_baselines"
CHECKPOINTS = ARTIFACTS / "checkpoints" / "lora_baselines"


def lora_blocks(section: ATPParams, domain: str) -> torch.Tensor:
    """ATP's LoRA blocks of a domain: the same tokens, without the generator's."""
    blocks = load_training_blocks(domain, section.seq_len, ARTIFACTS)
    return split_generator_blocks(blocks, section.calibration_blocks, domain, "atp.calibration_blocks")[0]


def run(params: Params) -> None:
    section = params.atp
    device = resolve_device(section.device, "atp.device")
    splits = {domain: lora_blocks(section, domain) for domain in section.domains}  # before any model is loaded
    stats = load_file(ARTIFACTS / "calibration" / "stats.safetensors")
    config = section.lora_run_config(params.seed)
    with stage_run("lora_baselines", {"atp": section.model_dump(), "seed": params.seed}) as tracker:
        summary = {}
        with atomic_directory(OUT) as staging:
            for domain, blocks in splits.items():
                # the tuned dense reference, then static pruning to each budget before the same LoRA run
                starts = {ModelName("lora", domain=domain, budget=1.0): None}
                starts |= {ModelName("twostage", domain=domain, budget=p): p for p in section.budgets}
                for model_name, p in starts.items():
                    name = str(model_name)
                    dense, tokenizer = load_model(ARTIFACTS / "model", "float32", str(device))
                    model = dense if p is None else prune_static(dense, stats, p)
                    start = time.perf_counter()
                    tuned, history = train_lora(
                        model, blocks, config, CHECKPOINTS / f"{name}-{run_hash(config, blocks)}",
                        on_step=lambda step, parts, name=name: tracker.log_metrics({name: parts}, step=step),
                    )
                    final = merged_model(tuned)
                    save_named_model(final, tokenizer, staging / name, model_name)
                    summary[name] = {
                        "final": history[-1] if history else {},
                        "steps": section.steps,
                        "lora_tokens": section.steps * section.batch_size * section.seq_len,
                        "seconds_this_run": time.perf_counter() - start,
                        "device": str(device),
                        **parameter_report(final, context_len=section.seq_len),
                    }
        write_json(METRICS / "lora_baselines.json", summary)


if __name__ == "__main__":
    main(run, __doc__)
