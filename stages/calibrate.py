"""Stage calibrate: dense per-channel activation statistics on calibration blocks.

Reads `calibrate:` and the packed training blocks of its domain; writes
artifacts/calibration/stats.safetensors (summed squared activations, see llmcarve.calibration) and
metrics/calibrate.json.
"""

from __future__ import annotations

import time

from safetensors.torch import save_file

from llmcarve.calibration import collect_channel_stats
from llmcarve.io import atomic_directory, write_json
from llmcarve.jobs.calibrate import select_calibration_blocks
from llmcarve.jobs.layout import load_training_blocks
from llmcarve.models.loading import load_model
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "calibration"


def run(params: Params) -> None:
    section = params.calibrate
    blocks = select_calibration_blocks(load_training_blocks(section.domain, artifacts=ARTIFACTS), section.num_blocks, params.seed, "calibrate.num_blocks")
    with stage_run("calibrate", {"calibrate": section.model_dump(), "seed": params.seed}) as tracker:
        model, _ = load_model(ARTIFACTS / "model")
        start = time.perf_counter()
        stats = collect_channel_stats(model, blocks, batch_size=section.batch_size)
        with atomic_directory(OUT) as staging:
            save_file(stats, staging / "stats.safetensors", metadata={"domain": section.domain, "seed": str(params.seed)})
        report = {"tokens": int(stats["tokens"]), "blocks": len(blocks), "block_size": blocks.shape[1], "seconds": time.perf_counter() - start}
        write_json(METRICS / "calibrate.json", report)
        tracker.log_metrics(report)


if __name__ == "__main__":
    main(run, __doc__)
