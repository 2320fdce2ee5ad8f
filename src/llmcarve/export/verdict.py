"""Whether an export computes what PyTorch computes, read from a parity report (llmcarve.export.parity).

Near-ties (tokens whose router, or greedy next token, two float32 engines may rightly decide
differently; see llmcarve.export.routing) are reported and never fail: each check compares only what
precedes them. A check that compared nothing fails, since it proves nothing.
"""

from __future__ import annotations

MAX_REL_ERR_KEY = "export_onnx.max_rel_err"


def failures(results: dict[str, dict], max_rel_err: float, key: str = MAX_REL_ERR_KEY) -> dict[str, str]:
    """What is wrong with each model whose export does not compute what PyTorch computes (absent: nothing).

    `key` names the tolerance's setting in the message (params.yaml's, or the CLI's --max-rel-err).
    """
    failed = {}
    for name, report in results.items():
        problems = _logit_problems(report, max_rel_err, key) + _greedy_problems(report) + _expert_problems(report, max_rel_err)
        if problems:
            failed[name] = "; ".join(problems)
    return failed


def _logit_problems(report: dict, max_rel_err: float, key: str) -> list[str]:
    if report.get("compared_tokens", 1) == 0:
        return ["no logits compared: every random sequence began with a router near-tie (see per_shape near_tie_tokens)"]
    if report["rel_err"] > max_rel_err:
        return [f"logits rel_err {report['rel_err']:.2e} > {key} {max_rel_err:g}"]
    return []


def _greedy_problems(report: dict) -> list[str]:
    if report["greedy_match"] or report.get("greedy_mismatch_near_tie"):
        return []
    return [f"greedy tokens differ from token {report['greedy_first_mismatch']} on, with no near-tie in PyTorch's choice there"]


def _expert_problems(report: dict, max_rel_err: float) -> list[str]:
    experts, problems = report.get("expert_parity"), []
    if experts is None:
        return problems
    if report["expert_weights_missing"]:
        problems.append(f"expert weights missing from the graph: {report['expert_weights_missing'][:3]}")
    if experts["max_rel_err"] > max_rel_err:
        worst = max(experts["checked"], key=lambda entry: entry["rel_err"])
        problems.append(
            f"routed-expert rel_err {experts['max_rel_err']:.2e} > {max_rel_err:g} "
            f"(layer {worst['layer']} expert {worst['expert']}, max_abs_diff {worst['max_abs_diff']:.2e})"
        )
    return problems


def near_tie_count(report: dict) -> int:
    """Near-ties met by all checks of one model (reported apart, never failed on)."""
    greedy = report.get("greedy_near_ties", {})
    return (
        report.get("near_ties", 0)
        + greedy.get("router", {}).get("near_ties", 0)
        + len(greedy.get("next_token", {}).get("steps", []))
        + report.get("expert_parity", {}).get("near_ties", 0)
    )


def summary(report: dict) -> dict:
    """The numbers worth a metric in MLflow (the full report is the stage's JSON)."""
    numbers = {key: report[key] for key in ("max_abs_diff", "rel_err", "file_bytes", "export_seconds")}
    numbers["greedy_match"] = float(report["greedy_match"])
    numbers["near_ties"] = float(near_tie_count(report))
    if "speed" in report:
        numbers.update(prefill_speedup=report["speed"]["prefill_speedup"], decode_speedup=report["speed"]["decode_speedup"])
    return numbers
