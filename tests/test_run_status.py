"""MLflow run statuses tell the truth, on a real SQLite store with real stage processes.

A pipeline's parent run stays RUNNING while its stages run, is FINISHED when the last stage ends and
FAILED or KILLED when a stage fails or dies; runs whose process died are closed at the next start.

Most tests drive the stages with a stand-in for `dvc repro` (below) so that the heavy imports are paid
once per pipeline instead of once per stage; one test runs the real `dvc repro`.
"""

import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from llmcarve.tracking import runs
from tests.project import DVC

EXPERIMENT = "run-status"
# a chain: b reads a's output, c reads b's; c is the last stage of a full repro
CHAIN = {
    "a": {"cmd": "python stage.py a", "outs": ["out/a"], "always_changed": True},
    "b": {"cmd": "python stage.py b", "deps": ["out/a"], "outs": ["out/b"], "always_changed": True},
    "c": {"cmd": "python stage.py c", "deps": ["out/b"], "outs": ["out/c"], "always_changed": True},
}

# What every stage does: open its stage run, note the parent's status as the MLflow UI shows it while
# the stage runs, then succeed, raise, or die by SIGKILL as $BEHAVIOUR says ("b:fail", "a:kill").
STAGE_BODY = '''
import os, signal
from pathlib import Path
from mlflow.tracking import MlflowClient
from llmcarve.tracking import stage_run

def run_stage(name):
    with stage_run(name, {"stage": name}) as run:
        Path("seen").mkdir(exist_ok=True)
        Path("seen", name).write_text(MlflowClient().get_run(run.parent_run_id).info.status)
        behaviour = os.environ.get("BEHAVIOUR", "")
        if behaviour == name + ":fail":
            raise RuntimeError(name + " failed on purpose")
        if behaviour == name + ":kill":
            os.kill(os.getpid(), signal.SIGKILL)
    Path("out").mkdir(exist_ok=True)
    Path("out", name).write_text("done")
'''

# Runs dvc.yaml's stages in its order, each in a process of its own (a fork, so the imports above are
# paid once), under a process whose command line is `.../dvc repro`; stops at the first stage that fails.
STAND_IN_DVC = '''
import os, sys, traceback
import yaml
from stage_body import run_stage

for name in yaml.safe_load(open("dvc.yaml"))["stages"]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run_stage(name)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if os.waitpid(pid, 0)[1] != 0:
        sys.exit(f"stage {name} failed")
'''


