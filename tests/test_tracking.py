"""MLflow tracking against a real local store: parent/stage runs, Airflow tags, registry, redaction."""

import json
import re
import time

import mlflow
import pytest

from tldr_tasks import tracking
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO, StageResult


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
    # a retrain: another folder trained (deterministically) to the same weights is another training
    retrained = captioner("a-r2", "w1")
    assert tracking.register_captioner(other_run, retrained) == "3"
    assert tracking.register_captioner(other_run, retrained) == "3"


def test_parent_run_is_ended_by_key(mlflow_store):
    io = StageIO(input="in", out=str(mlflow_store / "out"))
    parent = tracking.parent_run_id(Config(), io, key="dag/run1", tags={"airflow.run_id": "run1"})
    assert tracking.find_parent("dag/run1") == parent and tracking.find_parent("dag/other") is None
    assert tracking.finish_parent_by_key("dag/run1", "FAILED") == parent
    assert mlflow.MlflowClient().get_run(parent).info.status == "FAILED"
    assert tracking.finish_parent_by_key("dag/other", "FAILED") is None


def test_parent_run_is_named_and_tagged_for_what_differs(mlflow_store, monkeypatch):
    """Issue 26: in the runs table two recompressions differ by name (ratio, strategy, start time), and the key
    parameters are tags, without choosing columns."""
    from tldr_tasks.config import load_config

    monkeypatch.delenv("TLDR_RUN_NAME", raising=False)
    cfg = load_config(None, ["sample.ratio=0.3", "sample.strategy=balanced", "sample.alignment=cluster_pool",
                             "sample.filter=none", "caption.fusion=mix", "cluster.clusters=5"])
    io = StageIO(input="s3://AKIAKEY:secret@bucket/crawl", out="runs/a")
    client = mlflow.MlflowClient()
    run = client.get_run(tracking.parent_run_id(cfg, io))
    assert re.fullmatch(r"r0\.30 balanced \d{4}-\d\d-\d\d \d\d:\d\d", run.info.run_name), run.info.run_name
    assert {k: run.data.tags.get(k) for k in ("ratio", "strategy", "filter", "alignment", "fusion",
                                               "captioner_preset", "clusters", "input")} == {
        "ratio": "0.3", "strategy": "balanced", "filter": "none", "alignment": "cluster_pool", "fusion": "mix",
        "captioner_preset": cfg.captioner.preset, "clusters": "5", "input": "s3://***@bucket/crawl"}
    # the time is the local one, to the minute; a label (the demo's crawl) goes before it
    when = time.mktime((2026, 12, 6, 16, 38, 59, 0, 0, -1))
    assert tracking.run_name(cfg, when=when) == "r0.30 balanced 2026-12-06 16:38"
    assert tracking.run_name(Config(), "demo noise=0.3", when) == (
        "r0.25 clip_score+balanced demo noise=0.3 2026-12-06 16:38")  # the default: the filter, then the strategy
    other = client.get_run(tracking.parent_run_id(Config(), StageIO(input="in", out="runs/b"), label="demo"))
    assert other.info.run_name.startswith("r0.25 clip_score+balanced demo ")
    assert other.info.run_name != run.info.run_name
    monkeypatch.setenv("TLDR_RUN_NAME", "my name")  # a person's own name wins
    assert client.get_run(tracking.parent_run_id(cfg, StageIO(input="in", out="runs/c"))).info.run_name == "my name"


def test_credentials_never_reach_tags():
    assert tracking.redact("s3://AKIA123:s3cret@minio:9000/bucket/x") == "s3://***@minio:9000/bucket/x"
    assert tracking.redact("/local/path") == "/local/path"


