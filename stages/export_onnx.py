"""Stage export_onnx: the models named in export_onnx.models to ONNX, each checked against PyTorch.

Reads `export_onnx:` and the model directories (`llmcarve.jobs.layout.model_dir`); writes
artifacts/onnx/<name>/ (model.onnx: one graph for prefill and decoding with past keys/values, plus
export.json) and metrics/export_onnx.json: per model max_abs_diff, rel_err, greedy_match (onnxruntime's
greedy tokens against PyTorch's), file_bytes, onnxruntime against PyTorch CPU speed, and for MoE models
the per-expert checks, with the near-ties each check met counted apart (`near_ties`). The metrics are
written first; then a model over export_onnx.max_rel_err, with a differing greedy token that no
near-tie explains or, for an MoE model, a missing or differing expert fails the stage (`failures`).
"""

from __future__ import annotations

import logging

from llmcarve.export.verdict import failures, near_tie_count, summary
from llmcarve.io import atomic_directory, write_json
from llmcarve.jobs.export import export_and_check
from llmcarve.jobs.layout import model_dir
from llmcarve.params import Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "onnx"
log = logging.getLogger("export_onnx")


def run(params: Params) -> None:
    section = params.export_onnx
    missing = [name for name in section.models if not (model_dir(name, ARTIFACTS) / "config.json").exists()]
    if missing:
        raise SystemExit(f"error: no model directory for {missing}; run the stages that produce them first (dvc repro)")
    with stage_run("export_onnx", {"export_onnx": section.model_dump(), "seed": params.seed}) as tracker:
        results = {}
        with atomic_directory(OUT) as staging:
            for name in section.models:
                log.info("exporting %s", name)
                results[name] = export_and_check(model_dir(name, ARTIFACTS), staging / name, section, params.seed, name)
                if near_tie_count(results[name]):
                    log.info("%s: %d near-ties, reported apart (near_tie_tokens in the metrics)", name, near_tie_count(results[name]))
        write_json(METRICS / "export_onnx.json", {"models": results})
        tracker.log_metrics({"models": {name: summary(report) for name, report in results.items()}})
        failed = failures(results, section.max_rel_err)
        if failed:
            lines = "\n".join(f"  {name}: {problem}" for name, problem in failed.items())
            raise SystemExit(f"error: these ONNX exports do not compute what PyTorch computes:\n{lines}")


if __name__ == "__main__":
    main(run, __doc__)
