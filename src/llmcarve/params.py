"""Typed schema of params.yaml, validated before any compute.

Every stage calls `load_params(path, section=...)` first: a wrong key, type or value is reported with
its dotted path, the value given and what is allowed, and nothing is loaded or written.

Convention used everywhere: a ratio named `kept` or `p` is the KEPT fraction of attention+MLP
parameters (0.7 keeps 70%), never the pruned fraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_MODELS = ("embedded:smollm2-135m-instruct",)


class ParamsError(ValueError):
    """params.yaml is invalid; the message lists every problem and what is allowed."""


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must never fall back to a default.
    model_config = ConfigDict(extra="forbid")


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
    max_documents: Annotated[int, Field(gt=0)] | None = None

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
    heldout_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    max_train_tokens: Annotated[int, Field(gt=0)] | None = None


class DataParams(Section):
    block_size: Annotated[int, Field(ge=8, le=32768)] = 512
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
    num_blocks: Annotated[int, Field(gt=0)] = 32
    batch_size: Annotated[int, Field(gt=0)] = 4


Kept = Annotated[float, Field(gt=0.0, le=1.0, description="KEPT fraction of attention+MLP weights, in (0, 1]")]


class ToMoEParams(Section):
    """Dynamic structural pruning into a top-1 MoE (see llmcarve.methods.tomoe)."""

    budgets: list[Kept] = Field(default_factory=lambda: [0.5, 0.7], min_length=1)
    domain: str = "general"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seq_len: Annotated[int, Field(ge=8)] = 512
    num_experts: Annotated[int, Field(ge=1, le=64)] = 8
    steps: Annotated[int, Field(gt=0)] = 200
    batch_size: Annotated[int, Field(gt=0)] = 1
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    temperature: Annotated[float, Field(gt=0)] = 0.4
    offset: float = 3.0
    lam: Annotated[float, Field(ge=0)] = 16.0
    alpha_union: Annotated[float, Field(ge=0)] = 3.0
    alpha_balance: Annotated[float, Field(ge=0)] = 1.0
    kd_weight: Annotated[float, Field(ge=0)] = 2.0
    checkpoint_every: Annotated[int, Field(gt=0)] = 50
    num_processes: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="data-parallel training processes (one per GPU) under torchrun; batch_size must divide by it"
    )

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> "ToMoEParams":
        if self.batch_size % self.num_processes:
            raise ValueError(
                f"tomoe.batch_size={self.batch_size} must be a multiple of tomoe.num_processes={self.num_processes} "
                "(each process trains on an equal share of every batch)"
            )
        return self


class StaticParams(Section):
    """Static structured pruning from calibration statistics, the baseline at the same budgets."""

    budgets: list[Kept] = Field(default_factory=lambda: [0.5, 0.7], min_length=1)


class LoraParams(Section):
    """LoRA on all seven projections; ATP and both LoRA baselines use these same settings."""

    rank: Annotated[int, Field(gt=0, le=256)] = 8
    alpha: Annotated[float, Field(gt=0)] = Field(8.0, description="scale = alpha / rank (ATP uses 1)")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    lr: Annotated[float, Field(gt=0)] = 1e-3


class ATPParams(Section):
    """LoRA fine-tuning on a domain jointly with a pruning-decision generator (see llmcarve.methods.atp).

    Every (domain, p) also produces the baselines at the same tokens and LoRA settings:
    lora-<domain>@1.0 (LoRA on the dense model) and twostage-<domain>@p (static pruning, then LoRA).
    """

    domains: list[str] = Field(
        default_factory=list, description="domains to tune on (names under data.domains); none skips ATP and its baselines"
    )
    budgets: list[Kept] = Field(default_factory=lambda: [0.6], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seq_len: Annotated[int, Field(ge=8)] = 512
    steps: Annotated[int, Field(ge=2)] = Field(60, description="LoRA updates (one batch each); the baselines take as many")
    batch_size: Annotated[int, Field(gt=0)] = 2
    calibration_blocks: Annotated[int, Field(gt=0)] = Field(
        16, description="the last N training blocks feed the generator only; LoRA never trains on them"
    )
    search_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.5, description="share of the steps that alternate generator and LoRA updates; then the decision is frozen"
    )
    lora: LoraParams = Field(default_factory=LoraParams)
    generator_lr: Annotated[float, Field(gt=0)] = 1e-2
    temperature: Annotated[float, Field(gt=0)] = 0.4
    offset: float = 3.0
    ratio_weight: Annotated[float, Field(ge=0)] = 5.0
    group_lasso_search: Annotated[float, Field(ge=0)] = 0.1
    group_lasso_final: Annotated[float, Field(gt=0)] = 10.0
    checkpoint_every: Annotated[int, Field(gt=0)] = 10


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
    seq_len: Annotated[int, Field(ge=8)] = 512
    stride: Annotated[int, Field(ge=1)] | None = Field(None, description="None = seq_len (non-overlapping windows)")
    max_windows: Annotated[int, Field(gt=0)] | None = 64
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
    limit: Annotated[int, Field(gt=0)] | None = None

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
    prefill_tokens: Annotated[int, Field(gt=0)] = 512
    decode_tokens: Annotated[int, Field(gt=0)] = 32
    repeats: Annotated[int, Field(gt=0)] = 3


class EvaluateParams(Section):
    models: list[str] = Field(default_factory=lambda: ["dense"], min_length=1)
    batch_size: Annotated[int, Field(gt=0)] = 8
    perplexity: PerplexityParams = Field(default_factory=PerplexityParams)
    zero_shot: dict[str, TaskSpec] = Field(default_factory=dict)
    zero_shot_limit: Annotated[int, Field(gt=0)] | None = 200
    domain_tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    domain_limit: Annotated[int, Field(gt=0)] | None = 100
    recovery: dict[str, DomainRecovery] = Field(default_factory=dict, description="per domain, see DomainRecovery")
    speed: SpeedParams = Field(default_factory=SpeedParams)

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

    prefill_tokens: Annotated[int, Field(gt=0)] = 128
    repeats: Annotated[int, Field(gt=0)] = 3


class ExportOnnxParams(Section):
    """Stage export_onnx: the listed models to ONNX (one graph with past keys/values), checked against PyTorch."""

    models: list[str] = Field(default_factory=lambda: ["dense"], description="names the pipeline produces; [] exports none")
    max_rel_err: Annotated[float, Field(gt=0)] = Field(1e-4, description="||logit diff|| / ||logits|| allowed, fp32")
    greedy_tokens: Annotated[int, Field(gt=0)] = Field(32, description="greedy tokens onnxruntime must generate as PyTorch does")
    optimize: bool = Field(False, description="run the ONNX exporter's graph rewriter (slower export; see params.yaml)")
    speed: ExportSpeedParams | None = Field(default_factory=ExportSpeedParams, description="null skips the timing")


class ChampionRule(Section):
    """Which version of a registered model gets the alias `champion`: the best `metric` among the versions
    whose measured active ratio is at most `max_active_ratio` (uncarved models, kept 1.0, always compete)."""

    metric: str = Field(..., description="dotted path into a model's entry of metrics/evaluate.json, e.g. ppl.boolq_wikipedia.ppl")
    goal: Literal["minimize", "maximize"] = "minimize"
    max_active_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0


class RegistryParams(Section):
    """Stage register: every exported model logged to MLflow (HF directory + ONNX flavor) and registered as
    `<prefix>-<method>[-<domain>]`; alias `candidate` = the newest version, `champion` = by rule."""

    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = "llmcarve"
    champion: ChampionRule = Field(default_factory=lambda: ChampionRule(metric="ppl.boolq_wikipedia.ppl"))
    domain_champion: dict[str, ChampionRule] = Field(
        default_factory=dict, description="per domain, the rule for its models (<method>-<domain>@p); absent = `champion`"
    )


class Params(Section):
    seed: int = 0
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    tomoe: ToMoEParams = Field(default_factory=ToMoEParams)
    static: StaticParams = Field(default_factory=StaticParams)
    atp: ATPParams = Field(default_factory=ATPParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export_onnx: ExportOnnxParams = Field(default_factory=ExportOnnxParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)

    def carved_model_names(self) -> list[str]:
        """Names of the models the pipeline produces, as evaluate.models may list them."""
        return (
            ["dense"]
            + [f"tomoe@{p:g}" for p in self.tomoe.budgets]
            + [f"static@{p:g}" for p in self.static.budgets]
            + self.domain_model_names()
        )

    def domain_model_names(self) -> list[str]:
        """ATP's models and its LoRA baselines: atp-<domain>@p, twostage-<domain>@p, lora-<domain>@1.0."""
        names = []
        for domain in self.atp.domains:
            names.append(f"lora-{domain}@1.0")
            for p in self.atp.budgets:
                names += [f"atp-{domain}@{p:g}", f"twostage-{domain}@{p:g}"]
        return names

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


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the project root or pass the params file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate(raw, str(path))
