"""Prefect orchestration against a real Prefect server (started here with `make server` on 127.0.0.1).

Deploy from prefect.yaml, run a worker of the `gpu` pool, trigger the on-demand deployment on the tiny
configuration of the real model, and check what it left: a Completed flow run, the DVC outputs, a DVC
experiment in the project, linked MLflow runs. Also: cron schedules produce runs, a failing stage fails
the flow with its own message, a sweep writes one comparison table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from flows.workspace import FlowWorkspace, StageFailed
from tests.processes import free_port, stop_group, wait_until_healthy
from tests.project import DVC, ROOT, make_project, offline_env, scratch_dir, tiny_params

STAGES = ["prepare_model", "prepare_data", "calibrate", "tomoe", "atp", "lora_baselines", "remove", "evaluate", "export_onnx", "register"]
PREFECT = str(Path(sys.executable).parent / "prefect")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# for this run only; num_processes 2 makes the tomoe stage relaunch itself under torchrun
OVERRIDES = {"tomoe.num_processes": 2, "tomoe.batch_size": 2}


class Server:
    def __init__(self, api: str, env: dict[str, str]):
        self.api, self.env = api, env

    def get(self, path: str) -> dict:
        return httpx.get(f"{self.api}{path}", timeout=30).raise_for_status().json()

    def post(self, path: str, body: dict) -> list | dict:
        return httpx.post(f"{self.api}{path}", json=body, timeout=30).raise_for_status().json()

    def wait_for_final_state(self, flow_run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state_type"] in FINAL:
                return run
            time.sleep(3)
        raise AssertionError(f"flow run {flow_run_id} still {run['state_type']} after {timeout} s:\n{self.logs(flow_run_id)}")

    def logs(self, flow_run_id: str) -> str:
        rows = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return "\n".join(row["message"] for row in rows)[-6000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`make server` (the README's command) on a free port, its database in a temporary PREFECT_HOME."""
    home, port = tmp_path_factory.mktemp("prefect-home"), free_port()
    env = {
        **offline_env(home),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the scheduler service normally wakes every 60 s; a schedule test should not wait that long
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    log = open(home / "server.log", "w")
    make = subprocess.Popen(
        ["make", "-s", "server", f"PREFECT_PORT={port}", f"PREFECT_HOME={home}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(f"{api}/health", lambda response: response.json() is True, make, home / "server.log")
        yield Server(api, {**env, "PREFECT_API_URL": api})
    finally:
        stop_group(make)
        log.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory, smollm2_dir) -> Iterator[Path]:
    params = tiny_params(smollm2_dir)
    # test_pipeline checks what evaluate measures; here it only has to run, so it measures little
    params["evaluate"].update(models=["dense", "tomoe@0.5"], zero_shot={"arc_easy": {"builtin": "arc_easy"}}, zero_shot_limit=4, domain_limit=2)
    params["evaluate"]["perplexity"]["max_windows"] = 1
    params["export_onnx"]["models"] = []  # test_pipeline exports and registers; here the stages only have to run
    with scratch_dir(tmp_path_factory, "flow-project") as work:
        yield make_project(work, params, orchestration=True)


@pytest.fixture(scope="module")
def flow_env(server, project, tmp_path_factory) -> Iterator[dict[str, str]]:
    """What `make worker` / `make deploy` give the Prefect commands, pointed at this test's project."""
    with scratch_dir(tmp_path_factory, "flow-workspace") as flow_workspace:
        yield {
            **server.env,
            **offline_env(project),
            "LLMCARVE_PROJECT_DIR": str(project),
            "LLMCARVE_FLOW_WORKSPACE": str(flow_workspace / "ws"),
            "HOME": str(tmp_path_factory.mktemp("home")),  # tools' caches (~/.cache) stay out of the checkout
        }


def prefect(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_server_listens_on_localhost_only(server):
    port = int(server.api.split(":")[-1].split("/")[0])
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_make_ui_binds_both_servers_to_localhost():
    dry = subprocess.run(["make", "-n", "ui", "-o", ".venv/.llmcarve-installed"], cwd=ROOT, capture_output=True, text=True)
    commands = [line for line in dry.stdout.splitlines() if "server start" in line or "mlflow ui" in line]
    assert len(commands) == 2, dry.stdout
    assert all("--host 127.0.0.1" in line for line in commands), commands


def test_nightly_deployment_gets_scheduled_runs(server, project, flow_env):
    prefect(["work-pool", "create", "gpu", "--type", "process", "--overwrite"], project, flow_env)
    prefect(["--no-prompt", "deploy", "--name", "nightly"], project, flow_env)
    deployment = server.get("/deployments/name/carve-pipeline/nightly")
    try:
        query = {"deployments": {"id": {"any_": [deployment["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
        deadline, runs = time.monotonic() + 90, []
        while not runs and time.monotonic() < deadline:
            runs = server.post("/flow_runs/filter", query)
            time.sleep(2)
        assert runs, "the scheduler created no run for the nightly cron"
        assert {run["expected_start_time"][11:16] for run in runs} == {"02:00"}  # cron "0 2 * * *" in UTC
        assert all(run["auto_scheduled"] for run in runs)
    finally:
        # the runs are for 02:00; never let a worker of a later test pick one up
        httpx.delete(f"{server.api}/deployments/{deployment['id']}", timeout=30)


def test_deployment_runs_the_pipeline_on_a_gpu_pool_worker(server, project, flow_env):
    prefect(["work-pool", "create", "gpu", "--type", "process", "--overwrite"], project, flow_env)
    prefect(["--no-prompt", "deploy", "--name", "on-demand"], project, flow_env)
    pool = server.get("/work_pools/gpu")
    assert pool["type"] == "process"
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1", "--name", "test-gpu"],
        cwd=project, env=flow_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        started = prefect(["deployment", "run", "carve-pipeline/on-demand", "--params", json.dumps({"overrides": OVERRIDES})], project, flow_env)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        run = server.wait_for_final_state(flow_run_id, timeout=1200)
    finally:
        stop_group(worker)
    assert run["state_type"] == "COMPLETED", server.logs(flow_run_id)
    assert run["work_pool_name"] == "gpu"

    # the outputs of every stage, in the flow workspace; the override reached the stages
    workspace = Path(flow_env["LLMCARVE_FLOW_WORKSPACE"])
    models = json.loads((workspace / "metrics" / "evaluate.json").read_text())["models"]
    assert set(models) == {"dense", "tomoe@0.5"}
    assert (workspace / "artifacts" / "remove" / "tomoe@0.5" / "config.json").exists()
    training = json.loads((workspace / "artifacts" / "tomoe" / "tomoe@0.5" / "training.json").read_text())
    assert training["config"]["batch_size"] == 2
    # two data-parallel processes under torchrun trained it (gloo on this CPU)
    assert json.loads((workspace / "metrics" / "tomoe.json").read_text())["tomoe@0.5"]["processes"] == 2

    # the user's checkout is untouched; the run is a named DVC experiment there
    assert subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout == ""
    experiments = subprocess.run([DVC, "exp", "list", "--name-only"], cwd=project, env=flow_env, capture_output=True, text=True).stdout.split()
    assert run["name"] in experiments

    # MLflow parent run <-> flow run, and one child run per stage under it
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{project}/mlflow.db")
    tags = [tag for tag in run["tags"] if tag.startswith("mlflow-run:")]
    assert len(tags) == 1
    parent = client.get_run(tags[0].removeprefix("mlflow-run:"))
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
    assert parent.data.tags["dvc.experiment"] == run["name"]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(child.data.tags["llmcarve.stage"] for child in children) == sorted(STAGES)


def test_sweep_writes_one_comparison_table(server, project, flow_env, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import carve_sweep

    for key in ("MLFLOW_TRACKING_URI", "LLMCARVE_FLOW_WORKSPACE", "PATH"):
        monkeypatch.setenv(key, flow_env[key])
    with temporary_settings({PREFECT_API_URL: server.api}):
        # num_experts 4 is the tiny default (already carved by the deployment test: DVC skips it); 2 is new
        table = carve_sweep(
            key="tomoe.num_experts", values=[4, 2], overrides=OVERRIDES, stages=STAGES, name="experts", project=str(project)
        )
    rows = [line for line in table.splitlines() if line.startswith("| `tomoe.num_experts=")]
    assert len(rows) == 2 * 2, table  # two runs x (dense, tomoe@0.5)
    assert (project / "reports" / "experts.md").read_text().count("| `tomoe.num_experts=") == 4
    experiments = subprocess.run([DVC, "exp", "list", "--name-only"], cwd=project, env=flow_env, capture_output=True, text=True).stdout.split()
    assert {"experts-0", "experts-1"} <= set(experiments)


def test_a_failing_stage_fails_the_flow_with_the_stages_message(server, project, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import carve_pipeline

    not_a_llama = tmp_path / "gpt2"
    not_a_llama.mkdir()
    (not_a_llama / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    workspace = tmp_path / "ws"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    with temporary_settings({PREFECT_API_URL: server.api}):
        state = carve_pipeline(
            overrides={"model.source": str(not_a_llama)}, stages=["prepare_model"], project=str(project),
            workspace=str(workspace), return_state=True,
        )
        assert state.is_failed()
        assert "stage 'prepare_model' failed" in state.message and "model_type 'gpt2' is not supported" in state.message
        assert not (workspace / "artifacts" / "model").exists(), "a failed stage must leave no output"

        # a bad override is refused before any stage runs, with the key and what is allowed
        state = carve_pipeline(overrides={"tomoe.stepz": 3}, project=str(project), workspace=str(workspace), return_state=True)
        assert state.is_failed() and "tomoe.stepz" in state.message and "unknown key" in state.message
    assert subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout == ""


def test_two_runs_never_share_a_workspace(tmp_path):
    project = make_project(tmp_path / "p", {"seed": 0})
    first, second = (FlowWorkspace.for_project(project, tmp_path / "ws") for _ in range(2))
    events: list[str] = []
    with first.locked():
        waiter = threading.Thread(target=lambda: second.locked(on_wait=events.append).__enter__() and events.append("entered"))
        waiter.start()
        time.sleep(1)
        assert events and "in use by another run" in events[0] and "entered" not in events
    waiter.join(10)
    assert events[-1] == "entered"


def test_only_stages_killed_from_outside_are_retried():
    assert StageFailed("tomoe", -9, "").transient  # SIGKILL: the OOM killer or a preempted host
    assert StageFailed("tomoe", 1, "ERROR: '/x/.dvc/tmp/rwlock' is busy, it is being blocked by: (PID 7)").transient
    assert not StageFailed("tomoe", 1, "ValueError: tomoe.num_experts=9 exceeds the MLP width 8").transient
