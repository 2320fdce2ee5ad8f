"""The `llmcarve` command: single jobs without the pipeline, thin over the library functions the stages call.

    llmcarve carve static --model SRC --budget P --out DIR      static pruning from calibration statistics
    llmcarve carve tomoe  --model SRC --budget P --out DIR      ToMoE: train heads, convert to a top-1 MoE
    llmcarve carve atp    --model SRC --budget P --out DIR --domain D    ATP: LoRA + learned pruning on a domain
    llmcarve evaluate DIR [DIR ...]                             perplexity on the held-out BoolQ passages (+ tasks)
    llmcarve export DIR                                         DIR/onnx, checked against PyTorch
    llmcarve check-params [FILE]                                validate a params file

A method's options are its trainer config's fields (llmcarve.methods.<method>.config): the same names,
defaults, help texts and bounds as its section of params.yaml, validated by the same schema
(llmcarve.params), so a default lives in one place. A bad value fails with one `error:` line before any
model is loaded; `--debug` prints the traceback of a failure instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmcarve.methods.atp.config import ATPConfig, LoraRunConfig
from llmcarve.methods.tomoe.config import ToMoEConfig
from llmcarve.names import format_budget
from llmcarve.options import bounds_of, help_of
from llmcarve.params import (
    ATP_PER_RUN,
    LORA_SECTION_FIELDS,
    TOMOE_PER_RUN,
    ATPParams,
    CalibrateParams,
    DataParams,
    EvaluateParams,
    ExportOnnxParams,
    ModelParams,
    Params,
    ParamsError,
    PerplexityParams,
    ToMoEParams,
    fields_except,
    load_params,
)

log = logging.getLogger("llmcarve")

BOUND_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
PERPLEXITY_METRIC = "boolq_wikipedia"  # the pipeline's name for the held-out BoolQ passages (general/heldout)
GENERAL_DOMAIN = "general"


class CommandError(Exception):
    """A bad option value, found before any compute; printed as one `error:` line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one `error:` line and points to --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------------------------------------------
# options from the config dataclasses and the params schema


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help texts with %


def bounds_text(bounds: Mapping[str, float]) -> str:
    return ", ".join(f"{BOUND_SYMBOLS[kind]} {value:g}" for kind, value in bounds.items())


def config_help(spec: dataclasses.Field) -> str:
    """The field's help text, default and bounds: what `--help` shows for a config option."""
    bounds = bounds_of(spec)
    return escape(f"{help_of(spec)} (default: {spec.default:g}" + (f"; {bounds_text(bounds)})" if bounds else ")"))


def add_config_options(parser: argparse.ArgumentParser, config: type, names: Iterable[str], title: str, prefix: str = "") -> None:
    """One option per config field in `names`: --<prefix><field>, typed, defaulting to the field's default."""
    hints = typing.get_type_hints(config)
    declared = {spec.name: spec for spec in dataclasses.fields(config)}
    group = parser.add_argument_group(title)
    for name in names:
        spec = declared[name]
        group.add_argument(
            flag(prefix + name), dest=prefix + name, type=hints[name], default=spec.default,
            metavar="N" if hints[name] is int else "X", help=config_help(spec),
        )


def schema_default(section: type[BaseModel], key: str) -> Any:
    """A params.yaml key's default, so the command line and the pipeline start from the same value."""
    return section.model_fields[key].get_default(call_default_factory=True)


def option_of(location: tuple, flags: Mapping[str, str]) -> str:
    """The option a schema error's location names: the innermost key that `flags` maps, else --<innermost key>."""
    keys = [part for part in location if isinstance(part, str)]
    mapped = [flags[key] for key in reversed(keys) if key in flags]
    return mapped[0] if mapped else flag(keys[-1]) if keys else "options"


