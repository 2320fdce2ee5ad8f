"""One MLflow parent run per pipeline invocation, one child run per stage that ran.

How a stage finds its parent: the orchestrator may pass one in `LLMCARVE_PIPELINE_RUN_ID`; otherwise,
when the stage runs under `dvc repro`, all stages of that one `dvc repro` process share a parent run
keyed by the DVC process (pid and start time). A stage run by hand gets a standalone run.

Who closes the parent, and with which status:
- An orchestrator's parent is closed by the orchestrator (`finish_pipeline_run`); stages never touch it.
- Under `dvc repro`, a stage that fails marks the parent FAILED at once (KILLED when interrupted), and
  the last stage of the repro marks it FINISHED (or FAILED/KILLED if an earlier stage of it was). "The
  last stage" is the stage of the repro that depends, through dvc.yaml's deps and outs, on every other
  stage of it, so DVC runs it last whatever order it picks for the others; the repro's stages come from
  the DVC command line (no targets: all of dvc.yaml; targets: them and their upstream stages;
  `--single-item`: the targets alone). When that set cannot be read from the command line (options such
  as `--downstream` or `--glob`), or the last stage is skipped as unchanged, no stage closes the parent
  and the next start does (below).
- A process killed outright (SIGKILL, OOM) runs no code, so every run records its host and the process
  whose life it spans. Whenever a stage or a pipeline starts, the RUNNING runs of this host whose process
  is gone are closed: a stage run as KILLED; a `dvc repro` parent with the worst status of its stages
  (KILLED, else FAILED, else FINISHED: all its stages finished and DVC skipped the rest); an
  orchestrator's parent as KILLED, since its orchestrator died before closing it.

Lineage tags on every stage run: the git commit, and the DVC hash of every dependency that an
upstream stage produced (read from dvc.lock, which DVC has updated before starting this stage).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "LLMCARVE_PIPELINE_RUN_ID"
EXPERIMENT_ENV = "LLMCARVE_EXPERIMENT"
DEFAULT_EXPERIMENT = "llmcarve"
# Tags that let a later start tell a run whose process died from one still in progress.
HOST_TAG = "llmcarve.host"
PROCESS_TAG = "llmcarve.process"  # "<pid>-<start time>": a pid alone may be reused by another process
INVOCATION_TAG = "llmcarve.invocation"
# Worst first: a pipeline is as bad as its worst stage.
STATUS_SEVERITY = ("KILLED", "FAILED", "FINISHED")


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


# ------------------------------------------------------------------------------------------------
# processes: which one a run belongs to, and whether it still lives


def process_key(process=None) -> str:
    import psutil

    process = process or psutil.Process()
    return f"{process.pid}-{int(process.create_time())}"


def process_alive(key: str) -> bool:
    """Whether the process named by `process_key` still runs; an unreadable key counts as alive (left alone)."""
    import psutil

    try:
        pid, created = (int(part) for part in key.split("-"))
    except ValueError:
        return True
    try:
        process = psutil.Process(pid)
        # a zombie has exited; only its parent has not collected its exit status yet
        return int(process.create_time()) == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. AccessDenied: it exists
        return True


def run_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PROCESS_TAG: process_key()}


# ------------------------------------------------------------------------------------------------
# the `dvc repro` this stage runs under, and the stages it runs


@dataclass(frozen=True)
class DvcInvocation:
    key: str  # process_key of the DVC process
    command: list[str]


def dvc_invocation() -> DvcInvocation | None:
    """The `dvc repro` / `dvc exp run` process this stage runs under, if any."""
    import psutil

    for process in psutil.Process().parents():
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if any(Path(part).name == "dvc" for part in command[:2]) and ({"repro", "exp"} & set(command)):
            return DvcInvocation(process_key(process), command)
    return None


def dvc_invocation_key() -> str | None:
    invocation = dvc_invocation()
    return invocation.key if invocation else None


# Options that leave the set of stages as "the targets and their upstream stages".
_FLAGS = {
    "-f", "--force", "-k", "--keep-going", "--ignore-errors", "--no-run-cache", "--force-downstream", "--pull",
    "--allow-missing", "--wait-for-lock", "-q", "--quiet", "-v", "--verbose", "--no-commit", "--temp",
}
_SINGLE_ITEM = {"-s", "--single-item"}
# Options of `dvc exp run` that take a value (`-m` there is the message; in `dvc repro` it is --metrics).
_EXP_RUN_VALUE_OPTIONS = {"-S", "--set-param", "-n", "--name", "-m", "--message", "-C", "--copy-paths"}


def _repro_arguments(command: list[str]) -> tuple[list[str], list[str]] | None:
    """(options, targets) of a `dvc repro` or `dvc exp run` command line; None if it is neither."""
    for index, word in enumerate(command):
        if word == "repro":
            return _split_arguments(command[index + 1 :], value_options=set(), flags=_FLAGS | {"-m", "--metrics"})
        if word == "exp" and command[index + 1 : index + 2] == ["run"]:
            return _split_arguments(command[index + 2 :], value_options=_EXP_RUN_VALUE_OPTIONS, flags=_FLAGS)
    return None


def _split_arguments(words: list[str], value_options: set[str], flags: set[str]) -> tuple[list[str], list[str]] | None:
    options, targets, words = [], [], list(words)
    while words:
        word = words.pop(0)
        name = word.split("=", 1)[0]
        if name in value_options:
            if "=" not in word:
                words = words[1:]
        elif word in flags or word in _SINGLE_ITEM:
            options.append(word)
        elif word.startswith("-"):
            return None  # an option whose effect on the set of stages is not modelled here
        else:
            targets.append(word)
    return options, targets


def _outputs(stage: dict) -> list[str]:
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in stage.get(section, []) or []:
            paths.extend([entry] if isinstance(entry, str) else list(entry))
    return paths


def _overlaps(dependency: str, output: str) -> bool:
    dependency, output = dependency.rstrip("/"), output.rstrip("/")
    return dependency == output or dependency.startswith(output + "/") or output.startswith(dependency + "/")


def upstream_stages(stages: dict[str, dict], name: str) -> set[str]:
    """Every stage that `name` depends on through dvc.yaml's deps and outs, transitively."""
    found: set[str] = set()
    pending = [name]
    while pending:
        deps = stages[pending.pop()].get("deps", []) or []
        for other, spec in stages.items():
            if other not in found and any(_overlaps(dep, out) for dep in deps for out in _outputs(spec)):
                found.add(other)
                pending.append(other)
    found.discard(name)
    return found


