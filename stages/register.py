"""Stage register: every exported model logged to MLflow with its lineage and registered, aliases moved.

Reads `registry:`, the models of export_onnx.models (HF directory and artifacts/onnx/<name>),
metrics/evaluate.json and metrics/export_onnx.json. Per model, a run nested under this stage's run
(itself a child of the pipeline's run) gets: the HF directory (`hf/`), the ONNX model (ONNX flavor,
registered as `<prefix>-<method>[-<domain>]`), its evaluate and parity metrics, the datasets it was
made from and evaluated on as MLflow inputs, and lineage tags (git commit, pipeline run, DVC hashes
of the stage's inputs, base model), copied onto the model version. Aliases: `candidate` = the new
version, `champion` = by registry.champion (registry.domain_champion.<domain> for domain models).
Writes metrics/register.json: per model its registered name, version, run and champion.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmcarve.export.verdict import summary
from llmcarve.io import write_json
from llmcarve.jobs.layout import model_dir, onnx_dir
from llmcarve.names import ModelName
from llmcarve.params import ChampionRule, Params
from llmcarve.tracking import stage_run
from llmcarve.tracking.registry import ModelEntry, log_model_version, model_run, registered_name, report_value
from llmcarve.tracking.runs import flatten, git_commit, upstream_hashes
from stages.common import ARTIFACTS, METRICS, main

DATA = ARTIFACTS / "data"


def rule_for(name: str, params: Params) -> ChampionRule:
    registry = params.registry
    return registry.domain_champion.get(ModelName.parse(name).domain, registry.champion)


def source_datasets(name: str, params: Params) -> list[tuple[str, str, str]]:
    """(domain, split, context) of the data a model was made from; the base model came with none."""
    parsed = ModelName.parse(name)
    method, domain = parsed.method, parsed.domain
    calibration = (params.calibrate.domain, "train", "calibration")
    if method == "tomoe":
        return [(params.tomoe.domain, "train", "training")]
    if method == "static":
        return [calibration]
    if method == "twostage":
        return [calibration, (domain, "train", "training")]
    if method in ("atp", "lora"):
        return [(domain, "train", "training")]
    return []


def evaluation_datasets(params: Params) -> list[tuple[str, str, str]]:
    return [(*where.split("/"), "evaluation") for where in params.evaluate.perplexity.corpora.values()]


def numbers(report: dict) -> dict[str, float]:
    """The report's numeric leaves under dotted keys (what MLflow can store as metrics)."""
    return {k: float(v) for k, v in flatten(report).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_rules(params: Params, evaluated: dict[str, dict]) -> None:
    """Every evaluated model has the metric its rule compares, before anything is logged."""
    problems = []
    for name in params.export_onnx.models:
        if name in evaluated:
            try:
                report_value(evaluated[name], rule_for(name, params).metric)
            except KeyError as error:
                problems.append(f"  {name}: {error.args[0]}")
    if problems:
        raise SystemExit("error: registry champion rule names a metric the evaluate report lacks:\n" + "\n".join(problems)
                         + "\n(fix registry.champion / registry.domain_champion .metric, or evaluate the metric)")


def run(params: Params) -> None:
    names = params.export_onnx.models
    evaluated = json.loads((METRICS / "evaluate.json").read_text())["models"] if (METRICS / "evaluate.json").exists() else {}
    parity = json.loads((METRICS / "export_onnx.json").read_text())["models"]
    missing = [name for name in names if name not in parity or not (onnx_dir(name, ARTIFACTS) / "model.onnx").exists()]
    if missing:
        raise SystemExit(f"error: no ONNX export for {missing}; run the export_onnx stage first (dvc repro)")
    check_rules(params, evaluated)
    manifest = json.loads((DATA / "manifest.json").read_text())["domains"]
    with stage_run("register", {"registry": params.registry.model_dump(), "models": names}) as tracker:
        lineage = {
            "git_commit": git_commit(Path(".")),
            "llmcarve.pipeline_run_id": tracker.parent_run_id or "",
            "llmcarve.register_run_id": tracker.run_id,
            "llmcarve.base_model": params.model.source,
            **upstream_hashes("register", Path(".")),
        }
        registered, base_version = {}, None
        for name in names:
            entry = ModelEntry(
                name=name,
                registered_name=registered_name(params.registry.prefix, name),
                hf_dir=model_dir(name, ARTIFACTS),
                onnx_dir=onnx_dir(name, ARTIFACTS),
                kept=ModelName.parse(name).kept,
                metrics=numbers({**evaluated.get(name, {}), "onnx": summary(parity[name])}),
                tags={**lineage, **({"llmcarve.base_model_version": base_version} if base_version else {})},
            )
            with model_run(name, entry.tags, {"model": name, "kept": entry.kept, "base_model": params.model.source}):
                for domain, split, context in [*source_datasets(name, params), *evaluation_datasets(params)]:
                    summary_row = manifest[domain][split]
                    tracker.log_dataset(DATA / domain / f"{split}.jsonl", f"{domain}-{split}-{summary_row['fingerprint'][:8]}", context, rows=[summary_row])
                registered[name] = log_model_version(entry, rule_for(name, params))
            if name == "dense":
                base_version = f"models:/{registered[name]['registered_name']}/{registered[name]['version']}"
        write_json(METRICS / "register.json", {"models": registered})


if __name__ == "__main__":
    main(run, __doc__)
