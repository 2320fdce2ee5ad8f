"""The params schema refuses bad input with the key, the value and what is allowed."""

import ast
import copy
import dataclasses
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmcarve.cli import main as cli_main
from llmcarve.methods.atp.config import ATPConfig, LoraRunConfig
from llmcarve.methods.tomoe.config import ToMoEConfig
from llmcarve.options import bounds_of
from llmcarve.params import (
    ATP_PER_RUN,
    TOMOE_PER_RUN,
    ATPParams,
    LoraParams,
    ParamsError,
    StaticParams,
    ToMoEParams,
    apply_overrides,
    build_config,
    load_params,
    validate,
)

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
    ("data.domains.medical.heldout_fraction", 1.5, ["heldout_fraction", "1.5", "less than 1"]),
    ("calibrate.domain", "finance", ["calibrate.domain", "finance", "not under data.domains"]),
    ("calibrate.num_blocks", 0, ["calibrate.num_blocks", "greater than 0"]),
    ("evaluate.models", ["tomoe@0.6"], ["evaluate.models", "tomoe@0.6", "allowed: dense, tomoe@0.5"]),
    ("evaluate.models", ["dense", "tomoe@0.50"], ["evaluate.models", "'tomoe@0.50' is not written canonically; write tomoe@0.5"]),
    ("evaluate.models", ["dense", "dense"], ["evaluate.models", "dense listed more than once"]),
    ("export_onnx.models", ["atp-medical"], ["export_onnx.models", "atp models need a budget"]),
    ("tomoe.budgets", [0.00001], ["tomoe.budgets", "rounds to 0.0 at 4 decimals"]),
    ("atp.domains", ["medical", "medical"], ["atp.domains", "['medical'] listed more than once"]),
    ("atp.domains", ["medical-qa"], ["atp.domains", "'medical-qa' cannot be part of a model name"]),
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
    with pytest.raises(ParamsError, match="recovery.medical.tasks: 'caselaw' is not under evaluate.domain_tasks"):
        validate(with_change("evaluate.recovery.medical.tasks", ["caselaw"]))
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


# --- one config per method: params.yaml's section is the trainer's config --------------------------------

# The keys of each method's section that the stage reads and no trainer does; every other key must
# reach the trainer config. A new section key fails here until it is listed or given to the trainer.
STAGE_ONLY = {
    "tomoe": {"budgets", "domain", "device", "seq_len", "num_processes", "name_tolerance"},
    "atp": {"domains", "budgets", "device", "seq_len", "calibration_blocks", "lora"},
}


BOUND_CHECKS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def changed_value(default, bounds: dict):
    """A valid value other than an int or float config default, so a field lost on the way shows."""
    new = default + 1 if isinstance(default, int) else default + 0.25
    assert all(BOUND_CHECKS[kind](new, bound) for kind, bound in bounds.items()), f"{new} breaks {bounds}"
    return new


def non_default_section(config, names) -> dict:
    fields = {spec.name: spec for spec in dataclasses.fields(config)}
    return {name: changed_value(fields[name].default, bounds_of(fields[name])) for name in names}


def test_every_tomoe_section_key_reaches_the_trainer():
    trainer_keys = set(ToMoEParams.model_fields) - STAGE_ONLY["tomoe"]
    assert trainer_keys == {spec.name for spec in dataclasses.fields(ToMoEConfig)} - set(TOMOE_PER_RUN)
    raw = with_change("tomoe", {**SHIPPED["tomoe"], **non_default_section(ToMoEConfig, trainer_keys)})
    config = validate(raw).tomoe.trainer_config(p=0.25, seed=11)
    expected = {**{k: v for k, v in raw["tomoe"].items() if k in trainer_keys}, "p": 0.25, "seed": 11}
    assert dataclasses.asdict(config) == expected


def test_every_atp_section_key_reaches_the_trainer():
    lora_keys = set(LoraParams.model_fields)
    trainer_keys = set(ATPParams.model_fields) - STAGE_ONLY["atp"]
    run_fields = {spec.name for spec in dataclasses.fields(LoraRunConfig)}
    atp_fields = {spec.name for spec in dataclasses.fields(ATPConfig)}
    assert lora_keys | (trainer_keys & run_fields) == run_fields - {"seed"}
    assert trainer_keys - run_fields == atp_fields - set(ATP_PER_RUN)
    section = {
        **SHIPPED["atp"],
        **non_default_section(LoraRunConfig, trainer_keys & run_fields),
        **non_default_section(ATPConfig, trainer_keys - run_fields),
        "lora": non_default_section(LoraRunConfig, lora_keys),
    }
    config = validate(with_change("atp", section)).atp.trainer_config(p=0.25, seed=11)
    expected_run = {**{k: v for k, v in section.items() if k in run_fields}, **section["lora"], "seed": 11}
    expected = {**{k: v for k, v in section.items() if k in atp_fields}, "lora": expected_run, "p": 0.25}
    assert dataclasses.asdict(config) == expected


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/gpu.yaml"])
def test_shipped_method_settings_are_what_the_trainers_get(profile):
    """A renamed config field fails here: the shipped key no longer validates, or no longer arrives."""
    raw = yaml.safe_load((ROOT / profile).read_text())
    params = load_params(ROOT / profile)
    tomoe = dataclasses.asdict(params.tomoe.trainer_config(p=params.tomoe.budgets[0], seed=params.seed))
    assert {k: v for k, v in raw["tomoe"].items() if k not in STAGE_ONLY["tomoe"]}.items() <= tomoe.items()
    atp = dataclasses.asdict(params.atp.trainer_config(p=params.atp.budgets[0], seed=params.seed))
    given = {k: v for k, v in raw["atp"].items() if k not in STAGE_ONLY["atp"]}
    assert given.items() <= {**atp, **atp["lora"]}.items()
    assert raw["atp"]["lora"].items() <= atp["lora"].items()