def environment(work: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{work / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(work),
        # the stage body, and the same llmcarve this test process imported
        "PYTHONPATH": f"{work}:{Path(runs.__file__).parents[2]}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "LLMCARVE_EXPERIMENT": EXPERIMENT,
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        **extra,
    }


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": CHAIN}, sort_keys=False))
    (tmp_path / "stage_body.py").write_text(STAGE_BODY)
    (tmp_path / "stage.py").write_text("import sys\nfrom stage_body import run_stage\nrun_stage(sys.argv[1])\n")
    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / "dvc"
    stand_in.write_text(f"#!{sys.executable}\n{STAND_IN_DVC}")
    stand_in.chmod(0o755)
    return tmp_path


def repro(work: Path, behaviour: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", "repro"], cwd=work, env=environment(work, BEHAVIOUR=behaviour), capture_output=True, text=True, timeout=600
    )


def client(work: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{work}/mlflow.db")


def pipeline_runs(work: Path) -> list:
    """Every parent run, oldest first, each with its stage runs by name."""
    store = client(work)
    experiment = store.get_experiment_by_name(EXPERIMENT)
    every = store.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run for run in every if run.data.tags.get("llmcarve.kind") == "pipeline"]
    for parent in parents:
        parent.stages = {
            run.data.tags["llmcarve.stage"]: run.info.status
            for run in every if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
    return parents


def test_the_parent_is_running_until_the_last_stage_ends(project):
    result = repro(project)
    assert result.returncode == 0, result.stderr[-3000:]
    # what the MLflow UI showed while b and c ran
    assert (project / "seen" / "b").read_text() == "RUNNING"
    assert (project / "seen" / "c").read_text() == "RUNNING"
    (parent,) = pipeline_runs(project)
    assert parent.info.status == "FINISHED"
    assert parent.stages == {"a": "FINISHED", "b": "FINISHED", "c": "FINISHED"}


@pytest.mark.parametrize("failing", ["a", "b"])
def test_a_failing_stage_fails_its_parent(project, failing):
    result = repro(project, behaviour=f"{failing}:fail")
    assert result.returncode != 0 and f"{failing} failed on purpose" in result.stderr
    (parent,) = pipeline_runs(project)
    assert parent.info.status == "FAILED"
    assert parent.stages[failing] == "FAILED"
    assert all(status == "FINISHED" for stage, status in parent.stages.items() if stage != failing)
    assert "c" not in parent.stages


def test_a_killed_stage_and_its_parent_are_closed_as_killed_by_the_next_start(project):
    killed = repro(project, behaviour="b:kill")
    assert killed.returncode != 0
    (parent,) = pipeline_runs(project)
    # nothing can run in a process killed by SIGKILL: the store still says RUNNING
    assert parent.stages == {"a": "FINISHED", "b": "RUNNING"}

    again = repro(project)
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = pipeline_runs(project)
    assert first.stages == {"a": "FINISHED", "b": "KILLED"}
    assert first.info.status == "KILLED"
    assert second.info.status == "FINISHED"


def dead_process_key() -> str:
    """The key of a real process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    key = runs.process_key(psutil.Process(process.pid))
    process.kill()
    process.wait()
    assert not runs.process_alive(key)
    return key


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("LLMCARVE_EXPERIMENT", EXPERIMENT)
    monkeypatch.delenv(runs.PIPELINE_RUN_ENV, raising=False)
    yield client(tmp_path)
    mlflow.set_tracking_uri(None)


def test_stale_runs_of_dead_processes_are_closed_when_a_stage_starts(store, tmp_path):
    experiment_id = runs._experiment_id(store, tmp_path)
    host, gone = socket.gethostname(), dead_process_key()

    def create(kind: str, process: str, parent: str | None = None, **tags: str) -> str:
        tags = {"llmcarve.kind": kind, runs.HOST_TAG: host, runs.PROCESS_TAG: process, **tags}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return store.create_run(experiment_id, tags=tags).info.run_id

    # a `dvc repro` that ended after its stages finished, with its last stage skipped as unchanged
    ended = create("pipeline", gone, **{runs.INVOCATION_TAG: gone})
    store.set_terminated(create("stage", runs.process_key(), ended), "FINISHED")
    # an orchestrator that died before closing its parent run
    orphaned = create("pipeline", gone)
    # a run of a live process, and one of another host: neither may be touched
    alive = create("stage", runs.process_key())
    elsewhere = store.create_run(experiment_id, tags={runs.HOST_TAG: "another-host", runs.PROCESS_TAG: gone}).info.run_id

    with runs.stage_run("standalone", {}, tmp_path):
        pass

    status = {run_id: store.get_run(run_id).info.status for run_id in (ended, orphaned, alive, elsewhere)}
    assert status == {ended: "FINISHED", orphaned: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}


def test_stages_leave_an_orchestrators_parent_to_the_orchestrator(store, tmp_path, monkeypatch):
    parent = runs.start_pipeline_run(tmp_path, "pipeline under test", {})
    monkeypatch.setenv(runs.PIPELINE_RUN_ENV, parent)
    with runs.stage_run("first", {}, tmp_path):
        pass
    assert store.get_run(parent).info.status == "RUNNING", "more stages may follow: only the orchestrator knows"
    with pytest.raises(RuntimeError), runs.stage_run("second", {}, tmp_path):
        raise RuntimeError("the stage failed")
    runs.finish_pipeline_run(tmp_path, parent, status="FAILED")
    assert store.get_run(parent).info.status == "FAILED"


# which stages a DVC command line reproduces, and which of them runs last
STAGES = {
    "model": {"outs": ["artifacts/model"]},
    "data": {"deps": ["artifacts/model"], "outs": ["artifacts/data"]},
    "train": {"deps": ["artifacts/model", "artifacts/data/train"], "outs": ["artifacts/train"]},
    "baseline": {"deps": ["artifacts/data"], "outs": ["artifacts/baseline"]},
    "report": {"deps": ["artifacts/train", "metrics/baseline.json"]},
}
STAGES["baseline"]["metrics"] = [{"metrics/baseline.json": {"cache": False}}]


@pytest.mark.parametrize(
    "command, expected",
    [
        ("dvc repro", {"model", "data", "train", "baseline", "report"}),
        ("dvc repro -f train", {"model", "data", "train"}),
        ("dvc repro --single-item train", {"train"}),
        ("dvc repro -s dvc.yaml:train baseline", {"train", "baseline"}),
        ("dvc exp run -S train.steps=3 --name x -m 'a note' baseline", {"model", "data", "baseline"}),
        ("dvc repro --downstream data", None),  # not modelled: closed by the next start instead
        ("dvc repro artifacts/", None),
    ],
)
def test_stages_in_repro(command, expected):
    import shlex

    assert runs.stages_in_repro(["/venv/bin/python", "/venv/bin/dvc", *shlex.split(command)[1:]], STAGES) == expected


def test_the_last_stage_is_the_one_depending_on_all_others(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}))
    full = ["dvc", "repro"]
    assert [name for name in STAGES if runs.is_last_stage(name, full, tmp_path)] == ["report"]
    assert runs.is_last_stage("train", ["dvc", "repro", "train"], tmp_path)
    # two independent stages: DVC may run either last, so neither closes the parent
    assert not any(runs.is_last_stage(name, ["dvc", "repro", "-s", "train", "baseline"], tmp_path) for name in ("train", "baseline"))


@pytest.mark.slow
def test_real_dvc_repro_keeps_the_parent_running_between_stages(project):
    """The same as the first test, under the real `dvc repro` (one fresh interpreter per stage)."""
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: CHAIN[k] for k in ("a", "b")}}, sort_keys=False))
    (project / "bin" / "dvc").unlink()
    for command in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, env=environment(project), capture_output=True)
    result = subprocess.run([DVC, "repro"], cwd=project, env=environment(project), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (project / "seen" / "b").read_text() == "RUNNING"
    (parent,) = pipeline_runs(project)
    assert parent.info.status == "FINISHED"
    assert parent.stages == {"a": "FINISHED", "b": "FINISHED"}