def validated(section: type[BaseModel], values: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> BaseModel:
    """`section` validated from option values by the params schema, each problem named by its option
    (`flags` maps a params key to its option where the two differ)."""
    try:
        return section.model_validate(dict(values))
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            shown = "" if isinstance(given, (dict, list)) else f" {given!r}"
            problems.append(f"{option_of(problem['loc'], flags or {})}{shown}: {message}")
        raise CommandError("; ".join(problems)) from None


def checked_budget(budget: float) -> float:
    """--budget as a model name states it (llmcarve.names): refused with the names' own message."""
    try:
        format_budget(budget)
    except ValueError as error:
        raise CommandError(f"--budget: {error}") from None
    return budget


def checked_out(out: Path, overwrite: bool) -> Path:
    """The output directory: refused when something is there already, unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CommandError(f"--out {out} already exists and is not empty; choose a new directory, or pass --overwrite to replace it")
    return out


def checked_source(source: str, allow_pickle_weights: bool) -> str:
    """--model: validated as params.yaml's model.source, then refused early if it names a missing path."""
    from llmcarve.models.loading import check_model_source

    validated(ModelParams, {"source": source, "allow_pickle_weights": allow_pickle_weights}, {"source": "--model"})
    check_model_source(source)
    return source


def checked_block_size(block_size: int, seq_len: int | None = None) -> int:
    validated(DataParams, {"block_size": block_size, "sources": {}, "domains": {}})
    if seq_len is not None and seq_len > block_size:
        raise CommandError(f"--seq-len {seq_len} is longer than --block-size {block_size}; lower --seq-len or raise --block-size")
    return block_size


# ------------------------------------------------------------------------------------------------
# carve


def add_carve_common(parser: argparse.ArgumentParser, domain_text: str, domain_default: str | None) -> None:
    job = parser.add_argument_group("the job")
    job.add_argument("--model", default=schema_default(ModelParams, "source"), metavar="SRC",
                     help="the model to carve: " + escape(ModelParams.model_fields["source"].description) + " (default: %(default)s)")
    job.add_argument("--budget", type=float, required=True, metavar="P",
                     help="KEPT fraction of attention+MLP weights, in (0, 1]: 0.7 keeps 70%% (names the model <method>@P)")
    job.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="the carved model's Hugging Face directory (safetensors, config.json naming the model, tokenizer)")
    job.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new model is written)")
    job.add_argument("--domain", required=domain_default is None, default=domain_default, metavar="DOMAIN", help=domain_text)
    job.add_argument("--block-size", type=int, default=schema_default(DataParams, "block_size"), metavar="N",
                     help="tokens per packed block of the corpus, as data.block_size packs a domain (default: %(default)s)")
    job.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to compute: auto = CUDA when a CUDA device is visible, else the CPU (default: %(default)s)")
    job.add_argument("--seed", type=int, default=schema_default(Params, "seed"), metavar="N",
                     help=escape(Params.model_fields["seed"].description) + " (default: %(default)s)")
    job.add_argument("--allow-pickle-weights", action="store_true",
                     help=escape(ModelParams.model_fields["allow_pickle_weights"].description))


DOMAIN_HELP = (
    "the text to {use}: a builtin domain ({builtins}: the pipeline's domains of builtin corpora), "
    "or a .txt/.md file (one document per paragraph) or .jsonl file with a `text` field"
)


def domain_help(use: str, tail: str) -> str:
    from llmcarve.data.domains import BUILTIN_DOMAINS

    return DOMAIN_HELP.format(use=use, builtins=", ".join(BUILTIN_DOMAINS)) + tail


CONFIG_TITLE = "{config} fields (params.yaml's {section} keys of the same names, '-' for '_')"


def add_checkpoints(parser) -> None:
    parser.add_argument("--checkpoints", type=Path, metavar="DIR",
                        help="keep training checkpoints here, so that a killed run resumes (default: a temporary directory)")


