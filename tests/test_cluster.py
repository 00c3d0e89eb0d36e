"""kmeans -> assign -> cluster: k-means finds well-separated groups, the fanned-out assignment equals
the single-process one, duplicates across shards become rejects, refusals say what to change, reruns
are skipped."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO
from tldr_tasks.models.captioner import MARKER
from tldr_tasks.stages import assign, cluster, embed, kmeans

VERSION = "testver00000"


def _setup(tmp_path, parts, feature="quantized_mean"):
    """A crawl folder with one (empty) tar per part, a finished-captioner marker, and the embed parts.

    Args:
        parts: per shard, (keys, features, loss, rejects [(key, reason)]).
    """
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    captioner = tmp_path / "captioner"
    captioner.mkdir()
    (captioner / MARKER).write_text(json.dumps({"version": VERSION}))
    io = StageIO(input=str(crawl), out=str(tmp_path / "run"), captioner=str(captioner))
    cfg = Config(seed=0)
    cfg.embed.feature = feature
    directory = embed.parts_dir(cfg, io)
    assert directory.endswith(f"{VERSION}-{feature}")
    for i, (keys, features, loss, rejects) in enumerate(parts):
        (crawl / f"{i:05d}.tar").write_bytes(b"")  # cluster never opens the shards
        embed.save_part(embed.part_url(directory, str(crawl / f"{i:05d}.tar")), embed.EmbedPart(
            keys=np.asarray(keys, dtype=str), features=features, loss=np.asarray(loss, np.float32),
            reject_keys=np.asarray([k for k, _ in rejects], dtype=str),
            reject_reasons=np.asarray([r for _, r in rejects], dtype=str),
            meta={"shard": f"{i:05d}", "samples": len(keys), "rejected": len(rejects)}))
    return cfg, io


def _cluster(cfg, io, groups=1):
    """The three stages in order, `assign` as `groups` workers: cluster's result."""
    kmeans.run(cfg, io)
    for index in range(groups):
        assign.run(cfg, io, shard_index=index, num_shards=groups)
    return cluster.run(cfg, io)


def _blobs(n_per, centers, seed, spread=0.05):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.standard_normal((n_per, len(c))) for c in centers])
    labels = np.repeat(np.arange(len(centers)), n_per)
    order = rng.permutation(len(x))
    return x[order], labels[order]


