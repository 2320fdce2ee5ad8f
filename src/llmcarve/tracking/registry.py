"""The MLflow model registry side of the pipeline: one registered model per method, versions with lineage.

    version = log_model_version(entry, rule)           # inside an MLflow run: HF dir + ONNX flavor, registered
    model, tokenizer = load_registered("models:/llmcarve-tomoe@champion")
    lm = load_registered_onnx("models:/llmcarve-tomoe@champion")    # onnxruntime, no PyTorch needed

Names: `<prefix>-<method>[-<domain>]` from the pipeline's model names (`tomoe@0.5` -> llmcarve-tomoe,
`atp-medical@0.6` -> llmcarve-atp-medical, `dense` -> llmcarve-dense); each budget is a version.
Aliases, not the deprecated stages: `candidate` is the newest version, `champion` the best version under
a `ChampionRule`, judged from the metrics logged on every version's run, so versions of earlier
pipeline runs compete too and the rule may change between runs.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmcarve.names import ModelName
from llmcarve.params import ChampionRule
from llmcarve.tracking.runs import flatten

CANDIDATE, CHAMPION = "candidate", "champion"
HF_ARTIFACTS, ONNX_NAME = "hf", "onnx"  # where a version's run keeps the HF directory; the ONNX model's name
MANIFEST = "export.json"


def registered_name(prefix: str, model_name: str) -> str:
    """`tomoe@0.5` -> `<prefix>-tomoe`; the kept fraction is what distinguishes versions, not names."""
    return f"{prefix}-{ModelName.parse(model_name).series}"


def metric_key(dotted: str) -> str:
    # MLflow metric names allow letters, digits and _-./ and spaces only; '@' appears in model names.
    return dotted.replace("@", "_at_")


def report_value(report: dict, dotted: str) -> float:
    """The number at `dotted` (e.g. ppl.boolq_wikipedia.ppl) in one model's evaluate report."""
    node: Any = report
    for depth, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(dotted.split(".")[:depth]) or "the report"
            keys = ", ".join(sorted(node)) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"'{dotted}': {where} has no '{part}' (it has: {keys})")
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise KeyError(f"'{dotted}' is not a number in the evaluate report (got {type(node).__name__})")
    return float(node)


@dataclass
class ModelEntry:
    """One produced model and everything the registry records about it."""

    name: str                                  # pipeline name, e.g. tomoe@0.5
    registered_name: str
    hf_dir: Path
    onnx_dir: Path
    kept: float                                # 1.0 for the uncarved models (dense, lora-<domain>@1.0)
    metrics: dict[str, float] = field(default_factory=dict)   # flattened evaluate + export reports
    tags: dict[str, str] = field(default_factory=dict)        # lineage: commit, parent run, DVC hashes, base model


@dataclass
class Candidate:
    version: str
    value: float
    active_ratio: float
    kept: float


def competes(candidate: Candidate, rule: ChampionRule) -> bool:
    uncarved = candidate.kept >= 1.0  # nothing was pruned, so no active-ratio budget applies
    return math.isfinite(candidate.value) and (uncarved or candidate.active_ratio <= rule.max_active_ratio + 1e-9)


def best_version(candidates: list[Candidate], rule: ChampionRule) -> str | None:
    """The version the rule prefers (ties go to the newer version), or None when none competes."""
    eligible = [candidate for candidate in candidates if competes(candidate, rule)]
    if not eligible:
        return None
    sign = 1.0 if rule.goal == "minimize" else -1.0
    return min(eligible, key=lambda candidate: (sign * candidate.value, -int(candidate.version))).version


def version_candidates(client, name: str, rule: ChampionRule) -> list[Candidate]:
    """Every version of `name` with the rule's metric and its active ratio, read from the version's run."""
    candidates = []
    for version in client.search_model_versions(f"name = '{name}'"):
        metrics = client.get_run(version.run_id).data.metrics
        key = metric_key(rule.metric)
        if key in metrics and "active_ratio" in metrics:
            kept = float(version.tags.get("llmcarve.kept", "nan"))
            candidates.append(Candidate(str(version.version), metrics[key], metrics["active_ratio"], kept))
    return candidates


