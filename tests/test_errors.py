"""Failures the user can fix read as one line that says what to fix; hub ids work when the network is there."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmcarve.data.sources import load_source
from llmcarve.errors import MissingInputError, UserError
from llmcarve.models import loading
from llmcarve.models.loading import load_model, materialize
from llmcarve.params import SourceSpec
from tests.tiny import save_tiny, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
HUB_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "LLMCARVE_OFFLINE")


# --- model directories: say which part is missing ---------------------------------------------------


def test_an_empty_model_directory_names_every_missing_part(tmp_path):
    with pytest.raises(MissingInputError) as caught:
        load_model(tmp_path)
    message = str(caught.value)
    assert "no config.json" in message and "no weights (*.safetensors files)" in message and "no tokenizer files" in message
    assert "model_type" not in message


def test_a_directory_without_tokenizer_files_says_so(tmp_path):
    source = save_tiny(tiny_llama(), tmp_path / "source")
    for tokenizer_file in ("tokenizer.json", "vocab.json", "merges.txt"):
        (Path(source) / tokenizer_file).unlink(missing_ok=True)
    with pytest.raises(MissingInputError, match=r"has no tokenizer files \(tokenizer\.json") as caught:
        materialize(str(source), tmp_path / "out")
    assert "sentencepiece" not in str(caught.value) and "config.json" not in str(caught.value).split(":")[-1]
    assert not (tmp_path / "out").exists()


# --- model sources: a missing directory is not a hub id ---------------------------------------------


@pytest.mark.parametrize("source", ["my-model", "models/llama/7b", "./llama", "~/no-such-llmcarve-model", "present/missing"])
def test_a_missing_directory_is_reported_before_any_hub_lookup(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "present").mkdir()  # "present/missing" exists in part: a path, not the hub's org "present"
    with pytest.raises(MissingInputError, match=rf"^no such directory: {source} \(a hub id looks like org/name\)$"):
        materialize(source, tmp_path / "out")


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert loading.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and loading.is_hub_id("org/name.v2")
    (tmp_path / "org").mkdir()
    assert not loading.is_hub_id("org/name"), "a local directory 'org' makes org/name a path"
    for not_hub in ("name", "a/b/c", "./a/b", "/a/b", "-org/name", "org/name-", "org--x/name", "org/na..me"):
        assert not loading.is_hub_id(not_hub), not_hub


# --- which stage may use the network ------------------------------------------------------------------


def params_with(tmp_path: Path, source: str) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = source
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def user_environment(monkeypatch):
    """No hub variable set, as for a user who set none; the library copies are restored afterwards."""
    import datasets.config
    import huggingface_hub.constants

    for name in HUB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, name, getattr(datasets.config, name))
    return monkeypatch


def run_main(params_file: Path, monkeypatch, run, *arguments: str) -> None:
    from stages.common import main

    monkeypatch.setattr(sys, "argv", ["stage", "--params", str(params_file), *arguments])
    main(run, "a stage under test")


@pytest.mark.parametrize(
    "source, given, offline",
    [
        ("embedded:smollm2-135m-instruct", {}, True),  # nothing needs the hub: offline by default
        ("someorg/some-model", {}, False),  # a hub id: the hub is reachable when the machine has network
        ("someorg/some-model", {"HF_HUB_OFFLINE": "1"}, True),  # what the user set wins
        ("someorg/some-model", {"LLMCARVE_OFFLINE": "1"}, True),
        ("embedded:smollm2-135m-instruct", {"LLMCARVE_OFFLINE": "0"}, False),
    ],
)
def test_stages_go_offline_only_when_nothing_needs_the_hub(source, given, offline, tmp_path, user_environment):
    import datasets.config
    import huggingface_hub.constants

    for name, value in given.items():
        user_environment.setenv(name, value)
    seen = {}

    def run(params):
        import os

        seen.update(env=os.environ["HF_HUB_OFFLINE"], hub=huggingface_hub.constants.HF_HUB_OFFLINE, datasets=datasets.config.HF_HUB_OFFLINE)

    run_main(params_with(tmp_path, source), user_environment, run)
    # the libraries were imported before main ran: their copies of the variable must follow too
    assert seen == {"env": "1" if offline else "0", "hub": offline, "datasets": offline}


def test_make_leaves_the_hub_setting_to_the_user():
    show = ["make", "-s", "--no-print-directory", "--eval", 'show-hub: ; @echo "[$$HF_HUB_OFFLINE]"', "show-hub"]
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    assert subprocess.run(show, cwd=ROOT, env={**environment, "HF_HUB_OFFLINE": "0"}, capture_output=True, text=True).stdout.strip() == "[0]"
    assert subprocess.run(show, cwd=ROOT, env=environment, capture_output=True, text=True).stdout.strip() == "[]"


def test_a_flow_workspace_leaves_the_hub_setting_to_the_user(tmp_path, monkeypatch):
    from flows.workspace import FlowWorkspace

    space = FlowWorkspace(tmp_path, tmp_path / "ws")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert space.env()["HF_HUB_OFFLINE"] == "0"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert "HF_HUB_OFFLINE" not in space.env() and "HF_DATASETS_OFFLINE" not in space.env()


# --- stage failures: one line, the traceback in a log file --------------------------------------------


def fails_for_the_user(params):
    raise MissingInputError("no such directory: models/llama (a hub id looks like org/name)")


def fails_with_a_bug(params):
    raise KeyError("an internal key")


def test_a_user_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMCARVE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        run_main(ROOT / "params.yaml", monkeypatch, fails_for_the_user)
    assert exited.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: no such directory: models/llama (a hub id looks like org/name)"
    assert "Traceback" not in "\n".join(lines) and len(lines) <= 2
    logged = (tmp_path / "logs" / "test_errors.log").read_text()
    assert "Traceback" in logged and "fails_for_the_user" in logged


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(how, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if how == "environment":
        monkeypatch.setenv("LLMCARVE_DEBUG", "1")
    with pytest.raises(MissingInputError):
        run_main(ROOT / "params.yaml", monkeypatch, fails_for_the_user, *(["--debug"] if how == "flag" else []))


def test_a_bug_keeps_its_traceback_and_is_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyError):
        run_main(ROOT / "params.yaml", monkeypatch, fails_with_a_bug)
    assert "KeyError: 'an internal key'" in (tmp_path / "logs" / "test_errors.log").read_text()


def test_user_errors_are_still_the_builtin_errors_they_refine():
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(MissingInputError, UserError)


# --- messages -------------------------------------------------------------------------------------------


def test_bad_json_line_names_the_column_once(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "unterminated', encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_source("notes", SourceSpec(path=str(path)))
    assert "line 2: not valid JSON (Unterminated string starting at column 10)" in str(caught.value)
    assert "at at" not in str(caught.value)
