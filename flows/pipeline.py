"""The carving pipeline as a Prefect flow: one task per DVC stage, run through DVC in a flow workspace.

    prefect deployment run 'carve-pipeline/on-demand' --param overrides='{"tomoe.steps": 200}'

Parameters override params.yaml for this run only; the run becomes a named DVC experiment in the
project (`dvc exp show`) and one MLflow parent run that links back to the flow run (and vice versa).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.workspace import FlowWorkspace, StageFailed
from llmcarve.tracking import PIPELINE_RUN_ENV, finish_pipeline_run, start_pipeline_run, tracking_uri

PROJECT_ENV = "LLMCARVE_PROJECT_DIR"


def project_dir(given: str | None) -> Path:
    # A deployment's pull step sets the working directory to the checkout; a parameter or env var may name another.
    return Path(given or os.environ.get(PROJECT_ENV) or ".").resolve()


def retry_only_transient(task, task_run, state) -> bool:
    """A stage killed from outside is retried; a stage that raised its own error is not."""
    try:
        state.result()
    except StageFailed as failure:
        return failure.transient
    except Exception:
        return False
    return False


def run_status_after(error: BaseException) -> str:
    """The MLflow status of a pipeline stopped by `error`: KILLED when killed from outside, else FAILED.

    A stage killed by a signal, a cancelled flow run (Prefect signals the flow's process) and Ctrl-C are
    kills; BaseExceptions that are not Exceptions are how Python and Prefect deliver them.
    """
    if isinstance(error, StageFailed):
        return "KILLED" if error.killed else "FAILED"
    return "FAILED" if isinstance(error, Exception) else "KILLED"


# DVC is the cache: Prefect never skips a stage on its own (NO_CACHE).
@task(name="dvc-stage", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30, retry_condition_fn=retry_only_transient, task_run_name="{stage}")
def run_stage(workspace: FlowWorkspace, stage: str, env: dict[str, str]) -> str:
    logger = get_run_logger()
    workspace.run_stage(stage, env, log=logger.info)
    return stage


def link_flow_run_to(mlflow_run_id: str, uri: str) -> None:
    """Tag the flow run with its MLflow parent run (the parent run carries the flow run id in turn)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, f"mlflow-run:{mlflow_run_id}"])
    create_markdown_artifact(
        key="mlflow-run",
        markdown=f"MLflow parent run `{mlflow_run_id}` in `{uri}` (open with `make ui`).",
        description="Where this flow run's metrics, params and model lineage are recorded",
    )


@flow(name="carve-pipeline", log_prints=True)
def carve_pipeline(
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    experiment: str | None = None,
    project: str | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Run the DVC stages (all, or the listed ones in pipeline order) with params overrides.

    overrides: dotted params keys and values, e.g. {"tomoe.budgets": [0.5], "tomoe.steps": 200}.
    experiment: the DVC experiment name (default: the flow run's name).
    Returns the experiment name, the commit it ran on and metrics/evaluate.json when evaluate ran.
    """
    logger = get_run_logger()
    root = project_dir(project)
    overrides = dict(overrides or {})
    space = FlowWorkspace.for_project(root, workspace)
    with space.locked(on_wait=logger.info):
        commit = space.sync()
        space.write_params(overrides)  # validated here: a bad override fails before any stage runs
        known = space.stage_names()
        unknown = sorted(set(stages or []) - set(known))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {known}")
        selected = [name for name in known if stages is None or name in stages]
        name = experiment or flow_run.name or "flow-run"
        uri = tracking_uri(root)
        run_id = start_pipeline_run(
            root,
            f"pipeline {name}",
            {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name), "dvc.experiment": name,
             "llmcarve.overrides": str(overrides)[:5000]},
        )
        link_flow_run_to(run_id, uri)
        env = {PIPELINE_RUN_ENV: run_id, "MLFLOW_TRACKING_URI": uri}
        logger.info("commit %s, stages %s, overrides %s, MLflow run %s", commit[:12], selected, overrides, run_id)
        try:
            for stage in selected:
                run_stage(space, stage, env)
            space.save_experiment(name)
        except BaseException as error:
            finish_pipeline_run(root, run_id, status=run_status_after(error))
            raise
        # only now, after the last stage and the experiment's save, is the pipeline run finished
        finish_pipeline_run(root, run_id, status="FINISHED")
        evaluation = space.read_json("metrics/evaluate.json") if "evaluate" in selected else None
    return {"experiment": name, "commit": commit, "mlflow_run_id": run_id, "evaluate": evaluation}
