"""End to end: `dvc repro` on a tiny configuration of the real embedded model, then MLflow's view of it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmcarve.models.loading import materialize

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
STAGES = ["prepare_model", "prepare_data", "calibrate", "tomoe", "remove", "evaluate"]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 dequantised once per test session (about 30 s)."""
    return materialize("embedded:smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "model")


def tiny_params(model_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = str(model_dir)  # the local-directory path of `model:`
    params["data"]["block_size"] = 64
    sources = params["data"]["sources"]
    sources["squad_wikipedia"]["max_documents"] = 40
    sources["boolq_wikipedia"]["max_documents"] = 40
    params["data"]["domains"] = {"general": {"train": ["squad_wikipedia"], "heldout": ["boolq_wikipedia"], "heldout_fraction": 0.0}}
    params["calibrate"] = {"domain": "general", "num_blocks": 4, "batch_size": 2}
    params["tomoe"].update(budgets=[0.5], seq_len=32, steps=4, num_experts=4, checkpoint_every=2)
    params["static"] = {"budgets": [0.5]}
    evaluate = params["evaluate"]
    evaluate["perplexity"] = {"seq_len": 512, "max_windows": 3, "corpora": {"boolq_wikipedia": "general/heldout"}}
    evaluate["zero_shot"] = {"arc_easy": {"builtin": "arc_easy"}, "boolq": {"builtin": "boolq"}}
    evaluate["zero_shot_limit"] = 6
    evaluate["domain_tasks"] = {"medqa": {"builtin": "medqa"}}
    evaluate["domain_limit"] = 4
    evaluate["speed"] = {"prefill_tokens": 32, "decode_tokens": 4, "repeats": 1}
    evaluate["models"] = ["dense", "tomoe@0.5", "static@0.5"]
    return params


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smollm2_dir) -> Path:
    """A fresh git + DVC project with the real stages and dvc.yaml, and a tiny params.yaml."""
    work = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(smollm2_dir)))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=work, check=True)
    return work


def repro(work: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(work),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    result = subprocess.run([DVC, "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
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

    # A second repro changes nothing and logs nothing.
    second = repro(workspace)
    assert "didn't change, skipping" in second.stdout
    assert len(mlflow_runs(workspace)) == len(runs)