def stages_in_repro(command: list[str], stages: dict[str, dict]) -> set[str] | None:
    """The stages a DVC command line reproduces (run or skipped as unchanged); None if unknown."""
    parsed = _repro_arguments(command)
    if parsed is None or any("foreach" in spec or "matrix" in spec for spec in stages.values()):
        return None
    options, targets = parsed
    names = set()
    for target in targets:
        name = target.split(":", 1)[1] if ":" in target else target
        if Path(target).name == "dvc.yaml":
            names.update(stages)
        elif name in stages:
            names.add(name)
        else:
            return None  # a directory, a glob, another dvc.yaml: not modelled
    if not targets:
        return set(stages)
    if _SINGLE_ITEM & set(options):
        return names
    return names.union(*(upstream_stages(stages, name) for name in names))


def is_last_stage(stage: str, command: list[str], root: Path) -> bool:
    """Whether `stage` runs last in this repro: it depends on every other stage the repro reproduces."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        return False
    stages = yaml.safe_load(dvc_yaml.read_text()).get("stages", {})
    selected = stages_in_repro(command, stages)
    if selected is None or stage not in selected:
        return False
    return selected - {stage} <= upstream_stages(stages, stage)


# ------------------------------------------------------------------------------------------------
# statuses


def worst_status(statuses: list[str]) -> str:
    return next((status for status in STATUS_SEVERITY if status in statuses), "FINISHED")


def _child_statuses(client, experiment_id: str, parent_id: str) -> list[str]:
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return [child.info.status for child in children]


def close_stale_runs(client, experiment_id: str) -> list[str]:
    """Close this host's RUNNING runs whose process is gone (see the module docstring); returns their ids."""
    running = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    )
    dead = [run for run in running if not process_alive(run.data.tags.get(PROCESS_TAG, ""))]
    # stages first: a dvc parent's status is read from its stages
    dead.sort(key=lambda run: run.data.tags.get("llmcarve.kind") == "pipeline")
    for run in dead:
        tags = run.data.tags
        if tags.get("llmcarve.kind") == "pipeline" and INVOCATION_TAG in tags:
            status = worst_status(_child_statuses(client, experiment_id, run.info.run_id))
        else:
            status = "KILLED"
        client.set_terminated(run.info.run_id, status=status)
        log.warning("MLflow run %s (%s) was still RUNNING but its process is gone: marked %s", run.info.run_id,
                    run.info.run_name, status)
    return [run.info.run_id for run in dead]