def add_static_parser(carve: argparse._SubParsersAction) -> None:
    parser = carve.add_parser("static", help="static structured pruning from calibration statistics",
                              description="Static structured pruning: rank channels and head dims by the dense model's "
                              "activations on calibration blocks, slice the least active away (no training).")
    add_carve_common(parser, domain_help("calibrate on", " (default: %(default)s)"), schema_default(CalibrateParams, "domain"))
    calibration = parser.add_argument_group("calibration (params.yaml's calibrate: section)")
    calibration.add_argument("--calibration-blocks", type=int, default=schema_default(CalibrateParams, "num_blocks"), metavar="N",
                             help="blocks, sampled with --seed, whose activations rank the channels (calibrate.num_blocks; default: %(default)s)")
    calibration.add_argument("--calibration-batch-size", type=int, default=schema_default(CalibrateParams, "batch_size"), metavar="N",
                             help="blocks per forward pass while calibrating (calibrate.batch_size; default: %(default)s)")
    parser.set_defaults(handler=run_carve_static)


def add_tomoe_parser(carve: argparse._SubParsersAction) -> None:
    parser = carve.add_parser("tomoe", help="ToMoE: train routers and masks, convert every MLP to a top-1 MoE",
                              description="ToMoE dynamic structural pruning: the model stays frozen while a hypernetwork "
                              "learns per-token masks; the result is a deterministic top-1 Mixture-of-Experts model.")
    add_carve_common(parser, domain_help("train on", " (default: %(default)s)"), schema_default(ToMoEParams, "domain"))
    training = parser.add_argument_group("training (params.yaml's tomoe: keys of the stage)")
    add_checkpoints(training)
    training.add_argument("--seq-len", type=int, default=schema_default(ToMoEParams, "seq_len"), metavar="N",
                          help="tokens per training sequence, at most --block-size (tomoe.seq_len; default: %(default)s)")
    training.add_argument("--name-tolerance", type=float, default=schema_default(ToMoEParams, "name_tolerance"), metavar="X",
                          help=escape(ToMoEParams.model_fields["name_tolerance"].description.replace("the remove stage refuses", "the carve refuses"))
                          + " (tomoe.name_tolerance; default: %(default)s)")
    add_config_options(parser, ToMoEConfig, fields_except(ToMoEConfig, *TOMOE_PER_RUN), CONFIG_TITLE.format(config="ToMoEConfig", section="tomoe:"))
    parser.set_defaults(handler=run_carve_tomoe)


LORA_PREFIX = "lora_"  # atp.lora.rank is --lora-rank


def atp_option_names() -> tuple[list[str], list[str]]:
    """(LoraRunConfig fields under atp:, ATPConfig fields): the ATP options besides atp.lora's."""
    return fields_except(LoraRunConfig, *LORA_SECTION_FIELDS, "seed"), fields_except(ATPConfig, *ATP_PER_RUN)


def add_atp_parser(carve: argparse._SubParsersAction) -> None:
    parser = carve.add_parser("atp", help="ATP: LoRA on a domain jointly with learned structured pruning",
                              description="ATP all-in-one tuning and pruning: LoRA fine-tuning on a domain while a generator "
                              "learns which structures to prune; the LoRA is merged and the pruned structures sliced away.")
    add_carve_common(parser, domain_help("tune on", " (required; names the model atp-<domain>@P)"), None)
    training = parser.add_argument_group("training (params.yaml's atp: keys of the stage)")
    add_checkpoints(training)
    training.add_argument("--seq-len", type=int, default=schema_default(ATPParams, "seq_len"), metavar="N",
                          help="tokens per training sequence, at most --block-size (atp.seq_len; default: %(default)s)")
    training.add_argument("--calibration-blocks", type=int, default=schema_default(ATPParams, "calibration_blocks"), metavar="N",
                          help="the last N blocks feed the decision generator only; LoRA never trains on them "
                          "(atp.calibration_blocks; default: %(default)s)")
    run_fields, atp_fields = atp_option_names()
    add_config_options(parser, LoraRunConfig, run_fields, CONFIG_TITLE.format(config="LoraRunConfig", section="atp:"))
    add_config_options(parser, LoraRunConfig, LORA_SECTION_FIELDS, "LoRA (LoraRunConfig fields; params.yaml's atp.lora: keys, as --lora-<key>)", LORA_PREFIX)
    add_config_options(parser, ATPConfig, atp_fields, CONFIG_TITLE.format(config="ATPConfig", section="atp:"))
    parser.set_defaults(handler=run_carve_atp)


