"""End to end: `dvc repro` on a tiny configuration of the real embedded model, then MLflow's view of it."""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.project import DVC, make_project, offline_env, scratch_dir, tiny_params

STAGES = ["prepare_model", "prepare_data", "calibrate", "tomoe", "atp", "lora_baselines", "remove", "evaluate", "export_onnx", "register"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2_dir) -> Iterator[Path]:
    """A fresh git + DVC project with the real stages and dvc.yaml, and a tiny params.yaml."""
    with scratch_dir(tmp_path_factory, "pipeline") as work:
        yield make_project(work, tiny_params(smollm2_dir))


def repro(work: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([DVC, "repro"], cwd=work, env=offline_env(work), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def mlflow_runs(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    return mlflow.search_runs(experiment_names=["llmcarve"], output_format="list")


@pytest.mark.slow
def test_dvc_repro_end_to_end(workspace):
    repro(workspace)
    models = json.loads((workspace / "metrics" / "evaluate.json").read_text())["models"]
    report = models["dense"]
    assert report["params_total"] == 134_515_008
    assert report["active_ratio"] == 1.0
    # a real model on real Wikipedia text: near the reference 21 (3 windows only, so a wide band);
    # a broken model or tokenizer lands in the thousands
    assert 12 < report["ppl"]["boolq_wikipedia"]["ppl"] < 35
    assert report["ppl"]["boolq_wikipedia"]["windows"] == 3
    for task in ("arc_easy", "boolq"):
        assert report["zero_shot"][task]["n"] == 6 and 0 <= report["zero_shot"][task]["acc"] <= 1
    assert report["domain"]["medqa"]["n"] == 4
    assert report["speed"]["prefill_tokens_per_s"] > 0 and report["speed"]["decode_tokens_per_s"] > 0
    assert (workspace / "plots" / "evaluate.png").stat().st_size > 1000
    assert (workspace / "plots" / "perplexity_vs_active.png").stat().st_size > 1000
    # the carved models load with from_pretrained and are measured, not assumed
    assert models["static@0.5"]["active_ratio"] == pytest.approx(0.5, abs=0.01)
    assert models["static@0.5"]["params_total"] < report["params_total"]
    assert 0 < models["tomoe@0.5"]["active_ratio"] <= 1.0
    assert (workspace / "artifacts" / "remove" / "tomoe@0.5" / "config.json").exists()
    assert (workspace / "artifacts" / "calibration" / "stats.safetensors").exists()
    # ATP and its baselines at the same kept fraction; compact models physically smaller
    assert models["atp-general@0.5"]["active_ratio"] == pytest.approx(0.5, abs=0.02)
    assert models["twostage-general@0.5"]["active_ratio"] == pytest.approx(0.5, abs=0.01)
    assert models["atp-general@0.5"]["params_total"] < report["params_total"]
    assert models["lora-general@1.0"]["params_total"] == report["params_total"]
    recovered = models["atp-general@0.5"]["recovered"]
    assert set(recovered) == {"vs_dense", "vs_lora"} and 0 < recovered["vs_dense"]["mean"] < 2
    removal = json.loads((workspace / "metrics" / "remove.json").read_text())["atp-general@0.5"]["removal"]
    assert removal["max_abs_logit_diff"] < 1e-3
    manifest = json.loads((workspace / "artifacts" / "data" / "manifest.json").read_text())
    assert manifest["domains"]["general"]["heldout"]["documents"] == 40

    runs = mlflow_runs(workspace)
    parents = [r for r in runs if r.data.tags.get("llmcarve.kind") == "pipeline"]
    assert len(parents) == 1, "one dvc repro must be one parent run"
    children = {r.data.tags["llmcarve.stage"]: r for r in runs if r.data.tags.get("llmcarve.kind") == "stage"}
    assert sorted(children) == sorted(STAGES)
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["git_commit"]
    assert "dvc.dep.artifacts/model" in children["evaluate"].data.tags
    assert children["evaluate"].data.metrics["models.dense.ppl.boolq_wikipedia.ppl"] == pytest.approx(report["ppl"]["boolq_wikipedia"]["ppl"])
    assert children["prepare_data"].inputs.dataset_inputs, "datasets must be logged as MLflow inputs"

    # ONNX: the exported graph computes what PyTorch computes and generates the same tokens
    exported = json.loads((workspace / "metrics" / "export_onnx.json").read_text())["models"]
    assert set(exported) == {"static@0.5"}
    parity = exported["static@0.5"]
    assert parity["rel_err"] <= 1e-4 and parity["greedy_match"] and parity["greedy_tokens"] == 8
    assert parity["file_bytes"] == sum(p.stat().st_size for p in (workspace / "artifacts" / "onnx" / "static@0.5").glob("model.onnx*"))
    assert parity["speed"]["onnxruntime"]["decode_tokens_per_s"] > 0 and parity["speed"]["pytorch"]["prefill_tokens_per_s"] > 0

    # the registry: a version with aliases, its own run under the register stage, lineage on the version
    from mlflow.tracking import MlflowClient

    registered = json.loads((workspace / "metrics" / "register.json").read_text())["models"]["static@0.5"]
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    assert registered["registered_name"] == "llmcarve-static"
    for alias in ("candidate", "champion"):
        assert str(client.get_model_version_by_alias("llmcarve-static", alias).version) == registered["version"]  # int from a SQLite store
    version = client.get_model_version("llmcarve-static", registered["version"])
    model_run = client.get_run(version.run_id)
    assert model_run.data.tags["mlflow.parentRunId"] == children["register"].info.run_id
    assert version.tags["llmcarve.pipeline_run_id"] == parents[0].info.run_id
    assert version.tags["llmcarve.base_model"] == yaml.safe_load((workspace / "params.yaml").read_text())["model"]["source"]
    assert version.tags["dvc.dep.artifacts/remove"].endswith(".dir") and version.tags["git_commit"]
    assert model_run.data.metrics["active_ratio"] == pytest.approx(models["static@0.5"]["active_ratio"])
    contexts = {tag.value for entry in model_run.inputs.dataset_inputs for tag in entry.tags if tag.key == "mlflow.data.context"}
    assert contexts == {"calibration", "evaluation"}

    # A second repro changes nothing and logs nothing.
    second = repro(workspace)
    assert "didn't change, skipping" in second.stdout
    assert len(mlflow_runs(workspace)) == len(runs)
