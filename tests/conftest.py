"""Shared test setup: offline, no telemetry, an isolated MLflow store per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `stages` and `tests.tiny` import from the project root

os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    DVC_NO_ANALYTICS="1",
    DO_NOT_TRACK="1",
    MLFLOW_DISABLE_TELEMETRY="true",
)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 dequantised once per test session (about 30 s)."""
    from llmcarve.models.loading import materialize

    return materialize("embedded:smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "model")
