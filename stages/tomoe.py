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

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmcarve.io import atomic_directory, write_json
from llmcarve.methods.tomoe.distributed import join_process_group, launched_by_torchrun
from llmcarve.methods.tomoe.trainer import ToMoEConfig, train_tomoe
from llmcarve.models.adapters import Geometry
from llmcarve.models.loading import load_model
from llmcarve.params import Params, ToMoEParams
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "tomoe"
CHECKPOINTS = ARTIFACTS / "checkpoints" / "tomoe"


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tomoe.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def training_config(section: ToMoEParams, p: float, seed: int) -> ToMoEConfig:
    fields = {f.name for f in dataclasses.fields(ToMoEConfig)}
    return ToMoEConfig(p=p, seed=seed, **{k: v for k, v in section.model_dump().items() if k in fields and k != "p"})


def config_hash(config: ToMoEConfig, blocks: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(blocks.numpy().tobytes())
    return digest.hexdigest()[:12]


def relaunch_under_torchrun(processes: int) -> None:
    """Replace this process by torchrun running this stage in `processes` processes (never returns)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "stages.tomoe", *sys.argv[1:]]
    os.execv(sys.executable, command)


def run(params: Params) -> None:
    section = params.tomoe
    if section.num_processes > 1 and not launched_by_torchrun():
        relaunch_under_torchrun(section.num_processes)
    blocks = load_file(ARTIFACTS / "data" / section.domain / "train_blocks.safetensors")["blocks"][:, : section.seq_len].long()
    shard, device = join_process_group(pick_device(section.device))
    writes = shard.rank == 0  # the other processes only train
    tracking = stage_run("tomoe", {"tomoe": section.model_dump(), "seed": params.seed}) if writes else nullcontext(None)
    with tracking as tracker:
        # bf16 on a GPU (as the method's recipe); fp32 on a CPU, where it is the exact reference
        model, _ = load_model(ARTIFACTS / "model", "bfloat16" if device.type == "cuda" else "float32", str(device))
        geometry = Geometry.from_config(model.config)
        if section.num_experts > geometry.intermediate_size:
            raise ValueError(f"tomoe.num_experts={section.num_experts} exceeds the MLP width {geometry.intermediate_size}")
        summary = {}
        # the other processes write into a scratch directory that disappears with them
        with atomic_directory(OUT) if writes else tempfile.TemporaryDirectory() as staging:
            staging = Path(staging)
            for p in section.budgets:
                name, config = f"tomoe@{p:g}", training_config(section, p, params.seed)
                start = time.perf_counter()
                result = train_tomoe(
                    model, blocks, config, CHECKPOINTS / f"{name}-{config_hash(config, blocks)}",
                    on_step=lambda step, parts, name=name: tracker and tracker.log_metrics({name: parts}, step=step),
                    shard=shard,
                )
                (staging / name).mkdir()
                save_file({k: v.contiguous() for k, v in result.heads.state_dict().items()}, staging / name / "heads.safetensors")
                write_json(staging / name / "training.json", {"config": dataclasses.asdict(config), "v_topk": result.v_topk, "history": result.history})
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
