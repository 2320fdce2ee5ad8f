"""Recovered performance: how much of a reference model's domain performance a pruned model keeps.

recovered = mean over the domain's metrics of (pruned / reference), with perplexity inverted
(reference / pruned, so lower perplexity counts as better). 1.0 means on par with the reference;
each per-metric ratio is reported next to the mean, so one task cannot hide behind the average.
Models are named <method>-<domain>@<kept>; references are `dense` and `lora-<domain>@1.0`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # GPU benchmark hosts run this without pydantic: any object with these two lists works
    from llmcarve.params import DomainRecovery

DOMAIN_MODEL = re.compile(r"^(?P<method>[a-z]+)-(?P<domain>[a-z0-9_]+)@(?P<kept>[0-9.]+)$")


def metric_ratios(model: dict, reference: dict, spec: DomainRecovery) -> dict[str, float]:
    ratios = {f"ppl:{name}": reference["ppl"][name]["ppl"] / model["ppl"][name]["ppl"] for name in spec.perplexity}
    for name in spec.tasks:
        reference_acc = reference["domain"][name]["acc"]
        # a reference at zero accuracy leaves nothing to recover; the metric is skipped, not divided by 0
        if reference_acc > 0:
            ratios[f"acc:{name}"] = model["domain"][name]["acc"] / reference_acc
    return ratios


def recovered(model: dict, reference: dict, spec: DomainRecovery) -> dict:
    ratios = metric_ratios(model, reference, spec)
    return {"mean": sum(ratios.values()) / len(ratios), "per_metric": ratios}


def add_recovery(models: dict[str, dict], recovery: dict[str, DomainRecovery]) -> None:
    """Add `recovered: {vs_dense, vs_lora}` to every evaluated <method>-<domain>@p model."""
    for name, report in models.items():
        match = DOMAIN_MODEL.match(name)
        if match is None or match["domain"] not in recovery:
            continue
        spec, references = recovery[match["domain"]], {}
        if "dense" in models:
            references["vs_dense"] = recovered(report, models["dense"], spec)
        tuned = f"lora-{match['domain']}@1.0"
        if tuned in models and name != tuned:
            references["vs_lora"] = recovered(report, models[tuned], spec)
        report["recovered"] = references
