"""Stage prepare_model: save the configured model as a plain safetensors HF directory.

Reads `model:`; writes artifacts/model/ (weights, config, tokenizer) and metrics/prepare_model.json.
"""

from __future__ import annotations

import time

from llmcarve.eval.accounting import parameter_report
from llmcarve.io import atomic_directory, write_json
from llmcarve.models.loading import load_model, materialize
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "model"


def run(params: Params) -> None:
    with stage_run("prepare_model", {"model": params.model.model_dump()}) as tracker:
        start = time.perf_counter()
        with atomic_directory(OUT) as staging:
            # materialize checks free disk space before it writes into the staging directory
            materialize(params.model.source, staging, params.model.dtype, params.model.allow_pickle_weights)
        model, _ = load_model(OUT)
        report = {"source": params.model.source, "model_type": model.config.model_type, "seconds": time.perf_counter() - start}
        report.update({k: v for k, v in parameter_report(model, context_len=512).items() if k.startswith("params")})
        write_json(METRICS / "prepare_model.json", report)
        tracker.log_metrics(report)


if __name__ == "__main__":
    main(run, __doc__)