# ------------------------------------------------------------------------------------------------
# lineage


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


# ------------------------------------------------------------------------------------------------
# pipeline (parent) runs


@dataclass(frozen=True)
class PipelineParent:
    run_id: str
    dvc: DvcInvocation | None  # set when the stages of a `dvc repro` close the parent themselves


def _pipeline_parent(client, experiment_id: str, root: Path) -> PipelineParent | None:
    if os.environ.get(PIPELINE_RUN_ENV):
        return PipelineParent(os.environ[PIPELINE_RUN_ENV], None)
    invocation = dvc_invocation()
    if invocation is None:
        return None
    host = socket.gethostname()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation.key}' and tags.`{HOST_TAG}` = '{host}'", max_results=1
    )
    if found:
        return PipelineParent(found[0].info.run_id, invocation)
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {started}",
        tags={
            INVOCATION_TAG: invocation.key, "llmcarve.kind": "pipeline", "git_commit": git_commit(root),
            HOST_TAG: host, PROCESS_TAG: invocation.key,  # the parent lives as long as the dvc process
        },
    )
    return PipelineParent(run.info.run_id, invocation)


def start_pipeline_run(root: Path, name: str, tags: dict[str, str]) -> str:
    """Open the parent run of a pipeline an orchestrator drives; its stages join it via PIPELINE_RUN_ENV.

    The parent belongs to this process: if it dies before `finish_pipeline_run`, the next start closes it as KILLED.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    experiment_id = _experiment_id(client, root)
    close_stale_runs(client, experiment_id)
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"llmcarve.kind": "pipeline", "git_commit": git_commit(root), **run_tags(), **tags},
    )
    return run.info.run_id


def finish_pipeline_run(root: Path, run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    """Close an orchestrator's parent run: FINISHED, FAILED or KILLED; a stage whose process died is closed first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    close_stale_runs(client, client.get_run(run_id).info.experiment_id)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


@contextmanager
def stage_run(stage: str, params: dict[str, Any], root: Path | str = ".") -> Iterator[StageRun]:
    """A child MLflow run for `stage`, with its params and lineage tags; under `dvc repro` it also
    closes the parent when it fails or is the repro's last stage (see the module docstring)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root = Path(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    client = MlflowClient()
    experiment_id = _experiment_id(client, root)
    close_stale_runs(client, experiment_id)
    parent = _pipeline_parent(client, experiment_id, root)
    tags = {
        "llmcarve.stage": stage, "llmcarve.kind": "stage", "git_commit": git_commit(root), **run_tags(),
        **upstream_hashes(stage, root),
    }
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent and parent.run_id, tags=tags)
    try:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        yield StageRun(run.info.run_id, parent and parent.run_id)
    except BaseException as error:
        # Ctrl-C (DVC passes it on to the stage) is a kill, not a fault of the stage
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        mlflow.end_run(status)
        if parent is not None and parent.dvc is not None:
            client.set_terminated(parent.run_id, status=status)
        raise
    mlflow.end_run("FINISHED")
    if parent is not None and parent.dvc is not None and is_last_stage(stage, parent.dvc.command, root):
        client.set_terminated(parent.run_id, status=worst_status(_child_statuses(client, experiment_id, parent.run_id)))
