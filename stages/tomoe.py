"""Stage tomoe: train ToMoE's hypernetwork, routers and decoders for every budget; weights stay frozen.

Reads `tomoe:` and the packed blocks of its domain; writes artifacts/tomoe/tomoe@<p>/heads.safetensors
and training.json (config, per-layer V width caps, loss history), and metrics/tomoe.json.
Checkpoints live in artifacts/checkpoints/tomoe/ (a DVC `persist` output, so they survive a killed
run) under a hash of the training config: a rerun with the same config resumes, a changed one starts over.

With `tomoe.num_processes: N > 1` the stage relaunches itself under torchrun: N data-parallel processes
(one per GPU, or gloo processes on a CPU), each with the frozen model, training the same heads on its
share of every batch; rank 0 alone logs and writes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from llmcarve.device import resolve_device
from llmcarve.io import atomic_directory, write_json
from llmcarve.jobs.layout import load_training_blocks
from llmcarve.jobs.tomoe import check_num_experts, save_tomoe_run
from llmcarve.jobs.training import frozen_model_dtype, run_hash
from llmcarve.methods.tomoe.distributed import join_process_group, launched_by_torchrun
from llmcarve.methods.tomoe.trainer import train_tomoe
from llmcarve.models.adapters import Geometry
from llmcarve.models.loading import load_model
from llmcarve.names import ModelName
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "tomoe"
CHECKPOINTS = ARTIFACTS / "checkpoints" / "tomoe"


def relaunch_under_torchrun(processes: int) -> None:
    """Replace this process by torchrun running this stage in `processes` processes (never returns)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "stages.tomoe", *sys.argv[1:]]
    os.execv(sys.executable, command)


def run(params: Params) -> None:
    section = params.tomoe
    device = resolve_device(section.device, "tomoe.device")  # before torchrun's processes start: one clear error
    if section.num_processes > 1 and not launched_by_torchrun():
        relaunch_under_torchrun(section.num_processes)
    blocks = load_training_blocks(section.domain, section.seq_len, ARTIFACTS)
    shard, device = join_process_group(device)
    writes = shard.rank == 0  # the other processes only train
    tracking = stage_run("tomoe", {"tomoe": section.model_dump(), "seed": params.seed}) if writes else nullcontext(None)
    with tracking as tracker:
        model, _ = load_model(ARTIFACTS / "model", frozen_model_dtype(device), str(device))
        check_num_experts(section.num_experts, Geometry.from_config(model.config), "tomoe.num_experts")
        summary = {}
        # the other processes write into a scratch directory that disappears with them
        with atomic_directory(OUT) if writes else tempfile.TemporaryDirectory() as staging:
            staging = Path(staging)
            for p in section.budgets:
                name, config = str(ModelName("tomoe", budget=p)), section.trainer_config(p, params.seed)
                start = time.perf_counter()
                result = train_tomoe(
                    model, blocks, config, CHECKPOINTS / f"{name}-{run_hash(config, blocks)}",
                    on_step=lambda step, parts, name=name: tracker and tracker.log_metrics({name: parts}, step=step),
                    shard=shard,
                )
                save_tomoe_run(staging / name, result, config)
                final = result.history[-1] if result.history else {}
                summary[name] = {
                    "final": final,
                    "steps": config.steps,
                    "tokens": config.steps * config.batch_size * blocks.shape[1],
                    "seconds_this_run": time.perf_counter() - start,
                    "device": str(device),
                    "processes": shard.world,
                }
        if writes:
            write_json(METRICS / "tomoe.json", summary)


if __name__ == "__main__":
    main(run, __doc__)
