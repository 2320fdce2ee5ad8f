"""A throwaway llmcarve project (git + DVC, the real stages) on a tiny configuration of the real model."""

import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


def tiny_params(model_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = str(model_dir)  # the local-directory path of `model:`
    params["data"]["block_size"] = 64
    sources = params["data"]["sources"]
    sources["squad_wikipedia"]["max_documents"] = 40
    sources["boolq_wikipedia"]["max_documents"] = 40
    params["data"]["domains"] = {"general": {"train": ["squad_wikipedia"], "heldout": ["boolq_wikipedia"], "heldout_fraction": 0.0}}
    params["calibrate"] = {"domain": "general", "num_blocks": 4, "batch_size": 2}
    # 4 steps do not reach the budget: a smoke project lets tomoe@0.5 measure anything
    params["tomoe"].update(budgets=[0.5], seq_len=32, steps=4, num_experts=4, checkpoint_every=2, name_tolerance=1.0)
    params["static"] = {"budgets": [0.5]}
    params["atp"].update(domains=["general"], budgets=[0.5], seq_len=32, steps=6, batch_size=1, calibration_blocks=2, checkpoint_every=3)
    evaluate = params["evaluate"]
    evaluate["perplexity"] = {"seq_len": 512, "max_windows": 3, "corpora": {"boolq_wikipedia": "general/heldout"}}
    evaluate["zero_shot"] = {"arc_easy": {"builtin": "arc_easy"}, "boolq": {"builtin": "boolq"}}
    evaluate["zero_shot_limit"] = 6
    evaluate["domain_tasks"] = {"medqa": {"builtin": "medqa"}}
    evaluate["domain_limit"] = 4
    evaluate["speed"] = {"prefill_tokens": 32, "decode_tokens": 4, "repeats": 1}
    evaluate["recovery"] = {"general": {"perplexity": ["boolq_wikipedia"], "tasks": ["medqa"]}}
    evaluate["models"] = ["dense", "tomoe@0.5", "static@0.5", "lora-general@1.0", "atp-general@0.5", "twostage-general@0.5"]
    # one real model through ONNX and the registry: each export of SmolLM2 takes about a minute
    params["export_onnx"].update(models=["static@0.5"], greedy_tokens=8, speed={"prefill_tokens": 16, "repeats": 1})
    params["registry"]["domain_champion"] = {}  # the shipped rules name medical and legal, which this file lacks
    return params


@contextmanager
def scratch_dir(tmp_path_factory, name: str):
    """A temporary directory removed when the block ends. A tiny project still holds several copies of the
    real model (about 6 GB with its DVC cache and MLflow store); kept to the end of the session, two such
    projects doubled the suite's peak disk use past what a CI machine had free."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_project(work: Path, params: dict, orchestration: bool = False) -> Path:
    """Copy the real stages, library and dvc.yaml (and flows/ + prefect.yaml) into `work`; commit it."""
    shutil.copytree(ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")
    if orchestration:
        shutil.copytree(ROOT / "flows", work / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "prefect.yaml", work / "prefect.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny project"], cwd=work, check=True)
    return work


def offline_env(work: Path) -> dict[str, str]:
    """A minimal environment for the project's commands: the venv's tools, offline, MLflow in the project."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(work),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