def _running_child(parent: str, name: str) -> str:
    """A stage run as a killed process leaves it: RUNNING under `parent`."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tests").experiment_id
    return client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id


def test_stale_running_runs_of_a_run_key_are_ended_failed(mlflow_store):
    killed = tracking.parent_run_id(Config(), StageIO(input="in", out="runs/a"))
    client = mlflow.MlflowClient()  # after tracking set the test's store as the tracking URI
    child = _running_child(killed, "embed")
    other = tracking.parent_run_id(Config(), StageIO(input="in", out="runs/b"))  # another key: left alone
    ended = tracking.end_stale_runs(tracking.key_filter("runs/a"), "test: found RUNNING")
    assert sorted(ended) == sorted([killed, child])
    for run_id in (killed, child):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags[tracking.STALE_TAG] == "test: found RUNNING"
    assert client.get_run(other).info.status == "RUNNING"
    assert tracking.end_stale_runs(tracking.key_filter("runs/a"), "again") == []  # FAILED ones stay as they are


def test_a_retried_stage_part_ends_its_killed_attempt_only(mlflow_store):
    io = StageIO(input="in", out=str(mlflow_store / "out"))
    parent = tracking.parent_run_id(Config(), io)
    killed = _running_child(parent, "cluster")  # the attempt a kill interrupted
    sibling = _running_child(parent, "embed[0/2]")  # a stage part running right now in another task
    with tracking.stage_run(Config(), io, "cluster", {}) as found:
        assert found == parent
    client = mlflow.MlflowClient()
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(sibling).info.status == "RUNNING"


def test_parent_params_describe_the_run(mlflow_store):
    """The compression's config, without the crawl generator's section, and `evaluate.*` once evaluated."""
    io = StageIO(input="in", out="runs/a")
    parent = tracking.parent_run_id(Config(), io)
    params = mlflow.MlflowClient().get_run(parent).data.params
    assert params["sample.ratio"] == str(Config().sample.ratio) and "seed" in params
    assert not [name for name in params if name.startswith(("crawl.", "evaluate."))]
    for _ in range(2):  # a retry logs the same values again
        with tracking.stage_run(Config(), io, "evaluate", {}):
            pass
    params = mlflow.MlflowClient().get_run(parent).data.params
    assert params["evaluate.epochs"] == str(Config().evaluate.epochs)


@pytest.mark.slow
def test_local_compress_parent_carries_summary_lineage_and_report(tiny_crawl, random_captioner, mlflow_store):
    from tldr_tasks.compare import load
    from tldr_tasks.config import load_config
    from tldr_tasks.runner import compress

    tiny = ["caption.num_beams=1", "caption.max_new_tokens=8", "materialize.shard_size=20", "cluster.clusters=4",
            "sample.ratio=0.3"]
    io = StageIO(input=f"{tiny_crawl}/train", out=str(mlflow_store / "run"), captioner=random_captioner)
    killed = tracking.parent_run_id(load_config(None, tiny), io)  # an earlier compress on this --out, killed
    killed_child = _running_child(killed, "embed")
    summary = compress(load_config(None, tiny), io)

    client = mlflow.MlflowClient()
    assert client.get_run(killed).info.status == client.get_run(killed_child).info.status == "FAILED"
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.run_id != killed and parent.info.status == "FINISHED"
    manifest = summary["manifest"]
    metrics = parent.data.metrics
    assert metrics["kept"] == manifest["kept"] and metrics["input_samples"] == manifest["input_samples"]
    assert {"dropped", "rejected", "ratio", "clusters", "cluster_size_max", "alignment_input_mean",
            "alignment_kept_mean", "captions_original_ungrounded", "caption_collapsed", "caption_entropy_ratio",
            "seconds.embed", "samples_per_second.embed", "seconds.materialize"} - set(metrics) == set()
    # the synthetic crawl carries ground truth: the strict judge's noise of what shipped and of the originals
    assert (metrics["shipped_noise"], metrics["original_noise"]) == pytest.approx(
        (manifest["caption_noise"]["shipped"], manifest["caption_noise"]["original"]), abs=1e-4)
    if manifest["metrics"]["caption_confidence_mean"] == manifest["metrics"]["caption_confidence_mean"]:
        assert metrics["caption_confidence_mean"] == pytest.approx(manifest["metrics"]["caption_confidence_mean"])
    assert "seconds.train-captioner" not in metrics  # the captioner was reused: no work, no timing
    # the names are what `tldr-vlp compare` shows for the run folder
    assert set(metrics) == set(load(io.out)["metrics"])
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "manifest.json" in artifacts
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.html", "report/metrics.json", "report/cluster_sizes.csv", "report/alignment.csv"}
    # lineage: input crawl and output as datasets with their digests, the captioner
    datasets = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert datasets["crawl"].dataset.digest == manifest["input_version"]
    assert datasets["compressed"].dataset.digest == manifest["output_version"]
    assert json.loads(datasets["crawl"].dataset.source)["uri"] == f"{tiny_crawl}/train"
    assert {t.value for t in datasets["compressed"].tags if t.key == "mlflow.data.context"} == {"output"}
    assert {t.value for t in datasets["crawl"].tags if t.key == "mlflow.data.context"} == {"training"}
    assert manifest["captioner_version"] == parent.data.tags["tldr.captioner_weights"]
    assert parent.data.tags["tldr.captioner_version"] == "1"
    # named and tagged for what differs; the clusters tag is the number the run used
    assert parent.info.run_name.startswith("r0.30 clip_score+balanced ")
    assert parent.data.tags["ratio"] == "0.3" and parent.data.tags["clusters"] == str(int(metrics["clusters"]))