def carve_job(args: argparse.Namespace, seq_len: int | None = None):
    """The checks every carve makes before any compute, then the job (corpus read, nothing loaded yet)."""
    from llmcarve.data.domains import check_domain_choice, open_corpus
    from llmcarve.device import resolve_device
    from llmcarve.jobs.carve import CarveJob

    checked_out(args.out, args.overwrite)
    checked_block_size(args.block_size, seq_len)
    check_domain_choice(args.domain, "--domain")
    device = resolve_device(args.device, "--device")
    source = checked_source(args.model, args.allow_pickle_weights)
    log.info("reading the corpus of --domain %s", args.domain)
    corpus = open_corpus(args.domain, args.seed, "--domain")
    return CarveJob(source, args.out, corpus, device, args.seed, args.block_size, args.allow_pickle_weights, getattr(args, "checkpoints", None))


def run_carve_static(args: argparse.Namespace) -> int:
    from llmcarve.jobs.carve import carve_static

    checked_budget(args.budget)
    section = validated(CalibrateParams, {"num_blocks": args.calibration_blocks, "batch_size": args.calibration_batch_size},
                        {"num_blocks": "--calibration-blocks", "batch_size": "--calibration-batch-size"})
    name = carve_static(carve_job(args), args.budget, section.num_blocks, section.batch_size)
    print(f"{name}: {args.out}")
    return 0


def run_carve_tomoe(args: argparse.Namespace) -> int:
    from llmcarve.jobs.carve import carve_tomoe

    checked_budget(args.budget)
    values = {name: getattr(args, name) for name in fields_except(ToMoEConfig, *TOMOE_PER_RUN)}
    values |= {"budgets": [args.budget], "seq_len": args.seq_len, "name_tolerance": args.name_tolerance}
    section = validated(ToMoEParams, values, {"budgets": "--budget"})
    config = section.trainer_config(args.budget, args.seed)
    name = carve_tomoe(carve_job(args, section.seq_len), config, section.seq_len, section.name_tolerance)
    print(f"{name}: {args.out}")
    return 0