def test_a_config_field_no_section_declares_is_an_error_not_a_default():
    section = validate(copy.deepcopy(SHIPPED)).tomoe
    with pytest.raises(TypeError, match="ToMoEConfig.p must come from exactly one params section"):
        build_config(ToMoEConfig, [section], seed=0)


@pytest.mark.parametrize("section", [ToMoEParams, StaticParams, ATPParams, LoraParams])
def test_every_method_setting_has_help_text(section):
    missing = [name for name, spec in section.model_fields.items() if not spec.description]
    assert not missing, f"{section.__name__} fields without a description: {missing}"


@pytest.mark.parametrize("module", ["names.py", "options.py", "methods/tomoe/config.py", "methods/atp/config.py"])
def test_names_and_configs_load_without_torch_or_pydantic(module):
    """GPU benchmark hosts import these without pydantic; params validation must not load torch."""
    tree = ast.parse((ROOT / "src" / "llmcarve" / module).read_text())
    imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    outside = [name for name in imported if name.split(".")[0] not in sys.stdlib_module_names and name != "llmcarve.options"]
    assert not outside, f"{module} imports {outside} at the top level"


# --- defects: duplicate budgets, duplicate YAML keys, booleans taken as numbers ---------------------------

DUPLICATE_BUDGETS = [
    ("tomoe.budgets", [0.5, 0.5000001], ["0.5 and 0.5000001 both name tomoe@0.5", "first 4 decimals"]),
    ("tomoe.budgets", [0.5, 0.5], ["duplicate budget 0.5", "listed twice"]),
    ("static.budgets", [0.7, 0.70000004], ["0.7 and 0.70000004 both name static@0.7"]),
    ("static.budgets", [0.7, 0.7], ["duplicate budget 0.7"]),
    ("atp.budgets", [0.6, 0.60001], ["0.6 and 0.60001 both name atp-<domain>@0.6"]),
    ("atp.budgets", [0.6, 0.6], ["duplicate budget 0.6"]),
]


@pytest.mark.parametrize("key,budgets,words", DUPLICATE_BUDGETS, ids=[f"{k}={v}" for k, v, _ in DUPLICATE_BUDGETS])
def test_budgets_naming_the_same_model_are_refused_as_duplicates(key, budgets, words):
    with pytest.raises(ParamsError) as error:
        validate(with_change(key, budgets))
    message = str(error.value)
    for word in [key, "duplicate budget", *words]:
        assert word in message, f"{word!r} missing from: {message}"
    assert "evaluate.models" not in message


def test_produced_model_names_use_the_canonical_budget():
    params = validate(with_change("tomoe.budgets", [0.5, 0.55, 0.125, 0.33333]))
    produced = [name for name in params.carved_model_names() if name.startswith("tomoe")]
    assert produced == ["tomoe@0.5", "tomoe@0.55", "tomoe@0.125", "tomoe@0.3333"]


def test_duplicate_yaml_key_is_refused_with_file_line_and_key(tmp_path):
    lines = (ROOT / "params.yaml").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  num_experts:"))
    lines.insert(first + 2, "  num_experts: 4")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    for word in [str(path), f"line {first + 3}", "'tomoe.num_experts'", f"first on line {first + 1}", "twice"]:
        assert word in message, f"{word!r} missing from: {message}"


def test_duplicate_key_in_a_flow_mapping_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("lora: {rank: 8,", "lora: {rank: 8, rank: 4,", 1))
    assert "rank: 4" in path.read_text()
    with pytest.raises(ParamsError, match=r"key 'atp\.lora\.rank' is given twice"):
        load_params(path)


BOOLEANS_FOR_NUMBERS = ["seed", "data.block_size", "tomoe.num_experts", "tomoe.lr", "atp.steps", "atp.lora.rank",
                        "atp.lora.dropout", "evaluate.zero_shot_limit", "export_onnx.max_rel_err"]


@pytest.mark.parametrize("key", BOOLEANS_FOR_NUMBERS)
def test_boolean_is_refused_where_a_number_is_expected(key):
    with pytest.raises(ParamsError) as error:
        validate(with_change(key, True))
    assert f"{key} = True: true is a boolean" in str(error.value)


def test_boolean_budget_is_refused():
    with pytest.raises(ParamsError, match=r"tomoe\.budgets\.1 = False: false is a boolean"):
        validate(with_change("tomoe.budgets", [0.5, False]))
