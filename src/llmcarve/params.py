"""Typed schema of params.yaml, validated before any compute.

Every stage calls `load_params(path, section=...)` first: a wrong key, type or value is reported with
its dotted path, the value given and what is allowed, and nothing is loaded or written.

Convention used everywhere: a ratio named `kept` or `p` is the KEPT fraction of attention+MLP
parameters (0.7 keeps 70%), never the pruned fraction.

One config per method: the `tomoe:` and `atp:` sections are built from the trainers' config dataclasses
(llmcarve.methods.tomoe.config, llmcarve.methods.atp.config), whose fields carry default, help text and
bounds once; each section adds only the stage's own keys (budgets, domain, device, ...) and hands the
trainer its config with `trainer_config(p, seed)`. Model names go through llmcarve.names.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from llmcarve.methods.atp.config import ATPConfig, LoraRunConfig
from llmcarve.methods.tomoe.config import ToMoEConfig
from llmcarve.names import BUDGET_DECIMALS, DENSE, NAME_TOLERANCE, ModelName, check_domain, format_budget
from llmcarve.options import bounds_of, help_of

EMBEDDED_MODELS = ("embedded:smollm2-135m-instruct",)


class ParamsError(ValueError):
    """params.yaml is invalid; the message lists every problem and what is allowed."""


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never fall back to a default.
    model_config = ConfigDict(extra="forbid")


def _refuse_bool(value: Any) -> Any:
    # YAML reads `true` as a bool, which pydantic would take as the number 1 without a word
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is a boolean, but this key takes a number")
    return value


# The number types of every params key: as pydantic's int and float, except that true/false are refused.
Int = Annotated[int, BeforeValidator(_refuse_bool)]
Float = Annotated[float, BeforeValidator(_refuse_bool)]


class ModelParams(Section):
    source: str = Field(
        EMBEDDED_MODELS[0],
        description="'embedded:smollm2-135m-instruct', a Hugging Face hub id, a local HF directory or a .gguf file",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_pickle_weights: bool = Field(
        False,
        description="read a source that has only pickled .bin/.pt weights; unpickling can run arbitrary code, "
        "so set this only for files you trust (the prepared model is safetensors either way)",
    )

    @field_validator("source")
    @classmethod
    def _source_is_usable(cls, value: str) -> str:
        if value.startswith("embedded:") and value not in EMBEDDED_MODELS:
            raise ValueError(f"unknown embedded model; allowed: {', '.join(EMBEDDED_MODELS)}")
        looks_like_path = value.startswith(("/", ".", "~")) or value.endswith(".gguf")
        if looks_like_path and not Path(value).expanduser().exists():
            raise ValueError("path does not exist (give an existing HF directory or .gguf file)")
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class SourceSpec(Section):
    """One named corpus: a registry-package builtin, or a local file / HF dataset with a column mapping."""

    builtin: str | None = Field(None, description="name of a corpus built from an installed package")
    path: str | None = Field(None, description="local .jsonl, .parquet, .arrow file or a save_to_disk directory")
    hf_id: str | None = Field(None, description="Hugging Face dataset id (needs network)")
    hf_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    group_column: str | None = Field(None, description="documents sharing this value never land in two splits")
    max_documents: Annotated[Int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _exactly_one_origin(self) -> "SourceSpec":
        given = [k for k in ("builtin", "path", "hf_id") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of builtin, path, hf_id (got {given or 'none'})")
        if self.builtin is not None:
            from llmcarve.data.sources import BUILTIN_SOURCES

            if self.builtin not in BUILTIN_SOURCES:
                raise ValueError(f"unknown builtin '{self.builtin}'; allowed: {', '.join(sorted(BUILTIN_SOURCES))}")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"path '{self.path}' does not exist")
        return self


class DomainSpec(Section):
    train: list[str] = Field(..., min_length=1, description="source names whose documents are split train/heldout")
    heldout: list[str] = Field(default_factory=list, description="source names held out whole (never trained on)")
    heldout_fraction: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.1
    max_train_tokens: Annotated[Int, Field(gt=0)] | None = None


class DataParams(Section):
    block_size: Annotated[Int, Field(ge=8, le=32768)] = 512
    sources: dict[str, SourceSpec]
    domains: dict[str, DomainSpec]

    @model_validator(mode="after")
    def _domains_name_known_sources(self) -> "DataParams":
        for domain, spec in self.domains.items():
            for name in [*spec.train, *spec.heldout]:
                if name not in self.sources:
                    raise ValueError(
                        f"domains.{domain} names source '{name}', which is not under data.sources "
                        f"(known: {', '.join(sorted(self.sources))})"
                    )
            overlap = set(spec.train) & set(spec.heldout)
            if overlap:
                raise ValueError(f"domains.{domain}: {sorted(overlap)} is both train and heldout")
        return self


class CalibrateParams(Section):
    domain: str = "general"
    num_blocks: Annotated[Int, Field(gt=0)] = 32
    batch_size: Annotated[Int, Field(gt=0)] = 4


Kept = Annotated[Float, Field(gt=0.0, le=1.0, description="KEPT fraction of attention+MLP weights, in (0, 1]")]
Device = Literal["auto", "cpu", "cuda"]
Config = TypeVar("Config")

# Trainer config fields that are not keys of the method's section (they vary per run or live elsewhere);
# every other config field is a section key. tests/test_params.py checks that nothing falls in between.
TOMOE_PER_RUN = ("p", "seed")  # p: one run per tomoe.budgets entry; seed: the top-level seed
LORA_SECTION_FIELDS = ("rank", "alpha", "dropout", "lr")  # the fields of LoraRunConfig under atp.lora
ATP_PER_RUN = ("lora", "p")  # lora: built from atp and atp.lora (see ATPStage.lora_run_config); p: atp.budgets


def config_fields(config: type, names: Iterable[str]) -> dict[str, Any]:
    """pydantic field definitions for `names` of a trainer config dataclass: its type (int and float refuse
    booleans), default, help text as the description, and bounds."""
    declared = {spec.name: spec for spec in dataclasses.fields(config)}
    hints = typing.get_type_hints(config)
    definitions = {}
    for name in names:
        if name not in declared:
            raise TypeError(f"{config.__name__} has no field '{name}' (fields: {', '.join(declared)})")
        number = {int: Int, float: Float}.get(hints[name])
        if number is None:
            raise TypeError(f"{config.__name__}.{name}: params sections hold int and float config fields, not {hints[name]}")
        spec = declared[name]
        definitions[name] = (number, Field(spec.default, description=help_of(spec), **bounds_of(spec)))
    return definitions


def fields_except(config: type, *excluded: str) -> list[str]:
    """The field names of a config dataclass, in order, without `excluded` (each of which must exist)."""
    names = [spec.name for spec in dataclasses.fields(config)]
    unknown = sorted(set(excluded) - set(names))
    if unknown:
        raise TypeError(f"{config.__name__} has no field(s) {unknown} (fields: {', '.join(names)})")
    return [name for name in names if name not in excluded]


def build_config(config: type[Config], sections: Iterable[BaseModel], **per_run: Any) -> Config:
    """`config` with each field taken from `per_run`, or else from the one section that declares it.

    A field that no section declares is an error, never a silent default: the trainer gets exactly the
    values params.yaml was validated with.
    """
    sections = list(sections)
    names = [spec.name for spec in dataclasses.fields(config)]
    unknown = sorted(set(per_run) - set(names))
    if unknown:
        raise TypeError(f"{config.__name__} has no field(s) {unknown}")
    values = {}
    for name in names:
        if name in per_run:
            values[name] = per_run[name]
            continue
        owners = [section for section in sections if name in type(section).model_fields]
        if len(owners) != 1:
            where = ", ".join(type(section).__name__ for section in owners) or "none"
            raise TypeError(f"{config.__name__}.{name} must come from exactly one params section (declared by: {where})")
        values[name] = getattr(owners[0], name)
    return config(**values)


def method_section(name: str, base: type[Section], fields: dict[str, Any]) -> type[Section]:
    """The params section `base` (stage keys, validators) extended by trainer config fields."""
    return create_model(name, __base__=base, __module__=__name__, __doc__=base.__doc__, **fields)


def distinct_budgets(budgets: list[float], series: str) -> list[float]:
    """Budgets that name distinct models `<series>@<p>`: names carry BUDGET_DECIMALS decimals, so two
    budgets equal at that precision would write the same directory."""
    named: dict[str, float] = {}
    for budget in budgets:
        text = format_budget(budget)
        if text in named:
            first = named[text]
            if first == budget:
                raise ValueError(f"duplicate budget {budget!r}: it is listed twice, and each budget names one model ({series}@{text})")
            raise ValueError(
                f"duplicate budget: {first!r} and {budget!r} both name {series}@{text}; "
                f"budgets must differ in the first {BUDGET_DECIMALS} decimals"
            )
        named[text] = budget
    return budgets


class ToMoEStage(Section):
    """Stage tomoe: dynamic structural pruning into a top-1 MoE (see llmcarve.methods.tomoe), one run per budget.

    The keys below are the stage's own; every other key of `tomoe:` is a field of ToMoEConfig.
    """

    budgets: list[Kept] = Field(
        default_factory=lambda: [0.5, 0.7], min_length=1, description="one model tomoe@<p> per KEPT fraction p"
    )
    domain: str = Field("general", description="domain under data.domains whose training blocks the heads train on")
    device: Device = Field("auto", description="'auto' = cuda when available")
    seq_len: Annotated[Int, Field(ge=8)] = Field(512, description="tokens per training sequence (at most data.block_size)")
    num_processes: Annotated[Int, Field(ge=1, le=64)] = Field(
        1, description="data-parallel training processes (one per GPU) under torchrun; batch_size must divide by it"
    )
    name_tolerance: Annotated[Float, Field(gt=0, le=1)] = Field(
        NAME_TOLERANCE,
        description="how far tomoe@p may measure from p (the budget is learned, not cut); the remove stage refuses "
        "a model beyond it, before writing anything. Raise it only for smoke runs too short to reach the budget",
    )

    @field_validator("budgets")
    @classmethod
    def _budgets_name_distinct_models(cls, budgets: list[float]) -> list[float]:
        return distinct_budgets(budgets, "tomoe")

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> "ToMoEStage":
        if self.batch_size % self.num_processes:
            raise ValueError(
                f"tomoe.batch_size={self.batch_size} must be a multiple of tomoe.num_processes={self.num_processes} "
                "(each process trains on an equal share of every batch)"
            )
        return self

    def trainer_config(self, p: float, seed: int) -> ToMoEConfig:
        """The trainer's config for the run at budget `p`."""
        return build_config(ToMoEConfig, [self], p=p, seed=seed)


