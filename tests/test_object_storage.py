"""`compress` with everything on object storage: a real S3 API (moto's server, as s3fs's own tests
use it) on 127.0.0.1, reached through s3fs (the `s3` extra) and boto3 exactly as a cloud bucket is:
input shards, captioner, output, embedding cache and MLflow's artifacts all on s3://."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlflow
import pytest
from test_end_to_end import TINY

from tldr_tasks import cli
from tldr_tasks.pipeline import STAGES

BUCKET = "tldr"


@pytest.fixture()
def s3(monkeypatch):
    """An empty bucket on a local S3 server; credentials and endpoint in the environment, where s3fs,
    boto3 (AWS_ENDPOINT_URL) and MLflow (MLFLOW_S3_ENDPOINT_URL) read them. Yields the s3fs filesystem."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def upload(fs, folder: str, prefix: str) -> None:
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.relative_to(folder)}")


@pytest.mark.slow
def test_compress_with_everything_on_s3(tiny_crawl, random_captioner, s3, mlflow_store, tmp_path, monkeypatch, capsys):
    upload(s3, f"{tiny_crawl}/train", f"{BUCKET}/crawl/train")
    upload(s3, random_captioner, f"{BUCKET}/captioners/random")
    client = mlflow.MlflowClient()
    client.create_experiment("tests", artifact_location=f"s3://{BUCKET}/mlflow")  # the runs' artifacts
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    out = f"s3://{BUCKET}/runs/r1"
    argv = ["compress", "--input", f"s3://{BUCKET}/crawl/train", "--out", out,
            "--captioner", f"s3://{BUCKET}/captioners/random", "--embed-cache", f"s3://{BUCKET}/embed", *TINY]
    assert cli.main(argv) == 0

    manifest = json.loads(s3.cat(f"{BUCKET}/runs/r1/shards/manifest.json"))
    assert manifest["input_samples"] == 200 and manifest["input"] == f"s3://{BUCKET}/crawl/train"
    assert manifest["kept"] == pytest.approx(0.3 * (200 - manifest["rejected"]), abs=4)
    shards = s3.glob(f"{BUCKET}/runs/r1/shards/*.tar")
    assert len(shards) == manifest["metrics"]["output_shards"] >= 1
    embeddings = s3.glob(f"{BUCKET}/embed/*/*.npz")
    assert len(embeddings) == 2  # one per input shard, in the shared cache
    # and the towers' features the default filter's reference read, one part per shard, on S3 too
    assert len(s3.glob(f"{BUCKET}/embed/towers/*/*.npz")) == 2
    assert list(workdir.iterdir()) == []  # nothing staged in the working folder

    parent = next(r for r in client.search_runs([client.get_experiment_by_name("tests").experiment_id])
                  if "tldr.run_key" in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.metrics["kept"] == manifest["kept"]
    assert parent.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    artifacts = parent.info.artifact_uri.removeprefix("s3://")
    assert s3.exists(f"{artifacts}/manifest.json") and s3.exists(f"{artifacts}/report/report.html")
    [version] = client.search_model_versions("name = 'tldr-captioner'")  # the captioner's files, copied
    assert sorted(os.path.basename(p) for p in s3.ls(version.source.removeprefix("s3://"))) == sorted(
        p.name for p in Path(random_captioner).iterdir())

    # a rerun on the same bucket finds every part done (the cached embeddings untouched) and writes the same manifest
    def written() -> dict[str, str]:
        s3.invalidate_cache()  # s3fs's listing cache would answer with the first run's objects
        return {path: s3.info(path)["LastModified"] for path in s3.glob(f"{BUCKET}/embed/**/*.npz")}

    cached = written()
    capsys.readouterr()
    assert cli.main(argv) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if re.match(r"\[\d+/\d+\] [\w-]+: ", line)]
    assert [line.split("] ")[1] for line in progress] == [
        f"{spec.name}: already done, skipped" for spec in STAGES if not spec.optional]
    assert written() == cached
    assert json.loads(s3.cat(f"{BUCKET}/runs/r1/shards/manifest.json")) == manifest
