"""The results table (markdown) of evaluated models: the README's table and a sweep's comparison."""

from __future__ import annotations

ZERO_SHOT = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")


def _ordered_union(reports: list[dict], key: str) -> list[str]:
    names: dict[str, None] = {}
    for report in reports:
        names.update(dict.fromkeys(report.get(key, {})))
    return list(names)


def markdown_table(models: dict[str, dict]) -> str:
    """One row per entry of metrics/evaluate.json's `models` (or any label -> model report mapping)."""
    reports = list(models.values())
    corpora = _ordered_union(reports, "ppl")
    zero_shot = [t for t in ZERO_SHOT if any(t in r.get("zero_shot", {}) for r in reports)]
    domain_tasks = sorted(_ordered_union(reports, "domain"))
    recovered = any("recovered" in r for r in reports)
    header = ["model", "active", "params"] + [f"PPL {c}" for c in corpora] + zero_shot + domain_tasks
    header += ["recovered vs dense", "recovered vs LoRA-dense"] if recovered else []
    header += ["prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in models.items():
        cells = [f"`{name}`", f"{r['active_ratio']:.3f}", f"{r['params_total'] / 1e6:.1f}M"]
        cells += [f"{r['ppl'][c]['ppl']:.2f}" if c in r["ppl"] else "" for c in corpora]
        cells += [f"{r['zero_shot'][t]['acc']:.3f}" if t in r["zero_shot"] else "" for t in zero_shot]
        cells += [f"{r['domain'][t]['acc']:.3f}" if t in r["domain"] else "" for t in domain_tasks]
        if recovered:
            against = r.get("recovered", {})
            cells += [f"{against[key]['mean']:.3f}" if key in against else "" for key in ("vs_dense", "vs_lora")]
        speed = r.get("speed", {})
        cells += [f"{speed['prefill_tokens_per_s']:.0f}" if speed else "", f"{speed['decode_tokens_per_s']:.1f}" if speed else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
