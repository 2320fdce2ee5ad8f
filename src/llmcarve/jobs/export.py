"""Exporting one model directory to ONNX and checking the graph against PyTorch."""

from __future__ import annotations

import time
from pathlib import Path

from llmcarve.export import check_parity, export_onnx
from llmcarve.io import ensure_free_space
from llmcarve.models.loading import load_model, saved_model_bytes
from llmcarve.params import ExportOnnxParams


def export_and_check(model_dir: Path, out: Path, section: ExportOnnxParams, seed: int, what: str) -> dict:
    """Export the model in `model_dir` (float32) to `out`, then the parity report with export and check times.

    `what` names the export in a disk-space error. The graph and its weights take about twice the model's bytes.
    """
    model, _ = load_model(model_dir, dtype="float32")
    ensure_free_space(out, 2 * saved_model_bytes(model), f"the ONNX export of {what}")
    start = time.perf_counter()
    export = export_onnx(model, out, optimize=section.optimize)
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