@contextmanager
def model_run(model_name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[str]:
    """A run for one model, nested under the active (stage) run; yields its run id."""
    import mlflow

    run_tags = {**tags, "llmcarve.kind": "model", "llmcarve.model": model_name}
    with mlflow.start_run(run_name=f"model {model_name}", nested=True, tags=run_tags) as run:
        mlflow.log_params(params)
        yield run.info.run_id


def log_model_version(entry: ModelEntry, rule: ChampionRule, client=None) -> dict:
    """Log `entry` to the active MLflow run, register it, and move the aliases; returns what was done.

    The run gets the HF directory under `hf/` and the ONNX model through MLflow's ONNX flavor (the
    llmcarve export manifest rides along as an extra file, so onnxruntime can generate from the
    download alone); the version gets the lineage tags, then `candidate`, then `champion` if the rule
    says so. The ONNX flavor registers the model itself (`registered_model_name`).
    """
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    run = mlflow.active_run()
    mlflow.log_metrics({metric_key(key): value for key, value in entry.metrics.items()})
    mlflow.log_artifacts(str(entry.hf_dir), HF_ARTIFACTS)
    info = mlflow.onnx.log_model(
        onnx.load(str(entry.onnx_dir / "model.onnx")),
        name=ONNX_NAME,
        registered_model_name=entry.registered_name,
        extra_files=[str(entry.onnx_dir / MANIFEST)],
        # external data keeps a model over protobuf's 2 GiB limit loadable; small ones stay one file
        save_as_external_data=json.loads((entry.onnx_dir / MANIFEST).read_text())["external_data"],
        metadata={"llmcarve_model": entry.name},
        tags=entry.tags,
    )
    version = str(info.registered_model_version)
    tags = {
        **entry.tags,
        "llmcarve.model": entry.name,
        "llmcarve.kept": f"{entry.kept:g}",
        "llmcarve.hf_artifacts": f"runs:/{run.info.run_id}/{HF_ARTIFACTS}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(entry.registered_name, version, key, value)
    client.set_registered_model_alias(entry.registered_name, CANDIDATE, version)
    champion = best_version(version_candidates(client, entry.registered_name, rule), rule)  # may be an older version
    if champion is not None:
        client.set_registered_model_alias(entry.registered_name, CHAMPION, champion)
    return {"registered_name": entry.registered_name, "version": version, "run_id": run.info.run_id, "model_uri": info.model_uri, "champion": champion}


def _resolve(uri: str, client):
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> the model version."""
    if not uri.startswith("models:/"):
        raise ValueError(f"expected models:/<name>@<alias> or models:/<name>/<version>, got '{uri}'")
    path = uri.removeprefix("models:/")
    if "@" in path:
        name, alias = path.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = path.rsplit("/", 1)
    return client.get_model_version(name, version)


def load_registered(uri: str, dst: str | Path | None = None, dtype: str = "float32"):
    """The PyTorch model and tokenizer of a registered version (its run's HF directory), loaded the
    project's way: safetensors only, no code from the download (`llmcarve.models.loading.load_model`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from llmcarve.models.loading import load_model

    version = _resolve(uri, MlflowClient())
    dst = Path(dst or tempfile.mkdtemp(prefix="llmcarve-registered-"))
    local = mlflow.artifacts.download_artifacts(version.tags["llmcarve.hf_artifacts"], dst_path=str(dst))
    return load_model(local, dtype=dtype)


def load_registered_onnx(uri: str, dst: str | Path | None = None, threads: int | None = None):
    """An `OnnxCausalLM` (onnxruntime, greedy generation included) for a registered version."""
    import mlflow

    from llmcarve.export.onnx import OnnxExport
    from llmcarve.export.runtime import OnnxCausalLM

    dst = Path(dst or tempfile.mkdtemp(prefix="llmcarve-registered-"))
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    manifest = next(local.rglob(MANIFEST), None)
    if manifest is None:
        raise FileNotFoundError(f"{uri} has no {MANIFEST}: it was not registered by llmcarve's register stage")
    return OnnxCausalLM(OnnxExport.load(local, manifest=manifest), threads=threads)
