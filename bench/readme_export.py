"""Render the README's ONNX table from metrics/export_onnx.json and metrics/register.json (`make run`).

    python bench/readme_export.py metrics/export_onnx.json metrics/register.json
"""

from __future__ import annotations

import json
import sys


def experts_cell(report: dict) -> str:
    experts = report.get("expert_parity")
    if experts is None:
        return ""
    missing = "none missing" if not report["expert_weights_missing"] else f"{len(report['expert_weights_missing'])} MISSING"
    checked = len(experts["checked"])
    return f"{checked}/{checked + len(experts['unreached'])} routed, rel {experts['max_rel_err']:.1e}, {missing}"


def final_champions(registered: dict) -> dict[str, str]:
    """Registered name -> its champion after the stage: what the newest version's registration left."""
    newest = {}
    for entry in registered.values():
        name = entry["registered_name"]
        if name not in newest or int(entry["version"]) > int(newest[name]["version"]):
            newest[name] = entry
    return {name: str(entry["champion"]) for name, entry in newest.items()}


def row(name: str, report: dict, registered: dict | None, champions: dict[str, str]) -> str:
    speed = report.get("speed", {})
    ort, torch = speed.get("onnxruntime", {}), speed.get("pytorch", {})
    cells = [
        f"`{name}`",
        f"{report['file_bytes'] / 1e6:.0f}",
        f"{report['max_abs_diff']:.1e}",
        f"{report['rel_err']:.1e}",
        f"{report['pytorch_fp32_vs_fp64']['rel_err']:.1e}",
        ("yes" if report["greedy_match"] else f"no (token {report['greedy_first_mismatch']})") + f" ({report['greedy_tokens']})",
        experts_cell(report),
        f"{ort.get('prefill_tokens_per_s', 0):.0f} / {torch.get('prefill_tokens_per_s', 0):.0f} ({speed.get('prefill_speedup', 0):.2f}x)",
        f"{ort.get('decode_tokens_per_s', 0):.1f} / {torch.get('decode_tokens_per_s', 0):.1f} ({speed.get('decode_speedup', 0):.2f}x)",
        f"`{registered['registered_name']}` v{registered['version']}"
        + (" (champion)" if champions.get(registered["registered_name"]) == str(registered["version"]) else "")
        if registered else "",
    ]
    return "| " + " | ".join(cells) + " |"


def table(exported: dict, registered: dict) -> str:
    header = [
        "model", "MB", "max abs diff", "rel err", "PyTorch fp32 vs fp64", "greedy match (tokens)", "MoE experts",
        "prefill tok/s ORT / PyTorch", "decode tok/s ORT / PyTorch", "registered",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    champions = final_champions(registered)
    lines += [row(name, report, registered.get(name), champions) for name, report in exported.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    exported = json.load(open(sys.argv[1]))["models"]
    registered = json.load(open(sys.argv[2]))["models"] if len(sys.argv) > 2 else {}
    print(table(exported, registered))
