"""MLflow tracking: one run per compression, nested runs per stage, metrics, artifacts, the model.

The tracking URI comes from MLFLOW_TRACKING_URI; by default a local SQLite store `mlflow.db` in the
working directory, so `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows every run.
"""

from __future__ import annotations

from contextlib import contextmanager

from tldr_tasks.config import Config
from tldr_tasks.stages.base import StageIO, StageResult


@contextmanager
def stage_run(cfg: Config, io: StageIO, stage: str, kwargs: dict):
    # Placeholder until the tracking module is written: runs the stage untracked.
    yield None


def log_stage_result(stage: str, result: StageResult, seconds: float) -> None:
    pass
