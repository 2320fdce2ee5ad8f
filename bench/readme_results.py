"""Render the README's results table from metrics/evaluate.json (the committed results of `make run`).

    python bench/readme_results.py metrics/evaluate.json
"""

from __future__ import annotations

import json
import sys

ZERO_SHOT = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")


def table(models: dict) -> str:
    domain_tasks = sorted({t for r in models.values() for t in r["domain"]})
    corpora = list(next(iter(models.values()))["ppl"])
    header = ["model", "active", "params"] + [f"PPL {c}" for c in corpora] + list(ZERO_SHOT) + domain_tasks + ["prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in models.items():
        cells = [f"`{name}`", f"{r['active_ratio']:.3f}", f"{r['params_total'] / 1e6:.1f}M"]
        cells += [f"{r['ppl'][c]['ppl']:.2f}" for c in corpora]
        cells += [f"{r['zero_shot'][t]['acc']:.3f}" if t in r["zero_shot"] else "" for t in ZERO_SHOT]
        cells += [f"{r['domain'][t]['acc']:.3f}" if t in r["domain"] else "" for t in domain_tasks]
        cells += [f"{r['speed']['prefill_tokens_per_s']:.0f}", f"{r['speed']['decode_tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.load(open(sys.argv[1]))["models"]))
