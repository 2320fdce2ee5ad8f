"""Stage lora_baselines: what ATP is compared against, on the same tokens with the same LoRA settings.

For each ATP domain: lora-<domain>@1.0 (LoRA on the dense model, the tuned reference) and, per
budget p, twostage-<domain>@p (static pruning to p from the calibration statistics, then LoRA).
Both train on exactly ATP's LoRA blocks for atp.steps batches. Writes merged Hugging Face
directories to artifacts/lora_baselines/<name>/ and metrics/lora_baselines.json.
"""

from __future__ import annotations

import time

from safetensors.torch import load_file

from llmcarve.eval.accounting import parameter_report
from llmcarve.io import atomic_directory, write_json
from llmcarve.methods.atp.convert import merged_model
from llmcarve.methods.atp.trainer import train_lora
from llmcarve.methods.baselines.static import prune_static
from llmcarve.models.loading import load_model
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.atp import domain_blocks, lora_run_config, run_hash
from stages.common import ARTIFACTS, METRICS, main
from stages.tomoe import pick_device

OUT = ARTIFACTS / "lora_baselines"
CHECKPOINTS = ARTIFACTS / "checkpoints" / "lora_baselines"


def run(params: Params) -> None:
    section = params.atp
    splits = {domain: domain_blocks(section, domain)[0] for domain in section.domains}  # before any model is loaded
    stats = load_file(ARTIFACTS / "calibration" / "stats.safetensors")
    device = pick_device(section.device)
    config = lora_run_config(section, params.seed)
    with stage_run("lora_baselines", {"atp": section.model_dump(), "seed": params.seed}) as tracker:
        summary = {}
        with atomic_directory(OUT) as staging:
            for domain, blocks in splits.items():
                starts = {f"lora-{domain}@1.0": None, **{f"twostage-{domain}@{p:g}": p for p in section.budgets}}
                for name, p in starts.items():
                    dense, tokenizer = load_model(ARTIFACTS / "model", "float32", str(device))
                    model = dense if p is None else prune_static(dense, stats, p)
                    start = time.perf_counter()
                    tuned, history = train_lora(
                        model, blocks, config, CHECKPOINTS / f"{name}-{run_hash(config, blocks)}",
                        on_step=lambda step, parts, name=name: tracker.log_metrics({name: parts}, step=step),
                    )
                    final = merged_model(tuned)
                    final.save_pretrained(staging / name)
                    tokenizer.save_pretrained(staging / name)
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
