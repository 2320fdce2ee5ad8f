"""MLflow tracking: the only package of llmcarve that talks to MLflow."""

from llmcarve.tracking.runs import (
    PIPELINE_RUN_ENV,
    StageRun,
    finish_pipeline_run,
    stage_run,
    start_pipeline_run,
    tracking_uri,
)

__all__ = ["PIPELINE_RUN_ENV", "StageRun", "finish_pipeline_run", "stage_run", "start_pipeline_run", "tracking_uri"]