def run_carve_atp(args: argparse.Namespace) -> int:
    from llmcarve.jobs.carve import carve_atp

    checked_budget(args.budget)
    run_fields, atp_fields = atp_option_names()
    values = {name: getattr(args, name) for name in [*run_fields, *atp_fields]}
    values["lora"] = {name: getattr(args, LORA_PREFIX + name) for name in LORA_SECTION_FIELDS}
    values |= {"budgets": [args.budget], "seq_len": args.seq_len, "calibration_blocks": args.calibration_blocks}
    flags = {"budgets": "--budget"} | {name: flag(LORA_PREFIX + name) for name in LORA_SECTION_FIELDS}
    section = validated(ATPParams, values, flags)
    name = carve_atp(carve_job(args, section.seq_len), section.trainer_config(args.budget, args.seed), section.seq_len, section.calibration_blocks)
    print(f"{name}: {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# evaluate


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    from llmcarve.eval.tasks import BUILTIN_TASKS

    perplexity = PerplexityParams()
    parser = commands.add_parser(
        "evaluate", help="perplexity on the held-out BoolQ passages (and zero-shot tasks) of model directories",
        description="Perplexity of each model on the held-out BoolQ passages, the pipeline's evaluation corpus "
        f"(evaluate.perplexity.corpora.{PERPLEXITY_METRIC}, never trained on), with the pipeline's protocol: "
        "non-overlapping windows, no BOS. With --tasks, accuracy on multiple-choice tasks too. Prints a table, or JSON.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="Hugging Face model directories (a carved model, or any supported one)")
    parser.add_argument("--tasks", default="", metavar="TASK[,TASK...]",
                        help=f"builtin multiple-choice tasks to score, comma-separated ({', '.join(BUILTIN_TASKS)}; default: none)")
    parser.add_argument("--limit", type=int, default=schema_default(EvaluateParams, "zero_shot_limit"), metavar="N",
                        help="questions per task, a seeded sample (evaluate.zero_shot_limit; default: %(default)s)")
    parser.add_argument("--windows", type=int, default=perplexity.max_windows, metavar="N",
                        help="perplexity windows of --seq-len tokens, from the corpus's start (evaluate.perplexity.max_windows; default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=perplexity.seq_len, metavar="N",
                        help="tokens per perplexity window (evaluate.perplexity.seq_len; default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=schema_default(EvaluateParams, "batch_size"), metavar="N",
                        help="answer choices per forward pass when scoring tasks (evaluate.batch_size; default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where to compute: auto = CUDA when visible, else the CPU (default: %(default)s, as the evaluate stage)")
    parser.add_argument("--seed", type=int, default=schema_default(Params, "seed"), metavar="N",
                        help="seeds the sample of questions (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the full reports as JSON instead of the table")
    parser.set_defaults(handler=run_evaluate)


def evaluate_section(args: argparse.Namespace) -> EvaluateParams:
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    values = {
        "batch_size": args.batch_size,
        "perplexity": {"seq_len": args.seq_len, "max_windows": args.windows, "corpora": {PERPLEXITY_METRIC: f"{GENERAL_DOMAIN}/heldout"}},
        "zero_shot": {task: {"builtin": task} for task in tasks},
        "zero_shot_limit": args.limit,
    }
    return validated(EvaluateParams, values, {"max_windows": "--windows", "zero_shot_limit": "--limit", "zero_shot": "--tasks"})


def run_evaluate(args: argparse.Namespace) -> int:
    from llmcarve.device import resolve_device
    from llmcarve.jobs.evaluate import evaluate_model, heldout_corpus, perplexity_tokens
    from llmcarve.jobs.models import name_of
    from llmcarve.models.loading import check_model_directory, load_model

    section = evaluate_section(args)
    for directory in args.dirs:
        check_model_directory(directory)
    device = resolve_device(args.device, "--device")
    passages = heldout_corpus(GENERAL_DOMAIN, args.seed)
    reports = {}
    for directory in args.dirs:
        log.info("evaluating %s", directory)
        model, tokenizer = load_model(directory, "float32", str(device))
        tokens = perplexity_tokens(tokenizer, passages, "the held-out BoolQ passages")
        report = evaluate_model(model, tokenizer, section, {PERPLEXITY_METRIC: tokens}, args.seed, speed=False)
        reports[str(directory)] = {"name": name_of(directory), **report}
    print(json.dumps({"models": reports}, indent=2, sort_keys=True) if args.json else results_table(reports))
    return 0


def results_table(reports: Mapping[str, dict]) -> str:
    """One row per model: name, directory, active ratio, parameters, perplexity, task accuracies."""
    tasks = list(dict.fromkeys(task for report in reports.values() for task in report["zero_shot"]))
    header = ["model", "directory", "active", "params", f"ppl {PERPLEXITY_METRIC}", *(f"acc {task}" for task in tasks)]
    rows = [
        [
            report["name"], directory, f"{report['active_ratio']:.3f}", f"{report['params_total'] / 1e6:.1f}M",
            f"{report['ppl'][PERPLEXITY_METRIC]['ppl']:.2f}", *(f"{report['zero_shot'][task]['acc']:.3f}" for task in tasks),
        ]
        for directory, report in reports.items()
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])


# ------------------------------------------------------------------------------------------------
# export


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    defaults = ExportOnnxParams()
    parser = commands.add_parser(
        "export", help="ONNX export of a model directory to DIR/onnx, checked against PyTorch",
        description="Export a model directory to ONNX (one graph for prefill and decoding with past keys/values) in "
        "DIR/onnx, then check onnxruntime against PyTorch as the export_onnx stage does: logits on random tokens, "
        "greedy generation, and every routed expert of an MoE model. The report is DIR/onnx/parity.json.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="a Hugging Face model directory")
    parser.add_argument("--max-rel-err", type=float, default=defaults.max_rel_err, metavar="X",
                        help=escape(ExportOnnxParams.model_fields["max_rel_err"].description) + " (export_onnx.max_rel_err; default: %(default)g)")
    parser.add_argument("--greedy-tokens", type=int, default=defaults.greedy_tokens, metavar="N",
                        help=escape(ExportOnnxParams.model_fields["greedy_tokens"].description) + " (default: %(default)s)")
    parser.add_argument("--optimize", action="store_true",
                        help=escape(ExportOnnxParams.model_fields["optimize"].description.replace("see params.yaml", "off by default")))
    parser.add_argument("--no-speed", action="store_true", help="skip timing onnxruntime against PyTorch")
    parser.add_argument("--seed", type=int, default=schema_default(Params, "seed"), metavar="N",
                        help="seeds the random tokens of the checks (default: %(default)s)")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from llmcarve.export.verdict import failures, near_tie_count
    from llmcarve.io import write_json
    from llmcarve.jobs.export import export_and_check
    from llmcarve.models.loading import check_model_directory

    values = {"max_rel_err": args.max_rel_err, "greedy_tokens": args.greedy_tokens, "optimize": args.optimize}
    section = validated(ExportOnnxParams, values | ({"speed": None} if args.no_speed else {}))
    check_model_directory(args.dir)
    out = args.dir / "onnx"
    report = export_and_check(args.dir, out, section, args.seed, str(args.dir))
    write_json(out / "parity.json", report)
    print(f"{out / 'model.onnx'}: logits rel_err {report['rel_err']:.2e}, greedy tokens "
          f"{'match' if report['greedy_match'] else 'differ'}, {near_tie_count(report)} near-ties (report: {out / 'parity.json'})")
    failed = failures({str(args.dir): report}, section.max_rel_err, key="--max-rel-err")
    if failed:
        raise CommandError(f"the ONNX export does not compute what PyTorch computes: {failed[str(args.dir)]}")
    return 0


# ------------------------------------------------------------------------------------------------
# check-params


def check_params(path: str) -> int:
    try:
        params = load_params(path)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(params.data.sources)} sources, {len(params.data.domains)} domains, evaluate models: {', '.join(params.evaluate.models)})")
    return 0