def test_kmeans_separates_blobs_and_writes_outputs(tmp_path):
    centers = np.eye(16)[:3] * 5.0  # orthogonal directions: distinct after L2 normalisation
    x, labels = _blobs(40, centers, seed=0)
    parts = [([f"s{s}_{i:03d}" for i in range(40)], x[s * 40:(s + 1) * 40].astype(np.float16),
              np.arange(40, dtype=np.float32), []) for s in range(3)]
    cfg, io = _setup(tmp_path, parts)
    cfg.cluster.clusters = 3
    result = _cluster(cfg, io)
    table = pq.read_table(f"{io.cluster_dir}/assignments.parquet").to_pandas()
    assert len(table) == 120 and table["key"].is_unique
    assert list(table.columns) == ["key", "shard", "cluster", "distance", "loss"]
    truth = dict(zip([k for p in parts for k in p[0]], labels))
    table["truth"] = table["key"].map(truth)
    # every blob in exactly one cluster, and the three clusters distinct
    assert table.groupby("truth")["cluster"].nunique().tolist() == [1, 1, 1]
    assert table.groupby("truth")["cluster"].first().nunique() == 3
    assert (table["distance"] < 0.2).all()  # points near their centroid on the unit sphere
    assert table.loc[table["key"] == "s1_007", "loss"].item() == 7.0
    assert set(table["shard"].astype(str)) == {"00000", "00001", "00002"}
    centroids = np.load(f"{io.cluster_dir}/centroids.npy")
    assert centroids.shape == (3, 16) and centroids.dtype == np.float32
    stats = json.loads((tmp_path / "run" / "cluster" / "stats.json").read_text())
    assert stats["samples"] == 120 and stats["clusters"] == 3 and stats["empty_clusters"] == 0
    assert stats["cluster_size_min"] == stats["cluster_size_max"] == 40 and stats["rejected"] == 0
    assert (tmp_path / "run" / "cluster" / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["samples"] == 120 and not result.skipped
    again = _cluster(cfg, io)
    assert again.skipped and again.metrics == result.metrics


def test_same_seed_same_assignments(tmp_path):
    x, _ = _blobs(30, np.random.default_rng(3).standard_normal((6, 8)), seed=1, spread=0.5)
    parts = [([f"k{i:03d}" for i in range(180)], x.astype(np.float16), np.zeros(180), [])]
    results = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg, io = _setup(tmp_path / name, parts)
        cfg.cluster.clusters = 6
        _cluster(cfg, io)
        results.append(pq.read_table(f"{io.cluster_dir}/assignments.parquet").to_pandas())
    assert results[0]["cluster"].tolist() == results[1]["cluster"].tolist()


def test_duplicates_across_shards_and_reader_rejects(tmp_path):
    x, _ = _blobs(10, np.eye(4) * 3, seed=2)
    parts = [
        (["a", "b", "c", "d", "e"], x[:5].astype(np.float16), np.zeros(5), [("bad1", "undecodable image: x")]),
        (["f", "c", "g", "a", "h"], x[5:10].astype(np.float16), np.ones(5), []),
        (["i", "j", "k", "l", "m"], x[10:15].astype(np.float16), np.ones(5), [("", "shard unreadable after 5")]),
    ]
    cfg, io = _setup(tmp_path, parts)
    cfg.cluster.clusters = 2
    result = _cluster(cfg, io, groups=2)
    table = pq.read_table(f"{io.cluster_dir}/assignments.parquet").to_pandas()
    assert sorted(table["key"]) == list("abcdefghijklm")
    assert table.set_index("key").loc[["a", "c"], "shard"].astype(str).tolist() == ["00000", "00000"]
    rejects = pq.read_table(f"{io.cluster_dir}/rejects.parquet").to_pylist()
    assert {(r["key"], r["shard"], r["reason"]) for r in rejects} == {
        ("bad1", "00000", "undecodable image: x"), (None, "00002", "shard unreadable after 5"),
        ("c", "00001", kmeans.DUPLICATE_REASON), ("a", "00001", kmeans.DUPLICATE_REASON)}
    assert result.metrics["duplicates"] == 2 and result.metrics["rejected"] == 4
    assert result.metrics["samples"] == 13


def test_too_many_clusters_refused_before_work(tmp_path):
    parts = [([f"k{i}" for i in range(5)], np.ones((5, 4), np.float16), np.zeros(5), [])]
    cfg, io = _setup(tmp_path, parts)
    cfg.cluster.clusters = 6
    with pytest.raises(ConfigError, match=r"cluster.clusters=6 but only 5 samples.*at most 5"):
        kmeans.run(cfg, io)
    assert not (tmp_path / "run" / "kmeans").exists()


def test_missing_parts_named(tmp_path):
    parts = [([f"k{i}" for i in range(5)], np.ones((5, 4), np.float16), np.zeros(5), [])]
    cfg, io = _setup(tmp_path, parts)
    (tmp_path / "crawl" / "00007.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"1 of 2 input shards are not embedded yet.*00007"):
        kmeans.run(cfg, io)


def test_code_index_pca_whitens_to_pca_dim(tmp_path):
    # two "scene types": token codes drawn from disjoint halves of a 64-code book, 20 tokens each
    rng = np.random.default_rng(4)
    codes = np.concatenate([rng.integers(0, 32, (50, 20)), rng.integers(32, 64, (50, 20))]).astype(np.int16)
    labels = np.repeat([0, 1], 50)
    parts = [([f"k{i:03d}" for i in range(100)], codes, np.zeros(100), [])]
    cfg, io = _setup(tmp_path, parts, feature="code_index_pca")
    # 2 dims: the scene types' direction plus one of noise (at 8, whitening gives the noise directions
    # the same variance and 2-means splits the set differently from seed to seed)
    cfg.cluster.clusters, cfg.cluster.pca_dim = 2, 2
    _cluster(cfg, io)
    assert np.load(f"{io.cluster_dir}/centroids.npy").shape == (2, 2)
    table = pq.read_table(f"{io.cluster_dir}/assignments.parquet").to_pandas()
    assigned = table.sort_values("key")["cluster"].to_numpy()
    agreement = max((assigned == labels).mean(), (assigned != labels).mean())
    assert agreement > 0.95
    from tldr_tasks import storage
    from tldr_tasks.stages import assign, kmeans, sample

    keys, stems = table["key"].to_numpy().astype(str), table["shard"].astype(str).to_numpy()
    shards = io.input_shards()
    part_urls = dict(zip((storage.shard_stem(s) for s in shards), kmeans.part_urls(cfg, io, shards)))
    features = sample.gather_features(part_urls, keys, stems, np.arange(100), assign.load_pca(io))
    assert features.dtype == np.float16 and features.shape == (100, 2)
    assert np.allclose(np.linalg.norm(features.astype(np.float32), axis=1), 1.0, atol=1e-2)


def test_cluster_count_follows_crawl_size_and_ratio():
    from tldr_tasks.config import Config
    from tldr_tasks.stages.kmeans import cluster_count

    cfg = Config()
    assert cfg.cluster.clusters == 0  # the default is the rule
    assert cluster_count(cfg, 8000) == 358  # 8 * sqrt(0.25 * 8000)
    assert cluster_count(cfg, 2_820_000) == 6717  # CC3M at 25%
    cfg.sample.ratio = 1.0
    assert cluster_count(cfg, 8000) == 716  # keeping more: more clusters
    assert cluster_count(cfg, 3) == 3  # never more clusters than samples
    cfg.cluster.clusters = 7
    assert cluster_count(cfg, 8000) == 7  # an explicit count wins


def test_fanned_out_assignment_equals_single_process(tmp_path):
    """Three shard groups give each key the cluster one worker gives it: the nearest trained centroid."""
    rng = np.random.default_rng(5)
    x, _ = _blobs(50, rng.standard_normal((8, 16)), seed=6, spread=0.6)
    parts = [([f"s{s}_{i:03d}" for i in range(50)], x[s * 50:(s + 1) * 50].astype(np.float16), rng.random(50), [])
             for s in range(8)]
    tables = {}
    for groups in (1, 3):
        (tmp_path / str(groups)).mkdir()
        cfg, io = _setup(tmp_path / str(groups), parts)
        cfg.cluster.clusters = 8
        cfg.cluster.max_points_per_centroid = 20  # trains on 160 of 400 rows: a sample, not all
        result = _cluster(cfg, io, groups=groups)
        assert result.metrics["train_points"] == 160
        tables[groups] = pq.read_table(f"{io.cluster_dir}/assignments.parquet").to_pandas()
    single, fanned = tables[1], tables[3]
    assert len(single) == 400 and single["key"].tolist() == fanned["key"].tolist()
    assert single["cluster"].tolist() == fanned["cluster"].tolist()
    assert np.array_equal(single["distance"].to_numpy(), fanned["distance"].to_numpy())
    # and that cluster is the nearest centroid to each L2-normalised feature
    centroids = np.load(f"{io.cluster_dir}/centroids.npy")
    features = x.astype(np.float16).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    nearest = ((features[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    order = {k: i for i, k in enumerate(k for p in parts for k in p[0])}
    assert nearest[single["key"].map(order)].tolist() == single["cluster"].tolist()
    sizes = json.loads((tmp_path / "3" / "run" / "cluster" / "stats.json").read_text())
    assert sizes["cluster_size_max"] == single["cluster"].value_counts().max()


def test_reduce_refuses_until_every_group_is_assigned(tmp_path):
    x, _ = _blobs(10, np.eye(4) * 3, seed=7)
    parts = [([f"s{s}_{i}" for i in range(10)], x[s * 10:(s + 1) * 10].astype(np.float16), np.zeros(10), [])
             for s in range(4)]
    cfg, io = _setup(tmp_path, parts)
    cfg.cluster.clusters = 2
    with pytest.raises(ConfigError, match=r"run `tldr-vlp run kmeans`"):
        assign.run(cfg, io)
    kmeans.run(cfg, io)
    assert assign.run(cfg, io, shard_index=0, num_shards=2).metrics["samples"] == 20  # shards 00000 and 00002
    with pytest.raises(ConfigError, match=r"2 of 4 input shards are not assigned yet.*00001, 00003"):
        cluster.run(cfg, io)
    assert not (tmp_path / "run" / "cluster" / "stats.json").exists()
    assign.run(cfg, io, shard_index=1, num_shards=2)
    assert cluster.run(cfg, io).metrics["samples"] == 40