ToMoEParams = method_section("ToMoEParams", ToMoEStage, config_fields(ToMoEConfig, fields_except(ToMoEConfig, *TOMOE_PER_RUN)))


class StaticParams(Section):
    """Static structured pruning from calibration statistics, the baseline at the same budgets."""

    budgets: list[Kept] = Field(
        default_factory=lambda: [0.5, 0.7], min_length=1, description="one model static@<p> per KEPT fraction p"
    )

    @field_validator("budgets")
    @classmethod
    def _budgets_name_distinct_models(cls, budgets: list[float]) -> list[float]:
        return distinct_budgets(budgets, "static")


class LoraSection(Section):
    """LoRA on all seven projections; ATP and both LoRA baselines use these same settings.

    Every key is a field of LoraRunConfig (its other fields sit under `atp:`)."""


LoraParams = method_section("LoraParams", LoraSection, config_fields(LoraRunConfig, LORA_SECTION_FIELDS))


class ATPStage(Section):
    """Stage atp: LoRA fine-tuning on a domain jointly with a pruning-decision generator (see llmcarve.methods.atp).

    Every (domain, p) also produces the baselines at the same tokens and LoRA settings:
    lora-<domain>@1.0 (LoRA on the dense model) and twostage-<domain>@p (static pruning, then LoRA).
    The keys below are the stage's own; every other key of `atp:` is a field of ATPConfig or LoraRunConfig.
    """

    domains: list[str] = Field(
        default_factory=list, description="domains to tune on (names under data.domains); none skips ATP and its baselines"
    )
    budgets: list[Kept] = Field(
        default_factory=lambda: [0.6], min_length=1, description="one model atp-<domain>@<p> (and twostage-) per KEPT fraction p"
    )
    device: Device = Field("auto", description="'auto' = cuda when available")
    seq_len: Annotated[Int, Field(ge=8)] = Field(512, description="tokens per training sequence (at most data.block_size)")
    calibration_blocks: Annotated[Int, Field(gt=0)] = Field(
        16, description="the last N training blocks feed the generator only; LoRA never trains on them"
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA settings shared by ATP and its baselines")

    @field_validator("domains")
    @classmethod
    def _domains_fit_in_model_names(cls, domains: list[str]) -> list[str]:
        for domain in domains:
            check_domain(domain)
        repeated = sorted({domain for domain in domains if domains.count(domain) > 1})
        if repeated:
            raise ValueError(f"{repeated} listed more than once; each domain names its own models")
        return domains

    @field_validator("budgets")
    @classmethod
    def _budgets_name_distinct_models(cls, budgets: list[float]) -> list[float]:
        return distinct_budgets(budgets, "atp-<domain>")

    def lora_run_config(self, seed: int) -> LoraRunConfig:
        """The LoRA run of ATP and of both baselines: atp.steps, .batch_size, .checkpoint_every and atp.lora."""
        return build_config(LoraRunConfig, [self, self.lora], seed=seed)

    def trainer_config(self, p: float, seed: int) -> ATPConfig:
        """The trainer's config for the run at budget `p`."""
        return build_config(ATPConfig, [self], lora=self.lora_run_config(seed), p=p)


ATPParams = method_section(
    "ATPParams",
    ATPStage,
    config_fields(LoraRunConfig, fields_except(LoraRunConfig, *LORA_SECTION_FIELDS, "seed"))
    | config_fields(ATPConfig, fields_except(ATPConfig, *ATP_PER_RUN)),
)


class DomainRecovery(Section):
    """The metrics whose pruned / reference ratios are averaged into a domain's recovered performance."""

    perplexity: list[str] = Field(default_factory=list, description="names under evaluate.perplexity.corpora")
    tasks: list[str] = Field(default_factory=list, description="names under evaluate.domain_tasks")


# Named protocols: `preset: seq2048` is shorthand for the values below (explicit keys still win).
PERPLEXITY_PRESETS = {
    "seq512": {"seq_len": 512, "stride": None, "max_windows": 64, "add_bos": False},
    "seq2048": {"seq_len": 2048, "stride": None, "max_windows": 32, "add_bos": False},
}


class PerplexityParams(Section):
    preset: Literal["seq512", "seq2048"] | None = Field(None, description="fills seq_len/stride/max_windows/add_bos")
    seq_len: Annotated[Int, Field(ge=8)] = 512
    stride: Annotated[Int, Field(ge=1)] | None = Field(None, description="None = seq_len (non-overlapping windows)")
    max_windows: Annotated[Int, Field(gt=0)] | None = 64
    add_bos: bool = False
    corpora: dict[str, str] = Field(
        default_factory=lambda: {"boolq_wikipedia": "general/heldout"},
        description="metric name -> '<domain>/<split>' of prepare_data's output",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("preset") in PERPLEXITY_PRESETS:
            return PERPLEXITY_PRESETS[raw["preset"]] | raw
        return raw

    @model_validator(mode="after")
    def _stride_within_window(self) -> "PerplexityParams":
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride {self.stride} > seq_len {self.seq_len} would skip tokens; use stride <= seq_len")
        for name, where in self.corpora.items():
            if where.count("/") != 1 or where.split("/")[1] not in ("train", "heldout"):
                raise ValueError(f"corpora.{name}: '{where}' must look like '<domain>/train' or '<domain>/heldout'")
        return self


class TaskSpec(Section):
    """A multiple-choice task: a builtin, or any file with a prompt template."""

    builtin: str | None = None
    path: str | None = Field(None, description="jsonl/parquet/arrow file or save_to_disk dir")
    context_template: str | None = Field(None, description="e.g. 'Question: {question}\\nAnswer:'")
    choices_field: str | None = Field(None, description="column holding the list of answer strings")
    label_field: str | None = Field(None, description="column holding the index of the gold answer")
    choice_prefix: str = " "
    limit: Annotated[Int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _builtin_or_full_template(self) -> "TaskSpec":
        if (self.builtin is None) == (self.path is None):
            raise ValueError("give exactly one of builtin, path")
        if self.builtin is not None:
            from llmcarve.eval.tasks import BUILTIN_TASKS

            if self.builtin not in BUILTIN_TASKS:
                raise ValueError(f"unknown builtin task '{self.builtin}'; allowed: {', '.join(sorted(BUILTIN_TASKS))}")
        else:
            missing = [k for k in ("context_template", "choices_field", "label_field") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a path task needs {missing}")
            if not Path(self.path).expanduser().exists():
                raise ValueError(f"path '{self.path}' does not exist")
        return self


class SpeedParams(Section):
    prefill_tokens: Annotated[Int, Field(gt=0)] = 512
    decode_tokens: Annotated[Int, Field(gt=0)] = 32
    repeats: Annotated[Int, Field(gt=0)] = 3


def canonical_model_names(names: list[str]) -> list[str]:
    """Each name parses (llmcarve.names) and is listed once."""
    for name in names:
        ModelName.parse(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} listed more than once")
    return names


class EvaluateParams(Section):
    models: list[str] = Field(default_factory=lambda: ["dense"], min_length=1)
    batch_size: Annotated[Int, Field(gt=0)] = 8
    perplexity: PerplexityParams = Field(default_factory=PerplexityParams)
    zero_shot: dict[str, TaskSpec] = Field(default_factory=dict)
    zero_shot_limit: Annotated[Int, Field(gt=0)] | None = 200
    domain_tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    domain_limit: Annotated[Int, Field(gt=0)] | None = 100
    recovery: dict[str, DomainRecovery] = Field(default_factory=dict, description="per domain, see DomainRecovery")
    speed: SpeedParams = Field(default_factory=SpeedParams)

    @field_validator("models")
    @classmethod
    def _models_are_model_names(cls, names: list[str]) -> list[str]:
        return canonical_model_names(names)

    @model_validator(mode="after")
    def _recovery_names_known_metrics(self) -> "EvaluateParams":
        for domain, spec in self.recovery.items():
            for name in spec.perplexity:
                if name not in self.perplexity.corpora:
                    raise ValueError(f"recovery.{domain}.perplexity: '{name}' is not under evaluate.perplexity.corpora")
            for name in spec.tasks:
                if name not in self.domain_tasks:
                    raise ValueError(f"recovery.{domain}.tasks: '{name}' is not under evaluate.domain_tasks")
            if not spec.perplexity and not spec.tasks:
                raise ValueError(f"recovery.{domain}: name at least one perplexity corpus or task")
        return self



class ExportSpeedParams(Section):
    """onnxruntime against PyTorch on the CPU, batch 1, both on the same threads."""

    prefill_tokens: Annotated[Int, Field(gt=0)] = 128
    repeats: Annotated[Int, Field(gt=0)] = 3


class ExportOnnxParams(Section):
    """Stage export_onnx: the listed models to ONNX (one graph with past keys/values), checked against PyTorch."""

    models: list[str] = Field(default_factory=lambda: ["dense"], description="names the pipeline produces; [] exports none")
    max_rel_err: Annotated[Float, Field(gt=0)] = Field(1e-4, description="||logit diff|| / ||logits|| allowed, fp32")
    greedy_tokens: Annotated[Int, Field(gt=0)] = Field(32, description="greedy tokens onnxruntime must generate as PyTorch does")
    optimize: bool = Field(False, description="run the ONNX exporter's graph rewriter (slower export; see params.yaml)")
    speed: ExportSpeedParams | None = Field(default_factory=ExportSpeedParams, description="null skips the timing")

    @field_validator("models")
    @classmethod
    def _models_are_model_names(cls, names: list[str]) -> list[str]:
        return canonical_model_names(names)


class ChampionRule(Section):
    """Which version of a registered model gets the alias `champion`: the best `metric` among the versions
    whose measured active ratio is at most `max_active_ratio` (uncarved models, kept 1.0, always compete)."""

    metric: str = Field(..., description="dotted path into a model's entry of metrics/evaluate.json, e.g. ppl.boolq_wikipedia.ppl")
    goal: Literal["minimize", "maximize"] = "minimize"
    max_active_ratio: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0


class RegistryParams(Section):
    """Stage register: every exported model logged to MLflow (HF directory + ONNX flavor) and registered as
    `<prefix>-<method>[-<domain>]`; alias `candidate` = the newest version, `champion` = by rule."""

    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = "llmcarve"
    champion: ChampionRule = Field(default_factory=lambda: ChampionRule(metric="ppl.boolq_wikipedia.ppl"))
    domain_champion: dict[str, ChampionRule] = Field(
        default_factory=dict, description="per domain, the rule for its models (<method>-<domain>@p); absent = `champion`"
    )


class Params(Section):
    seed: Int = Field(0, description="seeds every stage: data order, initialisations, noise, question samples")
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    tomoe: ToMoEParams = Field(default_factory=ToMoEParams)
    static: StaticParams = Field(default_factory=StaticParams)
    atp: ATPParams = Field(default_factory=ATPParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export_onnx: ExportOnnxParams = Field(default_factory=ExportOnnxParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)

    def produced_models(self) -> list[ModelName]:
        """The models the pipeline produces, in stage order."""
        return (
            [ModelName(DENSE)]
            + [ModelName("tomoe", budget=p) for p in self.tomoe.budgets]
            + [ModelName("static", budget=p) for p in self.static.budgets]
            + self.domain_models()
        )

    def domain_models(self) -> list[ModelName]:
        """ATP's models and its LoRA baselines: lora-<domain>@1.0, atp-<domain>@p, twostage-<domain>@p."""
        names = []
        for domain in self.atp.domains:
            names.append(ModelName("lora", domain=domain, budget=1.0))
            for p in self.atp.budgets:
                names += [ModelName("atp", domain=domain, budget=p), ModelName("twostage", domain=domain, budget=p)]
        return names

    def carved_model_names(self) -> list[str]:
        """Names of the models the pipeline produces, as evaluate.models may list them."""
        return [str(name) for name in self.produced_models()]

    @model_validator(mode="after")
    def _cross_section_names(self) -> "Params":
        domains = self.data.domains
        if self.calibrate.domain not in domains:
            raise ValueError(f"calibrate.domain '{self.calibrate.domain}' is not under data.domains ({', '.join(domains)})")
        if self.tomoe.domain not in domains:
            raise ValueError(f"tomoe.domain '{self.tomoe.domain}' is not under data.domains ({', '.join(domains)})")
        if self.tomoe.seq_len > self.data.block_size:
            raise ValueError(f"tomoe.seq_len {self.tomoe.seq_len} is longer than data.block_size {self.data.block_size}")
        for domain in self.atp.domains:
            if domain not in domains:
                raise ValueError(f"atp.domains: '{domain}' is not under data.domains ({', '.join(domains)})")
        if self.atp.domains and self.atp.seq_len > self.data.block_size:
            raise ValueError(f"atp.seq_len {self.atp.seq_len} is longer than data.block_size {self.data.block_size}")
        produced = self.carved_model_names()
        for name in self.evaluate.models:
            if name not in produced:
                raise ValueError(f"evaluate.models: '{name}' is not produced by this params file; allowed: {', '.join(produced)}")
        for name in self.export_onnx.models:
            if name not in produced:
                raise ValueError(f"export_onnx.models: '{name}' is not produced by this params file; allowed: {', '.join(produced)}")
        for domain in self.registry.domain_champion:
            if domain not in self.atp.domains:
                raise ValueError(f"registry.domain_champion: '{domain}' is not under atp.domains ({', '.join(self.atp.domains)})")
        for name, where in self.evaluate.perplexity.corpora.items():
            if where.split("/")[0] not in domains:
                raise ValueError(f"evaluate.perplexity.corpora.{name}: domain of '{where}' is not under data.domains")
        return self


def _describe(error: dict[str, Any]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check across sections: its message already names the keys involved
        return f"  {message}"
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see params.yaml for the allowed keys)"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    return f"  {where} = {shown}: {message}"


def validate(raw: Any, source: str = "params") -> Params:
    """Validate a parsed params mapping; raise ParamsError listing every problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ParamsError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a parsed params mapping (in place, so YAML comments of a round-trip loader survive).

    Intermediate mappings must exist or are created; a key that lands outside the schema is reported
    by `validate`, so a typo never silently becomes a new, ignored setting.
    """
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise ParamsError(f"override {dotted}: {where} is the value {child!r}, not a section of keys")
            node = child
        node[leaf] = value
    return raw


def _refuse_duplicate_keys(node: yaml.Node, path: Path, parents: tuple[str, ...] = (), seen: set[int] | None = None) -> None:
    """Raise ParamsError for a key given twice in one mapping: YAML loaders keep the last one silently."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, (*parents, str(index)), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` overrides the merged keys by design
            continue
        key = (key_node.tag, str(key_node.value))
        line = key_node.start_mark.line + 1
        if key in first_line:
            dotted = ".".join((*parents, str(key_node.value)))
            raise ParamsError(
                f"{path}, line {line}: key '{dotted}' is given twice (first on line {first_line[key]}); "
                "YAML would silently keep the last one, so delete the one you did not mean"
            )
        first_line[key] = line
        _refuse_duplicate_keys(value_node, path, (*parents, str(key_node.value)), seen)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file, refusing duplicate keys (with file, line and key); ParamsError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the project root or pass the params file)")
    loader = yaml.SafeLoader(path.read_text())
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _refuse_duplicate_keys(root, path)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml") -> Params:
    return validate(read_yaml(path), str(path))
