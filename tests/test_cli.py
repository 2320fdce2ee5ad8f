"""The `llmcarve` command: its options are the config fields (help, default, bounds written once), bad input
is one `error:` line before anything is loaded, a carve round-trips on tiny models, and the stages it shares
its library with import that library, never each other, and depend on every source file they run."""

import argparse
import ast
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from llmcarve import cli
from llmcarve.cli import main
from llmcarve.data.domains import BUILTIN_DOMAINS
from llmcarve.device import resolve_device
from llmcarve.errors import UserInputError
from llmcarve.methods.atp.config import ATPConfig, LoraRunConfig
from llmcarve.methods.tomoe.config import ToMoEConfig
from llmcarve.names import ModelName
from llmcarve.options import bounds_of, help_of
from llmcarve.params import ATP_PER_RUN, LORA_SECTION_FIELDS, TOMOE_PER_RUN, ToMoEParams, fields_except
from tests.tiny import TRAINING_TEXT, save_tiny, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `llmcarve argv...` run in this process."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse: --help and usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def help_text(capsys, monkeypatch, *command: str) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # no help text wrapped, so none has a hyphen broken
    status, out, _ = run_cli(capsys, *command, "--help")
    assert status == 0
    return out


def described_options(help_output: str) -> dict[str, str]:
    """{'--flag': 'METAVAR description'} from a --help output: an entry is a line starting with two spaces and
    a dash, plus the more deeply indented lines under it (argparse puts a long option's help on the next line)."""
    entries = re.split(r"\n(?=  -)", help_output.split("\noptions:", 1)[1])
    described = {}
    for entry in entries:
        words = entry.split("\n\n", 1)[0].split()  # a blank line ends a group's last entry
        if words and words[0].startswith("--"):
            described[words[0].rstrip(",")] = " ".join(words[1:])
    return described


# --- help: every option explained, every config field an option ------------------------------------------

METHOD_FIELDS = [
    (("carve", "tomoe"), ToMoEConfig, fields_except(ToMoEConfig, *TOMOE_PER_RUN), ""),
    (("carve", "atp"), LoraRunConfig, fields_except(LoraRunConfig, *LORA_SECTION_FIELDS, "seed"), ""),
    (("carve", "atp"), LoraRunConfig, list(LORA_SECTION_FIELDS), "lora_"),
    (("carve", "atp"), ATPConfig, fields_except(ATPConfig, *ATP_PER_RUN), ""),
]


@pytest.mark.parametrize(("command", "config", "names", "prefix"), METHOD_FIELDS, ids=lambda v: getattr(v, "__name__", None))
def test_help_lists_every_config_field_with_its_help_default_and_bounds(command, config, names, prefix, capsys, monkeypatch):
    described = described_options(help_text(capsys, monkeypatch, *command))
    fields = {spec.name: spec for spec in dataclasses.fields(config)}
    for name in names:
        spec = fields[name]
        option = "--" + (prefix + name).replace("_", "-")
        assert option in described, f"{option} is not described in `llmcarve {' '.join(command)} --help`"
        shown = described[option].split(" ", 1)[1]  # after the metavar
        assert shown.startswith(help_of(spec)), f"{option}: the help text of {config.__name__}.{name} is missing"
        assert f"default: {spec.default:g}" in shown, f"{option}: its default is missing"
        for kind, value in bounds_of(spec).items():
            assert f"{cli.BOUND_SYMBOLS[kind]} {value:g}" in shown, f"{option}: its bound {kind} {value:g} is missing"


