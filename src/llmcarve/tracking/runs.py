"""One MLflow parent run per pipeline invocation, one child run per stage that ran.

How a stage finds its parent: the orchestrator may pass one in `LLMCARVE_PIPELINE_RUN_ID`; otherwise,
when the stage runs under `dvc repro`, all stages of that one `dvc repro` process share a parent run
keyed by the DVC process (pid and start time). A stage run by hand gets a standalone run.

Lineage tags on every stage run: the git commit, and the DVC hash of every dependency that an
upstream stage produced (read from dvc.lock, which DVC has updated before starting this stage).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

PIPELINE_RUN_ENV = "LLMCARVE_PIPELINE_RUN_ID"
EXPERIMENT_ENV = "LLMCARVE_EXPERIMENT"
DEFAULT_EXPERIMENT = "llmcarve"


def tracking_uri(root: Path) -> str:
    # A SQLite file in the project works with nothing started; `make ui` serves the same file.
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"


def _experiment_id(client, root: Path) -> str:
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Without an explicit location MLflow would put artifacts in ./mlruns of whatever the cwd is.
    return client.create_experiment(name, artifact_location=(root.resolve() / "mlartifacts").as_uri())


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def dvc_invocation_key() -> str | None:
    """Identify the `dvc repro` / `dvc exp run` process this stage runs under, if any."""
    import psutil

    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if any(Path(part).name == "dvc" for part in command[:2]) and ({"repro", "exp"} & set(command)):
            return f"{process.pid}-{int(process.create_time())}"
    return None


def upstream_hashes(stage: str, root: Path) -> dict[str, str]:
    """DVC md5 of each of the stage's dependencies that another stage outputs (from dvc.lock)."""
    dvc_yaml, dvc_lock = root / "dvc.yaml", root / "dvc.lock"
    if not dvc_yaml.exists() or not dvc_lock.exists():
        return {}
    deps = yaml.safe_load(dvc_yaml.read_text())["stages"].get(stage, {}).get("deps", [])
    outs = {
        out["path"]: out.get("md5", "")
        for locked in (yaml.safe_load(dvc_lock.read_text()) or {}).get("stages", {}).values()
        for out in locked.get("outs", [])
    }
    return {f"dvc.dep.{path}": outs[path] for path in deps if path in outs}


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@dataclass
class StageRun:
    run_id: str
    parent_run_id: str | None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        import mlflow

        numeric = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # MLflow metric keys allow only a restricted alphabet; '@' appears in model names like tomoe@0.5.
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in numeric.items()}, step=step)

    def log_dataset(self, path: Path, name: str, context: str, rows: list[dict]) -> None:
        import mlflow
        import pandas as pd

        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(path.resolve()), name=name)
        mlflow.log_input(dataset, context=context)

    def log_artifact(self, path: Path) -> None:
        import mlflow

        mlflow.log_artifact(str(path))


def _pipeline_parent(client, experiment_id: str, root: Path) -> str | None:
    if os.environ.get(PIPELINE_RUN_ENV):
        return os.environ[PIPELINE_RUN_ENV]
    key = dvc_invocation_key()
    if key is None:
        return None
    found = client.search_runs([experiment_id], filter_string=f"tags.`llmcarve.invocation` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {started}",
        tags={"llmcarve.invocation": key, "llmcarve.kind": "pipeline", "git_commit": git_commit(root)},
    )
    return run.info.run_id


def start_pipeline_run(root: Path, name: str, tags: dict[str, str]) -> str:
    """Open the parent run of a pipeline an orchestrator drives; its stages join it via PIPELINE_RUN_ENV."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    run = client.create_run(
        _experiment_id(client, root),
        run_name=name,
        tags={"llmcarve.kind": "pipeline", "git_commit": git_commit(root), **tags},
    )
    return run.info.run_id


def finish_pipeline_run(root: Path, run_id: str, succeeded: bool, tags: dict[str, str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status="FINISHED" if succeeded else "FAILED")


@contextmanager
def stage_run(stage: str, params: dict[str, Any], root: Path | str = ".") -> Iterator[StageRun]:
    """A child MLflow run for `stage`, with its params and lineage tags; the parent is closed after."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root = Path(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    client = MlflowClient()
    experiment_id = _experiment_id(client, root)
    parent = _pipeline_parent(client, experiment_id, root)
    tags = {"llmcarve.stage": stage, "llmcarve.kind": "stage", "git_commit": git_commit(root), **upstream_hashes(stage, root)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield StageRun(run.info.run_id, parent)
    if parent is not None:
        # The parent stays open between stages; each finished stage marks it finished (end time = last stage).
        client.set_terminated(parent)
