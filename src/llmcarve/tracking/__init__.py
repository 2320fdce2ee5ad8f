"""MLflow tracking: the only package of llmcarve that talks to MLflow."""

from llmcarve.tracking.runs import StageRun, stage_run

__all__ = ["StageRun", "stage_run"]
