"""Stage export_onnx: the models named in export_onnx.models to ONNX, each checked against PyTorch.

Reads `export_onnx:` and the model directories (`stages.evaluate.model_dir`); writes
artifacts/onnx/<name>/ (model.onnx: one graph for prefill and decoding with past keys/values, plus
export.json) and metrics/export_onnx.json: per model max_abs_diff, rel_err, greedy_match (onnxruntime's
greedy tokens against PyTorch's), file_bytes, onnxruntime against PyTorch CPU speed, and for MoE models
the per-expert checks. The metrics are written first; then a model over export_onnx.max_rel_err, with
a differing greedy token or, for an MoE model, a missing or differing expert fails the stage.
"""

from __future__ import annotations

import logging
import time

from llmcarve.export import check_parity, export_onnx
from llmcarve.io import atomic_directory, ensure_free_space, write_json
from llmcarve.models.loading import load_model, saved_model_bytes
from llmcarve.params import ExportOnnxParams, Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main
from stages.evaluate import model_dir

OUT = ARTIFACTS / "onnx"
log = logging.getLogger("export_onnx")


def export_and_check(name: str, section: ExportOnnxParams, staging, seed: int) -> dict:
    model, _ = load_model(model_dir(name), dtype="float32")
    ensure_free_space(staging, 2 * saved_model_bytes(model), f"the ONNX export of {name}")
    start = time.perf_counter()
    export = export_onnx(model, staging / name, optimize=section.optimize)
    exported = time.perf_counter()
    speed = section.speed
    report = check_parity(
        model,
        export,
        new_tokens=section.greedy_tokens,
        seed=seed,
        timing=speed is not None,
        **({"prefill_tokens": speed.prefill_tokens, "repeats": speed.repeats} if speed else {}),
    )
    report["export_seconds"] = exported - start
    report["check_seconds"] = time.perf_counter() - exported
    return report


def failures(results: dict[str, dict], max_rel_err: float) -> dict[str, str]:
    """What is wrong with each model whose export does not compute what PyTorch computes."""
    failed = {}
    for name, report in results.items():
        problems = []
        if report["rel_err"] > max_rel_err:
            problems.append(f"logits rel_err {report['rel_err']:.2e} > export_onnx.max_rel_err {max_rel_err:g}")
        if not report["greedy_match"]:
            problems.append(f"greedy tokens differ from token {report['greedy_first_mismatch']} on")
        experts = report.get("expert_parity")
        if experts is not None:
            if report["expert_weights_missing"]:
                problems.append(f"expert weights missing from the graph: {report['expert_weights_missing'][:3]}")
            if experts["max_rel_err"] > max_rel_err:
                problems.append(f"routed-expert rel_err {experts['max_rel_err']:.2e} > {max_rel_err:g}")
        if problems:
            failed[name] = "; ".join(problems)
    return failed


def summary(report: dict) -> dict:
    """The numbers worth a metric in MLflow (the full report is the stage's JSON)."""
    numbers = {key: report[key] for key in ("max_abs_diff", "rel_err", "file_bytes", "export_seconds")}
    numbers["greedy_match"] = float(report["greedy_match"])
    if "speed" in report:
        numbers.update(prefill_speedup=report["speed"]["prefill_speedup"], decode_speedup=report["speed"]["decode_speedup"])
    return numbers


def run(params: Params) -> None:
    section = params.export_onnx
    missing = [name for name in section.models if not (model_dir(name) / "config.json").exists()]
    if missing:
        raise SystemExit(f"error: no model directory for {missing}; run the stages that produce them first (dvc repro)")
    with stage_run("export_onnx", {"export_onnx": section.model_dump(), "seed": params.seed}) as tracker:
        results = {}
        with atomic_directory(OUT) as staging:
            for name in section.models:
                log.info("exporting %s", name)
                results[name] = export_and_check(name, section, staging, params.seed)
        write_json(METRICS / "export_onnx.json", {"models": results})
        tracker.log_metrics({"models": {name: summary(report) for name, report in results.items()}})
        failed = failures(results, section.max_rel_err)
        if failed:
            lines = "\n".join(f"  {name}: {problem}" for name, problem in failed.items())
            raise SystemExit(f"error: these ONNX exports do not compute what PyTorch computes:\n{lines}")


if __name__ == "__main__":
    main(run, __doc__)
