"""MLflow tracking: one parent run per compression, one nested run per stage (and shard group),
the resolved config as params, stage metrics and durations, the report and plots as artifacts, and
the captioner as a registered model version, so runs compare side by side in the MLflow UI.

The store is MLFLOW_TRACKING_URI, or a local SQLite file `mlflow.db` in the working directory
(`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it). All stages of one compression find
their parent run by the tag `tldr.run_key` (env TLDR_RUN_KEY, default the output URL), so stages run
as separate processes or pods still land in one run. Airflow's context (AIRFLOW_CTX_* env) is
recorded as tags.

The parent run's life belongs to whoever orchestrates: `compress` opens and ends it; in Airflow
`plan` opens it, `publish` ends it FINISHED and a task's failure callback ends it FAILED; a lone
`tldr-vlp run` opens it when missing and leaves it running.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tldr_tasks.config import Config
from tldr_tasks.stages.base import StageIO, StageResult

EXPERIMENT = "tldr-vlp"
CAPTIONER_MODEL_NAME = "tldr-captioner"
AIRFLOW_CONTEXT = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    "AIRFLOW_CTX_MAP_INDEX": "airflow.map_index",
}


def redact(text: str) -> str:
    """Drop credentials from URLs (`s3://key:secret@host/...` -> `s3://***@host/...`) before logging."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))


def _mlflow():
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("TLDR_MLFLOW_EXPERIMENT", EXPERIMENT)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        # Artifacts (the registered captioners) beside the SQLite file, not in ./mlruns of whatever
        # folder the stage process happens to run in.
        folder = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlruns")
        try:
            mlflow.create_experiment(name, artifact_location=Path(folder).as_uri())
        except mlflow.exceptions.MlflowException:  # another stage process created it first
            pass
    mlflow.set_experiment(name)
    return mlflow


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_key(io: StageIO) -> str:
    return os.environ.get("TLDR_RUN_KEY") or redact(io.out)


def _airflow_tags() -> dict[str, str]:
    return {tag: os.environ[env] for env, tag in AIRFLOW_CONTEXT.items() if os.environ.get(env)}


def find_parent(key: str) -> str | None:
    """The id of the parent run tagged `tldr.run_key = key`, or None (nothing is created)."""
    found = _mlflow().search_runs(filter_string=f"tags.`tldr.run_key` = '{key}'",
                                  order_by=["attributes.start_time ASC"], max_results=1, output_format="list")
    return found[0].info.run_id if found else None


def parent_run_id(cfg: Config, io: StageIO, tags: dict[str, str] | None = None, key: str | None = None) -> str:
    """The id of this compression's parent run (tag `tldr.run_key` = `key`, default `run_key(io)`),
    created with the full config as params and `tags` on first use."""
    mlflow = _mlflow()
    key = key or run_key(io)
    found = find_parent(key)
    if found:
        return found
    tags = {"tldr.run_key": key, "tldr.input": redact(io.input), "tldr.out": redact(io.out),
            "tldr.config_hash": cfg.hash(), **_airflow_tags(), **(tags or {})}
    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name(
        os.environ.get("TLDR_MLFLOW_EXPERIMENT", EXPERIMENT)).experiment_id, tags=tags,
        run_name=os.environ.get("TLDR_RUN_NAME") or f"compress {key.rsplit('/', 1)[-1]}")
    params = _flatten(cfg.to_dict())
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    client.set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


@contextmanager
def stage_run(cfg: Config, io: StageIO, stage: str, kwargs: dict) -> Iterator[str]:
    """Run a stage inside a nested MLflow run under the compression's parent; yields the parent id."""
    mlflow = _mlflow()
    parent = parent_run_id(cfg, io)
    name = stage
    if kwargs.get("num_shards", 1) > 1:
        name = f"{stage}[{kwargs['shard_index']}/{kwargs['num_shards']}]"
    tags = {"mlflow.parentRunId": parent, "tldr.stage": stage, **_airflow_tags()}
    with mlflow.start_run(run_name=name, tags=tags, nested=mlflow.active_run() is not None):
        mlflow.log_params({k: str(v) for k, v in kwargs.items()})
        yield parent
    if os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        mlflow.MlflowClient().set_tag(parent, "airflow.run_id", os.environ["AIRFLOW_CTX_DAG_RUN_ID"])


def log_stage_result(stage: str, result: StageResult, seconds: float) -> None:
    """Metrics of the active stage run, plus the stage's duration."""
    mlflow = _mlflow()
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    numbers["seconds"] = seconds
    mlflow.log_metrics({_metric_name(k): v for k, v in numbers.items()})
    mlflow.set_tag("tldr.skipped", str(result.skipped).lower())


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_to_parent(parent: str, metrics: dict[str, float], artifacts: list[str] = (),
                  tags: dict[str, str] | None = None) -> None:
    """Summary numbers and files (report, plots, manifest) on the compression's parent run."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v]
    for start in range(0, len(items), 500):
        client.log_batch(parent, metrics=items[start:start + 500])
    for path in artifacts:
        if os.path.exists(path):
            client.log_artifact(parent, path)
    for key, value in (tags or {}).items():
        client.set_tag(parent, key, redact(value))


def finish_parent(parent: str, status: str = "FINISHED") -> None:
    _mlflow().MlflowClient().set_terminated(parent, status)


def finish_parent_by_key(key: str, status: str) -> str | None:
    """End the parent run tagged `tldr.run_key = key` with `status` (FINISHED or FAILED) when it
    exists; returns its id. An orchestrator's last step or failure callback calls this."""
    parent = find_parent(key)
    if parent:
        finish_parent(parent, status)
    return parent


def register_captioner(parent: str, captioner_dir: str, description: str = "") -> str:
    """Register the captioner in `captioner_dir` as a version of the `tldr-captioner` model, once per
    trained weights: a captioner already registered (by its weights hash, the tag
    `captioner_version`) keeps its version, so retries and runs reusing it add none. Otherwise the
    folder (safetensors + config + tokenizer) is logged on the parent run and registered.
    Returns the model version number, also set as the parent's tag `tldr.captioner_version`."""
    from tldr_tasks.models.captioner import captioner_version

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    weights = captioner_version(captioner_dir)
    try:
        client.get_registered_model(CAPTIONER_MODEL_NAME)
    except mlflow.exceptions.MlflowException:  # RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(CAPTIONER_MODEL_NAME,
                                       description="TL;DR codebook captioner (ViT -> VQ codebook -> decoder)")
    known = client.search_model_versions(f"name = '{CAPTIONER_MODEL_NAME}' and tags.captioner_version = '{weights}'")
    if known:
        version = str(min(int(v.version) for v in known))
    else:
        client.log_artifacts(parent, captioner_dir, artifact_path="captioner")
        source = f"{client.get_run(parent).info.artifact_uri}/captioner"
        version = str(client.create_model_version(CAPTIONER_MODEL_NAME, source=source, run_id=parent,
                                                  tags={"captioner_version": weights},
                                                  description=description).version)
    client.set_tag(parent, "tldr.captioner_version", version)
    client.set_tag(parent, "tldr.captioner_weights", weights)
    return version
