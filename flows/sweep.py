"""A sweep: the pipeline once per value of one params key, then one comparison table.

    prefect deployment run 'carve-sweep/budgets' --param key=tomoe.budgets --param values='[[0.5], [0.7]]'

Each value is its own pipeline run (a subflow, a DVC experiment `<sweep>-<i>`), one after another in the
same flow workspace, so no two runs ever share a workspace. The table compares every evaluated model
of every run; it is written to reports/<sweep>.md in the project and attached to the flow run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.pipeline import carve_pipeline, project_dir
from llmcarve.eval.report import markdown_table


def comparison_table(key: str, runs: list[tuple[Any, dict[str, Any]]]) -> str:
    """One row per (swept value, model); the label says which run a row came from."""
    rows = {
        f"{key}={value!r} {model}": report
        for value, result in runs
        for model, report in (result.get("evaluate") or {}).get("models", {}).items()
    }
    experiments = "\n".join(f"- `{key}={value!r}`: DVC experiment `{result['experiment']}`" for value, result in runs)
    return f"{markdown_table(rows)}\n\n{experiments}\n" if rows else f"(no run evaluated any model)\n\n{experiments}\n"


@flow(name="carve-sweep", log_prints=True)
def carve_sweep(
    key: str,
    values: list[Any],
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    name: str | None = None,
    project: str | None = None,
    workspace: str | None = None,
) -> str:
    """Run carve_pipeline with overrides | {key: value} for each value; return the comparison table.

    stages: as in carve_pipeline (default all); the table needs `evaluate` among them.
    """
    if not values:
        raise ValueError("values is empty: give at least one value to sweep over")
    if key in (overrides or {}):
        raise ValueError(f"{key} is both the swept key and an override; drop it from overrides")
    logger = get_run_logger()
    sweep = name or flow_run.name or "sweep"
    runs = []
    for index, value in enumerate(values):
        logger.info("sweep %s: %s=%r (%d of %d)", sweep, key, value, index + 1, len(values))
        result = carve_pipeline(
            overrides={**(overrides or {}), key: value}, stages=stages, experiment=f"{sweep}-{index}", project=project,
            workspace=workspace,
        )
        runs.append((value, result))
    table = comparison_table(key, runs)
    report = project_dir(project) / "reports" / f"{sweep}.md"
    report.parent.mkdir(exist_ok=True)
    report.write_text(f"# Sweep {sweep} over {key}\n\n{table}")
    create_markdown_artifact(key="sweep-comparison", markdown=table, description=f"sweep over {key}")
    logger.info("comparison table: %s", report)
    return table
