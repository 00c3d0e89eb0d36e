"""MLflow tracking against a real local store: parent/stage runs, Airflow tags, registry, redaction."""

import mlflow

from tldr_tasks import tracking
from tldr_tasks.config import Config
from tldr_tasks.stages.base import StageIO, StageResult


def test_stages_of_one_compression_share_a_parent_run(mlflow_store, monkeypatch):
    io = StageIO(input=str(mlflow_store / "crawl"), out=str(mlflow_store / "out"))
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-11-25")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "embed")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "2")
    shards = [("embed", {"shard_index": i, "num_shards": 2}) for i in range(2)]
    for stage, kwargs in (*shards,
                          ("cluster", {})):
        with tracking.stage_run(Config(), io, stage, kwargs) as parent:
            tracking.log_stage_result(stage, StageResult(metrics={"samples": 10}), 1.5)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.info.run_name for r in children) == ["cluster", "embed[0/2]", "embed[1/2]"]
    assert all(r.data.metrics["samples"] == 10 and r.data.metrics["seconds"] == 1.5 for r in children)
    assert {r.data.tags["airflow.try_number"] for r in children} == {"2"}
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["airflow.run_id"] == "manual__2026-11-25"
    assert parent_run.data.params["sample.ratio"] == "0.25"


def test_captioner_is_registered_as_a_new_model_version(mlflow_store):
    folder = mlflow_store / "captioner"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    io = StageIO(input="in", out=str(mlflow_store / "out"))
    parent = tracking.parent_run_id(Config(), io)
    assert tracking.register_captioner(parent, str(folder)) == "1"
    assert tracking.register_captioner(parent, str(folder)) == "2"
    version = mlflow.MlflowClient().get_model_version(tracking.CAPTIONER_MODEL_NAME, "2")
    assert version.run_id == parent and version.source.endswith("/captioner")


def test_credentials_never_reach_tags():
    assert tracking.redact("s3://AKIA123:s3cret@minio:9000/bucket/x") == "s3://***@minio:9000/bucket/x"
    assert tracking.redact("/local/path") == "/local/path"
