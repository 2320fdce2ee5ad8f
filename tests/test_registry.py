"""The MLflow model registry against a real tracking server (`make mlflow-server` on 127.0.0.1).

A tiny carved model is logged and registered the way the register stage does it, read back by alias
(PyTorch from its HF directory, onnxruntime from its ONNX flavor) and checked on logits; the champion
rule moves the alias across versions. The rule's arithmetic is checked without a server.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from llmcarve.export import export_onnx
from llmcarve.params import ChampionRule
from llmcarve.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    Candidate,
    ModelEntry,
    best_version,
    log_model_version,
    model_run,
    registered_name,
    report_value,
)
from tests.processes import free_port, stop_group, wait_until_healthy
from tests.project import ROOT, offline_env
from tests.test_export import tiny_carved_static
from tests.tiny import save_tiny
from tests.tolerance import assert_within_floor, float32_floor

RULE = ChampionRule(metric="ppl.heldout.ppl", goal="minimize", max_active_ratio=0.75)


# ------------------------------------------------------------------------------------------------
# The rule, no server


def test_registered_names_drop_the_budget():
    assert registered_name("llmcarve", "tomoe@0.5") == "llmcarve-tomoe"
    assert registered_name("llmcarve", "atp-medical@0.6") == "llmcarve-atp-medical"
    assert registered_name("team", "dense") == "team-dense"


def test_champion_is_the_best_within_the_active_budget():
    versions = [Candidate("1", 50.0, 0.50, 0.5), Candidate("2", 40.0, 0.90, 0.5), Candidate("3", 45.0, 0.60, 0.6)]
    assert best_version(versions, RULE) == "3"  # 2 is better but over 0.75 active
    assert best_version(versions, RULE.model_copy(update={"goal": "maximize"})) == "1"
    assert best_version(versions, RULE.model_copy(update={"max_active_ratio": 1.0})) == "2"
    assert best_version(versions[1:2], RULE) is None
    # uncarved models (kept 1.0) are exempt from the budget; equal values go to the newer version
    assert best_version([Candidate("1", 20.0, 1.0, 1.0), Candidate("2", 20.0, 1.0, 1.0)], RULE) == "2"
    assert best_version([Candidate("1", float("nan"), 0.5, 0.5)], RULE) is None


def test_a_missing_metric_names_what_the_report_has():
    report = {"ppl": {"boolq_wikipedia": {"ppl": 21.0}}, "active_ratio": 1.0}
    assert report_value(report, "ppl.boolq_wikipedia.ppl") == 21.0
    with pytest.raises(KeyError, match="ppl has no 'medical_text' .*boolq_wikipedia"):
        report_value(report, "ppl.medical_text.ppl")
    with pytest.raises(KeyError, match="not a number"):
        report_value(report, "ppl.boolq_wikipedia")


# ------------------------------------------------------------------------------------------------
# A real tracking server


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`make mlflow-server` on a free port; its store and artifacts in a temporary directory."""
    home, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    log = open(home / "server.log", "w")
    make = subprocess.Popen(
        ["make", "-s", "mlflow-server", "-o", ".venv/.llmcarve-installed", f"MLFLOW_PORT={port}",
         f"MLFLOW_TRACKING_URI=sqlite:///{home}/mlflow.db", f"MLFLOW_ARTIFACTS={home}/artifacts"],
        cwd=ROOT, env=offline_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{uri}/health", lambda response: response.status_code == 200, make, home / "server.log")
        yield uri
    finally:
        stop_group(make)
        log.close()


@pytest.fixture(scope="module")
def client(tracking_server, monkeypatch_module):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    mlflow.set_experiment("registry-test")
    yield MlflowClient(tracking_server)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def carved(tmp_path_factory):
    """A tiny carved model (GQA, different widths per layer), saved as an HF directory and exported."""
    model = tiny_carved_static()
    work = tmp_path_factory.mktemp("carved")
    save_tiny(model, work / "hf")
    export_onnx(model, work / "onnx")
    return model, work


def register(carved, name: str, ppl: float, active: float) -> dict:
    _, work = carved
    entry = ModelEntry(
        name="static@0.5",
        registered_name=name,
        hf_dir=work / "hf",
        onnx_dir=work / "onnx",
        kept=0.5,
        metrics={"ppl.heldout.ppl": ppl, "active_ratio": active},
        tags={"git_commit": "0123abc", "llmcarve.pipeline_run_id": "parent-run", "dvc.dep.artifacts/remove": "d41d8cd9.dir"},
    )
    with model_run(entry.name, entry.tags, {"model": entry.name}):
        return log_model_version(entry, RULE)


def test_a_registered_model_loads_by_alias_and_computes_the_same_logits(client, carved, tmp_path):
    from llmcarve.tracking.registry import load_registered, load_registered_onnx

    model, _ = carved
    done = register(carved, "llmcarve-static", ppl=50.0, active=0.5)
    assert done["version"] == "1" and done["champion"] == "1"
    version = client.get_model_version_by_alias("llmcarve-static", CHAMPION)
    assert version.version == "1" and client.get_model_version_by_alias("llmcarve-static", CANDIDATE).version == "1"
    # lineage on the version: its run, the pipeline run, commit, DVC hashes
    assert version.run_id == done["run_id"]
    assert version.tags["llmcarve.pipeline_run_id"] == "parent-run" and version.tags["git_commit"] == "0123abc"
    assert version.tags["dvc.dep.artifacts/remove"] == "d41d8cd9.dir" and version.tags["llmcarve.model"] == "static@0.5"

    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded, tokenizer = load_registered("models:/llmcarve-static@champion", dst=tmp_path / "hf")
    assert type(loaded).__name__ == "CarvedForCausalLM" and tokenizer is not None
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)  # the same weights through the same code
    lm = load_registered_onnx("models:/llmcarve-static@champion", dst=tmp_path / "onnx")
    actual = lm(ids.numpy())[0]
    floor = float32_floor(lambda m: m(input_ids=ids).logits, model)  # PyTorch's own float32 rounding here
    assert_within_floor(actual, expected, floor, "onnxruntime vs PyTorch logits of the registered model")


def test_champion_moves_by_the_rule_and_candidate_to_the_newest(client, carved):
    name = "llmcarve-rule"
    register(carved, name, ppl=50.0, active=0.5)
    register(carved, name, ppl=40.0, active=0.9)   # better, but over max_active_ratio 0.75
    aliases = lambda: {alias: client.get_model_version_by_alias(name, alias).version for alias in (CANDIDATE, CHAMPION)}  # noqa: E731
    assert aliases() == {CANDIDATE: "2", CHAMPION: "1"}
    register(carved, name, ppl=45.0, active=0.6)
    assert aliases() == {CANDIDATE: "3", CHAMPION: "3"}
    register(carved, name, ppl=48.0, active=0.6)   # newest but worse: champion stays
    assert aliases() == {CANDIDATE: "4", CHAMPION: "3"}