def add_check_params_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("check-params", help="validate a params file against the schema",
                                 description="Validate a params file: every problem with its key, its value and what is allowed.")
    parser.add_argument("path", nargs="?", default="params.yaml", metavar="FILE", help="the params file (default: %(default)s)")
    parser.set_defaults(handler=lambda args: check_params(args.path))


# ------------------------------------------------------------------------------------------------
# the command


def build_parser() -> Parser:
    parser = Parser(prog="llmcarve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of a failure instead of one error line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="the job to run (COMMAND --help explains it)")
    carve = commands.add_parser("carve", help="carve one model with one method at one budget",
                                description="Carve one model with one method at one budget into a Hugging Face directory.")
    methods = carve.add_subparsers(dest="method", required=True, metavar="METHOD", help="the carving method (METHOD --help lists its options)")
    for add in (add_static_parser, add_tomoe_parser, add_atp_parser):
        add(methods)
    add_evaluate_parser(commands)
    add_export_parser(commands)
    add_check_params_parser(commands)
    return parser


def user_facing_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message says what to fix (the stages print the same ones as one line)."""
    from llmcarve.data.sources import SourceError
    from llmcarve.errors import UserError
    from llmcarve.io import InsufficientDiskSpaceError
    from llmcarve.methods.tomoe.trainer import NonFiniteLossError
    from llmcarve.models.adapters import UnsupportedModelError

    return (CommandError, UserError, ParamsError, SourceError, UnsupportedModelError, InsufficientDiskSpaceError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except user_facing_errors() as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
