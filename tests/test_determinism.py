"""Determinism: the same seed and inputs give the same selection and byte-identical outputs, in
separate folders; another seed gives another selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.runner import compress
from tldr_tasks.stages import assign, cluster, embed, kmeans, sample

torch.set_num_threads(1)

TINY = ["captioner.epochs=1", "captioner.image_size=32", "captioner.batch_size=32", "caption.num_beams=1",
        "caption.max_new_tokens=12", "materialize.shard_size=20", "cluster.clusters=4", "sample.ratio=0.3"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Files that name their own folder or hold wall-clock timings; compared field by field instead.
NOT_BYTE_COMPARABLE = {"manifest.json", "config.json", "stats.json"}
RUN_RECORDS = {"timings", "report"}  # about the run (seconds; the report page names its folder), not its data


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    """A private MLflow store; DeepSpeed's rendezvous variables restored afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TLDR_MLFLOW_EXPERIMENT", "determinism")
    monkeypatch.delenv("TLDR_RUN_KEY", raising=False)
    for name in DIST_VARS:  # set-then-delete records the original state, so it is restored
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    return tmp_path


def selected_keys(out: Path) -> list[str]:
    return pq.read_table(out / "sample" / "selected.parquet").column("key").to_pylist()


def data_files(out: Path) -> dict[str, bytes]:
    """Every output file of a run folder (relative path -> bytes), except the MLflow store."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in NOT_BYTE_COMPARABLE and p.relative_to(out).parts[0] not in RUN_RECORDS}


def without(record: dict, *names: str) -> dict:
    return {k: v for k, v in record.items() if k not in names and not k.endswith("_s")}


@pytest.mark.slow
def test_same_seed_same_output_other_seed_other_selection(tiny_crawl, isolated):
    crawl = str(Path(tiny_crawl) / "train")
    cfg = load_config(None, TINY)
    first, second = isolated / "first", isolated / "second"
    summaries = [compress(cfg, StageIO(input=crawl, out=str(out))) for out in (first, second)]

    keys = selected_keys(first)
    assert len(keys) == 60 and keys == selected_keys(second)
    # every output of every stage, byte for byte: captioner weights, embeddings, clusters,
    # selection, generated captions and the compressed shards
    one, two = data_files(first), data_files(second)
    assert sorted(one) == sorted(two)
    assert sum(name.startswith("shards/") and name.endswith(".tar") for name in one) == 3
    assert [name for name in one if one[name] != two[name]] == []
    manifests = [json.loads((out / "shards" / "manifest.json").read_text()) for out in (first, second)]
    assert without(manifests[0], "output_shards") == without(manifests[1], "output_shards")
    stats = [json.loads((out / "cluster" / "stats.json").read_text()) for out in (first, second)]
    assert without(stats[0], "seconds") == without(stats[1], "seconds")
    assert summaries[0]["manifest"]["kept"] == summaries[1]["manifest"]["kept"] == 60

    # another seed, same captioner (reused, to keep the test short): another k-means and draw
    other = isolated / "other"
    compress(load_config(None, [*TINY, "seed=1"]),
             StageIO(input=crawl, out=str(other), captioner=str(first / "captioner")))
    other_keys = selected_keys(other)
    assert len(other_keys) == 60 and other_keys != keys
    assert len(set(other_keys) & set(keys)) < 60


def _assignments(path: Path, n: int = 400, clusters: int = 8) -> None:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "key": [f"{i:07d}" for i in rng.permutation(n)], "shard": [f"{i % 4:05d}" for i in range(n)],
        "cluster": rng.integers(0, clusters, n).astype(np.int32), "distance": rng.random(n).astype(np.float32),
        "loss": rng.random(n).astype(np.float32)}), path)


@pytest.mark.parametrize("strategy", ["uniform", "hard", "near_centroid", "random"])
def test_sample_is_a_function_of_assignments_and_seed(tmp_path, strategy):
    def selection(name: str, seed: int) -> bytes:
        out = tmp_path / name
        _assignments(out / "cluster" / "assignments.parquet")
        cfg = load_config(None, [f"seed={seed}", f"sample.strategy={strategy}", "sample.filter=none",
                                 "sample.ratio=0.25"])
        sample.run(cfg, StageIO(input="unused", out=str(out)))
        return (out / "sample" / "selected.parquet").read_bytes()

    first, again, reseeded = selection("a", 0), selection("b", 0), selection("c", 1)
    assert first == again
    keys = pq.read_table(pa.BufferReader(first)).column("key").to_pylist()
    assert len(keys) == 100 and keys == sorted(keys)
    # the random draws depend on the seed; ranking by loss or distance does not
    assert (first != reseeded) == (strategy in ("uniform", "random"))


def test_cluster_is_a_function_of_embeddings_and_seed(tmp_path):
    """Synthetic embed parts (8 blobs): the same seed gives identical assignments and centroids."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, 16))
    shards = []
    for s in range(2):
        shard = tmp_path / "crawl" / f"{s:05d}.tar"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(b"")  # only its name matters: cluster reads the embed parts
        shards.append(shard)
    captioner = tmp_path / "captioner"  # only its version is read: it names the embed parts' folder
    captioner.mkdir()
    (captioner / "COMPLETE").write_text(json.dumps({"version": "v0"}))

    def run(name: str, seed: int) -> dict[str, bytes]:
        out = tmp_path / name
        cfg = load_config(None, [f"seed={seed}", "cluster.clusters=8", "cluster.niter=10"])
        io = StageIO(input=str(tmp_path / "crawl"), out=str(out), captioner=str(captioner),
                     embed_cache=str(out / "embed"))
        directory = embed.parts_dir(cfg, io)
        for s, shard in enumerate(shards):
            points = np.random.default_rng(s).integers(0, 8, 150)
            features = centres[points] + 0.05 * np.random.default_rng(10 + s).normal(size=(150, 16))
            embed.save_part(embed.part_url(directory, str(shard)), embed.EmbedPart(
                keys=np.array([f"{s}{i:05d}" for i in range(150)]), features=features.astype(np.float16),
                loss=np.zeros(150, np.float32), reject_keys=np.array([], dtype=str),
                reject_reasons=np.array([], dtype=str), meta={"shard": shard.stem, "samples": 150, "rejected": 0}))
        for stage in (kmeans, assign, cluster):
            stage.run(cfg, io)
        return {p.name: p.read_bytes() for p in (out / "cluster").iterdir() if p.name != "stats.json"}

    first, again, reseeded = run("a", 0), run("b", 0), run("c", 1)
    assert first == again
    assert sorted(first) == ["assignments.parquet", "centroids.npy", "cluster_sizes.png", "rejects.parquet"]
    assert first["centroids.npy"] != reseeded["centroids.npy"]
