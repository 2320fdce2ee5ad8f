"""Recovered performance: how much of a reference model's domain performance a pruned model keeps.

recovered = mean over the domain's metrics of (pruned / reference), with perplexity inverted
(reference / pruned, so lower perplexity counts as better). 1.0 means on par with the reference;
each per-metric ratio is reported next to the mean, so one task cannot hide behind the average.
Every model whose name (llmcarve.names) carries a domain gets it; references are `dense` and `lora-<domain>@1.0`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmcarve.names import DENSE, ModelName

if TYPE_CHECKING:  # GPU benchmark hosts run this without pydantic: any object with these two lists works
    from llmcarve.params import DomainRecovery


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
    """Add `recovered: {vs_dense, vs_lora}` to every evaluated model of a domain (atp-<domain>@p, ...)."""
    for name, report in models.items():
        domain = ModelName.parse(name).domain
        if domain is None or domain not in recovery:
            continue
        spec, references = recovery[domain], {}
        if DENSE in models:
            references["vs_dense"] = recovered(report, models[DENSE], spec)
        tuned = str(ModelName("lora", domain=domain, budget=1.0))
        if tuned in models and name != tuned:
            references["vs_lora"] = recovered(report, models[tuned], spec)
        report["recovered"] = references