def all_parsers(parser, path=("llmcarve",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from all_parsers(child, (*path, name))


def test_every_option_of_every_command_is_explained(capsys, monkeypatch):
    parsers = dict(all_parsers(cli.build_parser()))
    assert {("llmcarve", "carve", m) for m in ("static", "tomoe", "atp")} | {("llmcarve", c) for c in ("evaluate", "export", "check-params")} <= set(parsers)
    for path, parser in parsers.items():
        for action in parser._actions:
            if action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"{' '.join(path)} {action.option_strings or action.dest}: no help text"
        text = help_text(capsys, monkeypatch, *path[1:])
        assert "%(" not in text, f"{' '.join(path)} --help shows an unexpanded %(...) placeholder"


# --- options reach the trainer's config -------------------------------------------------------------------


@pytest.fixture
def captured_jobs(monkeypatch, tmp_path):
    """The carve handlers' calls to the library, with no corpus read and no model loaded."""
    from llmcarve.data.domains import Corpus
    from llmcarve.jobs import carve

    calls = {}
    monkeypatch.setattr(cli, "carve_job", lambda args, seq_len=None: carve.CarveJob("src", args.out, Corpus("medical", [], []), torch.device("cpu")))
    for method in ("static", "tomoe", "atp"):
        def record(job, config, *rest, method=method):
            calls[method] = (config, *rest)
            return ModelName(method, domain="medical" if method == "atp" else None, budget=0.5)

        monkeypatch.setattr(carve, f"carve_{method}", record)
    return calls


def test_default_options_are_the_config_defaults_and_given_ones_reach_the_trainer(captured_jobs, capsys, tmp_path):
    out = tmp_path / "out"
    assert run_cli(capsys, "carve", "tomoe", "--budget", "0.5", "--out", out)[0] == 0
    assert captured_jobs["tomoe"] == (ToMoEConfig(p=0.5, seed=0), 512, ToMoEParams().name_tolerance)
    given = ("--lr", "0.02", "--num-experts", "4", "--seed", "3", "--seq-len", "128", "--name-tolerance", "0.1")
    assert run_cli(capsys, "carve", "tomoe", "--budget", "0.7", "--out", out, *given)[0] == 0
    assert captured_jobs["tomoe"] == (ToMoEConfig(p=0.7, seed=3, lr=0.02, num_experts=4), 128, 0.1)

    assert run_cli(capsys, "carve", "atp", "--budget", "0.6", "--out", out, "--domain", "medical")[0] == 0
    assert captured_jobs["atp"] == (ATPConfig(lora=LoraRunConfig(seed=0), p=0.6), 512, 16)
    given = ("--steps", "10", "--lora-rank", "4", "--lora-lr", "0.002", "--generator-lr", "0.05", "--calibration-blocks", "3")
    assert run_cli(capsys, "carve", "atp", "--budget", "0.6", "--out", out, "--domain", "medical", *given)[0] == 0
    assert captured_jobs["atp"] == (ATPConfig(lora=LoraRunConfig(steps=10, rank=4, lr=0.002, seed=0), p=0.6, generator_lr=0.05), 512, 3)

    assert run_cli(capsys, "carve", "static", "--budget", "0.5", "--out", out, "--calibration-blocks", "8")[0] == 0
    assert captured_jobs["static"] == (0.5, 8, 4)


# --- bad input: one line, before any compute ----------------------------------------------------------------

BAD_INPUTS = [
    # (argv, exit status, words the one error line must contain)
    (["carve", "static", "--budget", "1.5"], 1, ["--budget", "1.5 is outside (0, 1]", "KEPT fraction"]),
    (["carve", "tomoe", "--budget", "0"], 1, ["--budget", "outside (0, 1]"]),
    (["carve", "tomoe", "--budget", "0.5", "--lr", "-1"], 1, ["--lr -1.0", "greater than 0"]),
    (["carve", "tomoe", "--budget", "0.5", "--num-experts", "65", "--steps", "0"], 1, ["--num-experts 65", "less than or equal to 64", "--steps 0"]),
    (["carve", "atp", "--budget", "0.6", "--domain", "medical", "--lora-dropout", "1.0"], 1, ["--lora-dropout 1.0", "less than 1"]),
    (["carve", "atp", "--budget", "0.6", "--domain", "medical", "--search-fraction", "0"], 1, ["--search-fraction 0.0", "greater than 0"]),
    (["carve", "static", "--budget", "0.5", "--model", "./no-such-model"], 1, ["--model './no-such-model'", "path does not exist"]),
    (["carve", "static", "--budget", "0.5", "--model", "."], 1, [". is not a complete model directory", "no config.json"]),
    (["carve", "static", "--budget", "0.5", "--domain", "nowhere"], 1, ["--domain 'nowhere' is neither a builtin domain", "general"]),
    (["carve", "tomoe", "--budget", "0.5", "--seq-len", "1024"], 1, ["--seq-len 1024 is longer than --block-size 512"]),
    (["carve", "static", "--budget", "0.5", "--block-size", "4"], 1, ["--block-size 4", "greater than or equal to 8"]),
    (["carve", "static", "--budget", "abc"], 2, ["argument --budget: invalid float value: 'abc'", "llmcarve carve static --help"]),
    (["carve", "atp", "--budget", "0.6"], 2, ["the following arguments are required: --domain"]),
    (["evaluate", "no-such-dir"], 1, ["no such directory: no-such-dir"]),
    (["evaluate", ".", "--tasks", "arc_easy,nope"], 1, ["--tasks", "unknown builtin task 'nope'", "arc_easy"]),
    (["evaluate", ".", "--windows", "0"], 1, ["--windows 0", "greater than 0"]),
    (["export", "no-such-dir"], 1, ["no such directory: no-such-dir"]),
    (["export", ".", "--max-rel-err", "0"], 1, ["--max-rel-err 0.0", "greater than 0"]),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model, a corpus or a question is read."""
    # imported before patching: a module first imported under the patch would keep the stand-in for good
    from llmcarve.data import domains
    from llmcarve.jobs import carve, evaluate, export, models
    from llmcarve.models import loading

    def refuse(*args, **kwargs):
        pytest.fail("loaded data or a model although the input was bad")

    for module, name in ((loading, "load_model"), (loading, "materialize"), (domains, "open_corpus"), (models, "prepared_model_dir"),
                         (carve, "load_model"), (export, "load_model"), (evaluate, "heldout_corpus")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize(("argv", "status", "words"), BAD_INPUTS, ids=[" ".join(case[0][:3]) + f"-{i}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_error_line_before_anything_is_loaded(argv, status, words, nothing_loads, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "carve" and "--budget" in argv and "--out" not in argv:
        argv = [*argv, "--out", "out"]
    code, out, err = run_cli(capsys, *argv)
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_occupied_output_directory_is_refused_unless_overwrite(nothing_loads, capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "carve", "static", "--budget", "0.5", "--out", tmp_path / "out")
    assert code == 1 and "already exists and is not empty" in err and "--overwrite" in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_cuda_asked_without_cuda_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserInputError, match=r"^tomoe\.device is 'cuda' but no CUDA device is visible.*set tomoe\.device to 'auto' or 'cpu'$"):
        resolve_device("cuda", "tomoe.device")
    assert resolve_device("auto", "tomoe.device") == torch.device("cpu")


# --- tiny carve round trips -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A tiny Llama directory and a text file of a few hundred tokens (one paragraph per document)."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "Notes-2024.txt"
    corpus.write_text("\n\n".join(f"{text} ({index})" for index, text in enumerate(TRAINING_TEXT * 2)))
    return Path(save_tiny(tiny_llama(gqa=True), root / "tiny")), corpus


TINY = ("--block-size", "16", "--device", "cpu")


def carved(directory: Path):
    from transformers import AutoModelForCausalLM

    from llmcarve.eval.accounting import parameter_report

    model = AutoModelForCausalLM.from_pretrained(directory)
    logits = model(input_ids=torch.arange(3, 19).view(1, 16)).logits
    assert torch.isfinite(logits).all()
    return model.config.llmcarve_name, parameter_report(model, context_len=16)["active_ratio"]


@pytest.fixture(scope="module")
def static_dir(tiny_inputs, tmp_path_factory):
    model, corpus = tiny_inputs
    out = tmp_path_factory.mktemp("static") / "static"
    argv = ["carve", "static", "--model", model, "--budget", "0.5", "--out", out, "--domain", corpus, *TINY, "--calibration-blocks", "4"]
    assert main([str(arg) for arg in argv]) == 0
    return out


def test_carve_static_writes_a_named_model_at_its_budget(static_dir):
    name, active = carved(static_dir)
    assert name == "static@0.5"
    assert active == pytest.approx(0.5, rel=0.05)  # head-dim granularity of a tiny model; prune_static checks 2%


def test_carve_tomoe_and_atp_write_named_models(tiny_inputs, tmp_path, capsys):
    model, corpus = tiny_inputs
    # two steps cannot reach the budget: --name-tolerance lets the untrained MoE model be written all the same
    tomoe = ("--steps", "2", "--num-experts", "2", "--seq-len", "16", "--checkpoint-every", "1", "--name-tolerance", "1")
    code, out, err = run_cli(capsys, "carve", "tomoe", "--model", model, "--budget", "0.5", "--out", tmp_path / "tomoe", "--domain", corpus, *TINY, *tomoe)
    assert code == 0, err
    assert out.strip() == f"tomoe@0.5: {tmp_path / 'tomoe'}"
    assert carved(tmp_path / "tomoe")[0] == "tomoe@0.5"

    atp = ("--steps", "3", "--batch-size", "1", "--calibration-blocks", "2", "--seq-len", "16", "--lora-rank", "2")
    code, out, err = run_cli(capsys, "carve", "atp", "--model", model, "--budget", "0.6", "--out", tmp_path / "atp", "--domain", corpus, *TINY, *atp)
    assert code == 0, err
    assert carved(tmp_path / "atp")[0] == "atp-notes_2024@0.6"  # the domain is named after the file


def test_evaluate_prints_perplexity_as_a_table_and_as_json(static_dir, tiny_inputs, capsys):
    model, _ = tiny_inputs
    code, out, err = run_cli(capsys, "evaluate", static_dir, model, "--windows", "2", "--seq-len", "16", "--json")
    assert code == 0, err
    reports = json.loads(out)["models"]
    assert [reports[str(d)]["name"] for d in (static_dir, model)] == ["static@0.5", "tiny"]
    for report in reports.values():
        ppl = report["ppl"]["boolq_wikipedia"]
        assert ppl["windows"] == 2 and math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1
    code, out, err = run_cli(capsys, "evaluate", static_dir, "--windows", "2", "--seq-len", "16")
    header, row = out.strip().splitlines()
    assert header.split() == ["model", "directory", "active", "params", "ppl", "boolq_wikipedia"]
    assert row.split()[0] == "static@0.5" and float(row.split()[-1]) == pytest.approx(reports[str(static_dir)]["ppl"]["boolq_wikipedia"]["ppl"], abs=0.01)


def test_export_writes_onnx_beside_the_model_and_fails_in_one_line_past_the_tolerance(static_dir, capsys):
    from llmcarve.params import ExportOnnxParams

    # a tolerance no two float32 engines meet, so one export shows both the report and the failure line
    code, out, err = run_cli(capsys, "export", static_dir, "--greedy-tokens", "4", "--no-speed", "--max-rel-err", "1e-12")
    assert (static_dir / "onnx" / "model.onnx").is_file()
    report = json.loads((static_dir / "onnx" / "parity.json").read_text())
    assert report["greedy_match"] and report["rel_err"] <= ExportOnnxParams().max_rel_err  # the stage's own tolerance
    assert "speed" not in report  # --no-speed
    assert out.strip().splitlines()[-1].startswith(f"{static_dir / 'onnx' / 'model.onnx'}: logits rel_err")  # after torch.onnx's own lines
    last = err.strip().splitlines()[-1]  # after the progress bars of loading
    assert code == 1 and err.count("error: ") == 1 and last.startswith("error: the ONNX export does not compute what PyTorch computes")
    assert "logits rel_err" in last and "> --max-rel-err 1e-12" in last


# --- the builtin domains are the pipeline's ------------------------------------------------------------------


def test_builtin_domains_are_the_embedded_domains_of_the_shipped_profiles():
    """Each builtin domain is the domain of that name in params.yaml, or else in profiles/gpu.yaml (legal):
    the corpora inside installed packages. (The GPU profile's `general` adds corpora fetched into .corpora/.)"""
    defined = {}
    for profile in ("profiles/gpu.yaml", "params.yaml"):  # params.yaml's definition wins
        data = yaml.safe_load((ROOT / profile).read_text())["data"]
        for domain, spec in data["domains"].items():
            defined[domain] = (profile, spec, data["sources"])
    assert set(BUILTIN_DOMAINS) == set(defined)
    for domain, (profile, spec, sources) in defined.items():
        recipe = BUILTIN_DOMAINS[domain]
        assert [sources[name]["builtin"] for name in spec["train"]] == list(recipe.train), f"{profile}: {domain}"
        assert [sources[name]["builtin"] for name in spec.get("heldout", [])] == list(recipe.heldout), f"{profile}: {domain}"
        assert spec.get("heldout_fraction", 0.1) == recipe.heldout_fraction, f"{profile}: {domain}"
        assert not any("max_documents" in sources[name] for name in spec["train"]), f"{profile}: {domain} caps a source the builtin reads whole"


# --- stages import the library, never each other, and depend on what they run ----------------------------------

STAGES = sorted(path.stem for path in (ROOT / "stages").glob("*.py") if path.stem not in ("__init__", "common"))
PACKAGE_ROOTS = {"llmcarve": ROOT / "src", "stages": ROOT}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, and the names it imports from them."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def module_file(module: str) -> Path | None:
    """The project file of `module` (its __init__.py for a package); None outside the project."""
    parts = module.split(".")
    if parts[0] not in PACKAGE_ROOTS:
        return None
    base = PACKAGE_ROOTS[parts[0]].joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def source_closure(module: str) -> set[str]:
    """Project files that importing `module` runs: its imports, theirs, and every enclosing package's __init__."""
    seen, pending = set(), [module]
    while pending:
        parts = pending.pop().split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(imported_modules(path))
    return {path.relative_to(ROOT).as_posix() for path in seen}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_the_library_and_stages_common_only(stage):
    stage_imports = {m for m in imported_modules(ROOT / "stages" / f"{stage}.py") if m.split(".")[0] == "stages" and module_file(m)}
    assert stage_imports <= {"stages.common"}, f"stages/{stage}.py imports {sorted(stage_imports - {'stages.common'})}: move what it needs into the library"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_depends_on_every_source_file_it_runs(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    assert spec["cmd"].split()[-1] == f"stages.{stage}"
    deps = [dep for dep in spec["deps"] if isinstance(dep, str)]
    missing = sorted(f for f in source_closure(f"stages.{stage}") if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage} runs these files without depending on them (add them, or their package, to its deps): {missing}"
