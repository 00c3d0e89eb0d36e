"""MLflow tracking against a real local store: parent/stage runs, Airflow tags, registry, redaction."""

import json

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


def test_captioner_is_registered_once_per_trained_version(mlflow_store):
    def captioner(name: str, weights: str) -> str:
        folder = mlflow_store / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "COMPLETE").write_text(json.dumps({"version": weights}))
        return str(folder)

    first, second = captioner("a", "w1"), captioner("b", "w2")
    io = StageIO(input="in", out=str(mlflow_store / "out"))
    parent = tracking.parent_run_id(Config(), io)
    assert tracking.register_captioner(parent, first) == "1"
    assert tracking.register_captioner(parent, first) == "1"  # a retry, or a run reusing it: no new version
    other_run = tracking.parent_run_id(Config(), StageIO(input="in", out=str(mlflow_store / "out2")))
    assert tracking.register_captioner(other_run, first) == "1"
    assert tracking.register_captioner(other_run, second) == "2"  # other weights: a new version
    version = mlflow.MlflowClient().get_model_version(tracking.CAPTIONER_MODEL_NAME, "2")
    assert version.run_id == other_run and version.source.endswith("/captioner")
    assert version.tags["captioner_version"] == "w2"
    assert mlflow.MlflowClient().get_run(other_run).data.tags["tldr.captioner_version"] == "2"


def test_parent_run_is_ended_by_key(mlflow_store):
    io = StageIO(input="in", out=str(mlflow_store / "out"))
    parent = tracking.parent_run_id(Config(), io, key="dag/run1", tags={"airflow.run_id": "run1"})
    assert tracking.find_parent("dag/run1") == parent and tracking.find_parent("dag/other") is None
    assert tracking.finish_parent_by_key("dag/run1", "FAILED") == parent
    assert mlflow.MlflowClient().get_run(parent).info.status == "FAILED"
    assert tracking.finish_parent_by_key("dag/other", "FAILED") is None


def test_credentials_never_reach_tags():
    assert tracking.redact("s3://AKIA123:s3cret@minio:9000/bucket/x") == "s3://***@minio:9000/bucket/x"
    assert tracking.redact("/local/path") == "/local/path"
