"""The params schema refuses bad input with the key, the value and what is allowed."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmcarve.cli import main as cli_main
from llmcarve.params import ParamsError, apply_overrides, load_params, validate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.model.source == "embedded:smollm2-135m-instruct"
    assert params.evaluate.perplexity.corpora["boolq_wikipedia"] == "general/heldout"


def with_change(path: str, value):
    raw = copy.deepcopy(SHIPPED)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


DELETE = object()

BAD_INPUTS = [
    # (dotted key, bad value, words the message must contain)
    ("modle", {}, ["modle", "unknown key"]),
    ("seed", "zero", ["seed", "'zero'", "integer"]),
    ("model.source", "embedded:gpt5", ["model.source", "embedded:gpt5", "embedded:smollm2-135m-instruct"]),
    ("model.source", "/no/such/dir", ["model.source", "/no/such/dir", "does not exist"]),
    ("model.dtype", "int4", ["model.dtype", "int4", "float32"]),
    ("data.block_size", 4, ["data.block_size", "4", "greater than or equal to 8"]),
    ("data.sources.squad_wikipedia", {"builtin": "squad_v9"}, ["squad_v9", "allowed", "squad_wikipedia_paragraphs"]),
    ("data.sources.squad_wikipedia", {"builtin": "squad_wikipedia_paragraphs", "path": "x.jsonl"}, ["exactly one of builtin, path, hf_id"]),
    ("data.sources.squad_wikipedia", {"path": "/no/file.jsonl"}, ["/no/file.jsonl", "does not exist"]),
    ("data.domains.general.train", ["wikipedia"], ["wikipedia", "not under data.sources"]),
    ("data.domains.general.train", [], ["data.domains.general.train", "at least 1"]),
    ("data.domains.legal.heldout_fraction", 1.5, ["heldout_fraction", "1.5", "less than 1"]),
    ("calibrate.domain", "finance", ["calibrate.domain", "finance", "not under data.domains"]),
    ("calibrate.num_blocks", 0, ["calibrate.num_blocks", "greater than 0"]),
    ("evaluate.models", ["tomoe@0.6"], ["evaluate.models", "tomoe@0.6", "allowed: dense, tomoe@0.5"]),
    ("evaluate.perplexity.stride", 1024, ["stride 1024 > seq_len 512"]),
    ("evaluate.perplexity.corpora", {"x": "general"}, ["'general'", "<domain>/heldout"]),
    ("evaluate.zero_shot.arc_easy", {"builtin": "arc_medium"}, ["arc_medium", "allowed", "arc_easy"]),
    ("evaluate.zero_shot.arc_easy", {"path": "tests/__init__.py"}, ["a path task needs", "context_template"]),
    ("evaluate.zero_shot_limit", -1, ["zero_shot_limit", "greater than 0"]),
    ("tomoe.num_processes", 2, ["tomoe.batch_size=1", "multiple of tomoe.num_processes=2"]),
    ("export_onnx.models", ["dense", "tomoe@0.9"], ["export_onnx.models", "tomoe@0.9", "allowed: dense, tomoe@0.5"]),
    ("export_onnx.max_rel_err", 0, ["export_onnx.max_rel_err", "greater than 0"]),
    ("registry.prefix", "my models", ["registry.prefix", "'my models'", "pattern"]),
    ("registry.champion.goal", "lowest", ["registry.champion.goal", "'minimize' or 'maximize'"]),
    ("registry.domain_champion.dental", {"metric": "ppl.x.ppl"}, ["registry.domain_champion", "'dental'", "not under atp.domains"]),
]


@pytest.mark.parametrize("key,value,words", BAD_INPUTS, ids=[f"{k}={v!r}"[:60] for k, v, _ in BAD_INPUTS])
def test_bad_value_is_refused_with_key_value_and_allowed(key, value, words):
    with pytest.raises(ParamsError) as error:
        validate(with_change(key, value))
    message = str(error.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_perplexity_presets_fill_the_protocol_and_explicit_keys_win():
    corpora = SHIPPED["evaluate"]["perplexity"]["corpora"]
    raw = with_change("evaluate.perplexity", {"preset": "seq2048", "corpora": corpora})
    protocol = validate(raw).evaluate.perplexity
    assert (protocol.seq_len, protocol.max_windows, protocol.add_bos) == (2048, 32, False)
    raw = with_change("evaluate.perplexity", {"preset": "seq512", "max_windows": 8, "corpora": corpora})
    assert (validate(raw).evaluate.perplexity.seq_len, validate(raw).evaluate.perplexity.max_windows) == (512, 8)
    with pytest.raises(ParamsError, match="preset"):
        validate(with_change("evaluate.perplexity", {"preset": "seq4096", "corpora": corpora}))


def test_atp_and_recovery_names_are_checked_against_the_rest_of_the_file():
    with pytest.raises(ParamsError, match="atp.domains: 'dental' is not under data.domains"):
        validate(with_change("atp.domains", ["medical", "dental"]))
    with pytest.raises(ParamsError, match="recovery.legal.tasks: 'caselaw' is not under evaluate.domain_tasks"):
        validate(with_change("evaluate.recovery.legal.tasks", ["caselaw"]))
    with pytest.raises(ParamsError, match="search_fraction"):
        validate(with_change("atp.search_fraction", 1.0))  # no step would be left for the frozen decision
    with pytest.raises(ParamsError, match="'atp-legal@0.5' is not produced"):
        validate(with_change("evaluate.models", ["dense", "atp-legal@0.5"]))


def test_every_problem_is_reported_at_once():
    raw = with_change("seed", "zero")
    raw["calibrate"]["num_blocks"] = 0
    with pytest.raises(ParamsError, match="2 problem"):
        validate(raw)


def test_check_params_command(tmp_path, capsys):
    assert cli_main(["check-params", str(ROOT / "params.yaml")]) == 0
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("model.dtype", "int4")))
    assert cli_main(["check-params", str(bad)]) == 1
    assert "model.dtype = 'int4'" in capsys.readouterr().err


def test_stage_refuses_bad_params_before_writing_anything(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("calibrate.num_blocks", 0)))
    result = subprocess.run(
        [sys.executable, "-m", "stages.calibrate", "--params", str(bad)], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "calibrate.num_blocks = 0" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_overrides_set_dotted_keys_and_typos_are_caught_by_validation():
    raw = apply_overrides(with_change("seed", 0), {"tomoe.steps": 7, "data.sources.squad_wikipedia.max_documents": 5})
    params = validate(raw)
    assert params.tomoe.steps == 7 and params.data.sources["squad_wikipedia"].max_documents == 5
    with pytest.raises(ParamsError, match="tomoe.stepz"):
        validate(apply_overrides(with_change("seed", 0), {"tomoe.stepz": 7}))
    with pytest.raises(ParamsError, match="seed is the value 0, not a section of keys"):
        apply_overrides(with_change("seed", 0), {"seed.value": 1})
