"""sample: every strategy keeps what a hand computation says, totals add up, choices are seeded."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO
from tldr_tasks.stages import sample


def _io(tmp_path, rows):
    out = tmp_path / "run"
    (out / "cluster").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "cluster" / "assignments.parquet")
    return StageIO(input=str(tmp_path / "crawl"), out=str(out))


def _cfg(strategy, ratio, seed=0):
    """One strategy alone: no alignment filter ahead of it (the filter's own tests set it)."""
    cfg = Config(seed=seed)
    cfg.sample.strategy, cfg.sample.ratio, cfg.sample.filter = strategy, ratio, "none"
    return cfg


def _selected(io):
    return pq.read_table(f"{io.out}/sample/selected.parquet").to_pylist()


# 12 samples in 3 clusters of 6, 4 and 2, rows deliberately out of key order.
# At ratio 0.25: 3 kept; exact shares 1.5, 1.0, 0.5 -> floors 1, 1, 0 and the one left over goes to
# the largest remainder, a tie of clusters 0 and 2 broken towards the lower id: quotas 2, 1, 0.
SMALL = [
    # key, cluster, distance, loss
    ("k05", 0, 0.50, 1.0), ("k00", 0, 0.10, 3.0), ("k01", 0, 0.90, float("nan")), ("k02", 0, 0.30, 5.0),
    ("k03", 0, 0.70, 2.0), ("k04", 0, 0.20, 4.0),
    ("k09", 1, 0.40, 0.5), ("k06", 1, 0.05, 9.0), ("k07", 1, 0.80, 0.1), ("k08", 1, 0.60, 7.0),
    ("k10", 2, 0.10, 8.0), ("k11", 2, 0.20, 6.0),
]


def _small_rows():
    return [{"key": k, "shard": "00000" if k < "k06" else "00001", "cluster": c, "distance": d, "loss": loss}
            for k, c, d, loss in SMALL]


def test_cluster_quotas_use_largest_remainder():
    assert sample.cluster_quotas(np.array([6, 4, 2]), 0.25, 3).tolist() == [2, 1, 0]
    # exact 5, 3.5, 1.5: floors sum to 9, the 10th goes to the lower-id tie (cluster 1)
    assert sample.cluster_quotas(np.array([10, 7, 3]), 0.5, 10).tolist() == [5, 4, 1]
    assert sample.cluster_quotas(np.array([3, 5]), 1.0, 8).tolist() == [3, 5]
    sizes = np.random.default_rng(0).integers(1, 50, size=40)
    quotas = sample.cluster_quotas(sizes, 0.3, sample.target_count(0.3, int(sizes.sum())))
    assert quotas.sum() == round(0.3 * sizes.sum()) and np.all(quotas <= sizes)
    assert np.all(np.abs(quotas - 0.3 * sizes) < 1.0)


@pytest.mark.parametrize("strategy, expected", [
    ("hard", {"k02", "k04", "k06"}),  # highest loss: cluster 0 -> 5.0, 4.0 (NaN never first); cluster 1 -> 9.0
    ("near_centroid", {"k00", "k04", "k06"}),  # cluster 0: 0.10, 0.20; cluster 1: 0.05
    ("far_centroid", {"k01", "k03", "k07"}),  # cluster 0: 0.90, 0.70; cluster 1: 0.80
])
def test_deterministic_strategies_keep_hand_computed_keys(tmp_path, strategy, expected):
    io = _io(tmp_path, _small_rows())
    result = sample.run(_cfg(strategy, 0.25), io)
    rows = _selected(io)
    assert {r["key"] for r in rows} == expected
    assert [r["key"] for r in rows] == sorted(expected)  # sorted by key
    assert all(r["shard"] == ("00000" if r["key"] < "k06" else "00001") for r in rows)
    stats = json.loads((tmp_path / "run" / "sample" / "stats.json").read_text())
    assert {k: v for k, v in stats.items() if not k.startswith("alignment_")} == {
        "input": 12, "kept": 3, "dropped": 9, "ratio": 0.25, "ratio_achieved": 0.25, "clusters": 3,
        "clusters_kept": 2, "strategy": strategy, "alignment": "none", "aligned_share": 0.5, "seed": 0,
            "misaligned": "drop", "repair": 0, "filter": "none"}
    assert result.metrics["kept"] == 3 and not result.skipped


def test_hard_strategy_puts_empty_captions_last(tmp_path):
    rows = [{"key": f"k{i}", "shard": "00000", "cluster": 0, "distance": 0.0, "loss": loss}
            for i, loss in enumerate([float("nan"), 0.1, 0.2, float("nan")])]
    io = _io(tmp_path, rows)
    sample.run(_cfg("hard", 0.75), io)
    assert {r["key"] for r in _selected(io)} == {"k1", "k2", "k0"}  # NaN ties broken by key


def test_uniform_keeps_quota_of_every_cluster(tmp_path):
    io = _io(tmp_path, _small_rows())
    sample.run(_cfg("uniform", 0.25), io)
    clusters = [r["cluster"] for r in _selected(io)]
    assert sorted(clusters) == [0, 0, 1]


def _big_rows(n=400, clusters=7):
    rng = np.random.default_rng(1)
    return [{"key": f"{i:05d}", "shard": f"{i // 100:05d}", "cluster": int(rng.integers(clusters)),
             "distance": float(rng.random()), "loss": float(rng.random())} for i in range(n)]


@pytest.mark.parametrize("strategy", ["uniform", "random"])
def test_random_strategies_are_seeded(tmp_path, strategy):
    rows = _big_rows()
    picks = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        io = _io(tmp_path / name, rows)
        result = sample.run(_cfg(strategy, 0.3, seed), io)
        picks[name] = [r["key"] for r in _selected(io)]
        assert result.metrics["kept"] + result.metrics["dropped"] == result.metrics["input"] == 400
        assert result.metrics["kept"] == 120
    assert picks["a"] == picks["b"]
    assert picks["a"] != picks["c"]


def test_uniform_is_proportional_random_is_not_bound_to_clusters(tmp_path):
    rows = _big_rows(n=1000, clusters=5)
    sizes = np.bincount([r["cluster"] for r in rows])
    io = _io(tmp_path / "u", rows)
    sample.run(_cfg("uniform", 0.25), io)
    kept = np.bincount([r["cluster"] for r in _selected(io)], minlength=5)
    assert np.all(np.abs(kept - 0.25 * sizes) < 1.0)
    assert kept.sum() == 250
    # random ignores clusters: with 1000 samples its per-cluster counts deviate from the quotas
    io = _io(tmp_path / "r", rows)
    sample.run(_cfg("random", 0.25), io)
    kept_random = np.bincount([r["cluster"] for r in _selected(io)], minlength=5)
    assert kept_random.sum() == 250 and np.any(np.abs(kept_random - 0.25 * sizes) >= 1.0)


def test_rerun_is_skipped_and_zero_keep_refused(tmp_path):
    io = _io(tmp_path, _small_rows())
    first = sample.run(_cfg("near_centroid", 0.5), io)
    again = sample.run(_cfg("near_centroid", 0.5), io)
    assert again.skipped and again.metrics == first.metrics
    io2 = _io(tmp_path / "other", _small_rows())
    with pytest.raises(ConfigError, match="keeps 0 of 12"):
        sample.run(_cfg("uniform", 0.01), io2)
    assert not (tmp_path / "other" / "run" / "sample" / "stats.json").exists()


def test_target_count_rounds_half_up():
    assert sample.target_count(0.25, 10) == 3  # 2.5 -> 3 (round() would give 2)
    assert sample.target_count(0.25, 12) == 3
    assert sample.target_count(1.0, 7) == 7
    assert sample.target_count(0.1, 4) == math.floor(0.4 + 0.5)


def test_balanced_takes_the_same_number_from_every_cluster():
    from tldr_tasks.stages.sample import balanced_quotas, choose

    sizes = np.array([100, 3, 10, 1])
    assert balanced_quotas(sizes, 20).tolist() == [8, 3, 8, 1]
    assert balanced_quotas(sizes, 21).tolist() == [9, 3, 8, 1]
    assert balanced_quotas(sizes, 114).tolist() == [100, 3, 10, 1]
    cluster = np.repeat(np.arange(4), sizes)
    keep = choose(cluster, None, 20 / 114, seed=0, strategy="balanced")
    assert np.bincount(cluster[keep], minlength=4).tolist() == [8, 3, 8, 1]


def test_alignment_scores_are_robust_z_scores_within_each_cluster():
    cluster = np.array([0, 0, 0, 1, 1, 1, 1])
    loss = np.array([1.0, 2.0, 3.0, 10.0, 10.0, 12.0, np.nan])
    score = sample.alignment_scores(cluster, loss)
    # cluster 0: median 2, MAD 1 -> z = (loss - 2) / 1.4826, negated
    assert score[:3] == pytest.approx([1 / 1.4826, 0.0, -1 / 1.4826])
    # cluster 1 sits at another loss level but its typical pair scores the same as cluster 0's
    assert score[3] == score[4] and score[3] >= 0 and score[5] < 0
    assert score[6] == -np.inf  # an empty caption is the worst aligned


def _planted_crawl(n=3000, clusters=30, misaligned=0.3, seed=0):
    """Clusters at different loss levels (the captioner knows popular content best); a planted share of
    misaligned pairs lies well above its cluster's level."""
    rng = np.random.default_rng(seed)
    cluster = np.sort(rng.integers(clusters, size=n))
    level = rng.uniform(0.5, 2.5, size=clusters)[cluster]
    bad = rng.random(n) < misaligned
    loss = level + np.where(bad, rng.normal(1.5, 0.3, n), rng.normal(0.0, 0.15, n))
    rows = [{"key": f"{i:06d}", "shard": "00000", "cluster": int(c), "distance": 0.0, "loss": float(v)}
            for i, (c, v) in enumerate(zip(cluster, loss))]
    return rows, bad


@pytest.mark.parametrize("strategy", ["uniform", "balanced"])
def test_alignment_pool_keeps_the_exact_ratio_and_prefers_clean_pairs(tmp_path, strategy):
    rows, bad = _planted_crawl()
    shares = {}
    kept_per_cluster = {}
    for alignment in ("none", "cluster_pool", "global_pool", "rank"):
        cfg = _cfg(strategy, 0.25)
        cfg.sample.alignment = alignment
        io = _io(tmp_path / alignment, rows)
        result = sample.run(cfg, io)
        kept = [int(r["key"]) for r in _selected(io)]
        assert len(kept) == result.metrics["kept"] == sample.target_count(0.25, 3000)
        shares[alignment] = bad[kept].mean()
        kept_per_cluster[alignment] = np.bincount([rows[i]["cluster"] for i in kept], minlength=30)
        scored = pq.read_table(f"{io.out}/sample/alignment.parquet").to_pylist()
        assert len(scored) == 3000 and sum(r["kept"] for r in scored) == len(kept)
    assert 0.2 < shares["none"] < 0.4  # uniform sampling keeps the crawl's noise
    assert shares["cluster_pool"] < 0.03 and shares["rank"] < 0.03
    # every alignment mode fills the same per-cluster quotas: coverage of clusters is unchanged
    for alignment in ("cluster_pool", "global_pool", "rank"):
        assert np.array_equal(kept_per_cluster[alignment], kept_per_cluster["none"])
    stats = json.loads((tmp_path / "cluster_pool" / "run" / "sample" / "stats.json").read_text())
    assert stats["alignment_kept_mean"] > stats["alignment_input_mean"]
    assert stats["alignment_kept_misaligned_share"] < stats["alignment_input_misaligned_share"]


def test_cluster_pool_draws_uniformly_from_the_better_half():
    """Unlike `rank`, which always takes the very best-aligned pairs, the pool draws at random from the
    better half, so the pick varies with the seed and keeps the cluster's variety."""
    cluster = np.zeros(100, dtype=np.int64)
    loss = np.linspace(0.0, 1.0, 100)  # row i is the i-th best aligned
    alignment = sample.alignment_scores(cluster, loss)
    eligible = sample.eligible_pairs(cluster, loss, alignment, "cluster_pool", 0.5)
    assert eligible.tolist() == [True] * 50 + [False] * 50
    picks = [np.flatnonzero(sample.choose(cluster, None, 0.2, seed, "uniform", eligible)) for seed in (0, 1)]
    assert all(len(p) == 20 and p.max() < 50 for p in picks)
    assert not np.array_equal(*picks)
    ranked = np.flatnonzero(sample.choose(cluster, -alignment, 0.2, 0, "uniform"))
    assert ranked.tolist() == list(range(20))


def _feature_rows(tmp_path, rows, features, captioner):
    """An io whose embed parts hold `features` (one shard) beside the assignments of `rows`."""
    from tldr_tasks.stages import embed

    io = _io(tmp_path, rows)
    cfg = Config()
    shard = tmp_path / "crawl" / "00000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"")
    io = StageIO(input=str(shard), out=io.out, embed_cache=str(tmp_path / "embed"), captioner=captioner)
    part = embed.EmbedPart(keys=np.array([r["key"] for r in rows]), features=features.astype(np.float16),
                           loss=np.array([r["loss"] for r in rows], dtype=np.float32),
                           reject_keys=np.zeros(0, dtype=str), reject_reasons=np.zeros(0, dtype=str), meta={})
    embed.save_part(embed.part_url(embed.parts_dir(cfg, io), str(shard)), part)
    return io


def test_semdedup_keeps_the_exact_ratio_and_drops_planted_near_duplicates(tmp_path, random_captioner):
    """200 distinct pairs and 100 planted near-copies of some of them, all in 4 clusters: at the ratio of
    the distinct ones, semdedup keeps no copy whose original it kept."""
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(200, 16))
    copies = distinct[:100] + rng.normal(scale=0.01, size=(100, 16))
    features = np.concatenate([distinct, copies])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    rows = [{"key": f"{i:04d}", "shard": "00000", "cluster": i % 4 if i < 200 else (i - 200) % 4, "distance": 0.0,
             "loss": 1.0} for i in range(300)]
    cfg = _cfg("semdedup", 0.5)
    cfg.sample.dedup_keep = "central"  # every distance is 0: ties go to the earlier key (the original)
    io = _feature_rows(tmp_path, rows, features, random_captioner)
    result = sample.run(cfg, io)
    kept = {int(r["key"]) for r in _selected(io)}
    assert len(kept) == result.metrics["kept"] == 150
    assert not any(i >= 200 for i in kept)  # every copy is more redundant than any distinct pair
    scored = pq.read_table(f"{io.out}/sample/alignment.parquet").to_pandas()
    assert (scored["redundancy"][200:] > 0.99).all() and result.metrics["semdedup_threshold"] < 0.99


def test_semdedup_reads_features_group_by_group_with_the_same_result(tmp_path, random_captioner):
    """However few features semdedup may hold at once, every pair's redundancy is the one computed with
    all features in memory; a group never splits a cluster."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    cluster = rng.integers(0, 9, 60)
    rows = [{"key": f"{i:04d}", "shard": "00000", "cluster": int(cluster[i]), "distance": float(rng.random()),
             "loss": 1.0} for i in range(60)]
    io = _feature_rows(tmp_path, rows, features, random_captioner)
    keys, stems = np.array([r["key"] for r in rows]), np.array(["00000"] * 60)
    priority = -np.array([r["distance"] for r in rows])
    expected = sample.redundancy(cluster, features.astype(np.float16), priority)
    for max_rows in (1, 7, 60):
        groups = sample.cluster_groups(cluster, max_rows)
        assert sorted(np.concatenate(groups).tolist()) == list(range(60))
        assert all(len(np.unique(cluster[g])) == 1 or len(g) <= max_rows for g in groups)
        assert sum(len(np.unique(cluster[g])) for g in groups) == len(np.unique(cluster))  # none split
        got = sample.semdedup_redundancy(Config(), io, keys, stems, cluster, priority, max_rows=max_rows)
        assert np.allclose(got, expected, atol=1e-3)
    assert len(sample.cluster_groups(cluster, 1)) == len(np.unique(cluster))


def test_redundancy_compares_only_with_higher_ranked_pairs_of_the_cluster():
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    cluster = np.array([0, 0, 0, 1])
    priority = np.array([0.0, 1.0, 0.0, 0.0])  # row 1 ranks first in cluster 0
    assert sample.redundancy(cluster, features, priority).tolist() == [1.0, -1.0, 0.0, -1.0]


def test_clip_score_keeps_the_exact_ratio_prefers_clean_pairs_and_dedups_images():
    rng = np.random.default_rng(1)
    n = 1000
    bad = rng.random(n) < 0.3
    score = np.where(bad, rng.normal(0.1, 0.05, n), rng.normal(0.3, 0.05, n))
    score[::97] = np.nan  # empty captions: never preferred
    def clip_score_keep(digest):  # clip_score's mask at ratio 0.25, score_share 0.3
        return sample.pool_keep(sample.filter_order(score, digest), sample.target_count(0.25, n), 0.3, seed=0)

    keep = clip_score_keep(None)
    assert keep.sum() == 250 and bad[keep].mean() < 0.02 and not np.isnan(score[keep]).any()
    # exact image dedup: 100 byte-identical copies of row 0, all scored best, keep one of them at most
    digest = np.array([f"d{i}" for i in range(n)])
    digest[1:101] = "d0"
    score[:101] = 0.9
    keep = clip_score_keep(digest)
    assert keep.sum() == 250 and keep[:101].sum() <= 1
    assert clip_score_keep(None)[:101].sum() > 50  # without dedup they stay


def _png(seed: int) -> bytes:
    import io as _bytes_io

    from PIL import Image

    buffer = _bytes_io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_clip_score_stage_ranks_by_the_crawls_own_similarity(tmp_path):
    """With sample.clip_model=similarity, img2dataset's `similarity` in KEY.json ranks the pairs: the kept ones
    are a seeded subset of the top score_share, and identical image bytes count once."""
    from tldr_tasks.data.shards import encode_json, write_tar

    rows, samples = [], []
    for i in range(40):
        key = f"{i:04d}"
        rows.append({"key": key, "shard": "00000", "cluster": i % 3, "distance": 0.0, "loss": 1.0})
        image = _png(0 if i >= 38 else i)  # the two best-scored pairs are copies of pair 0
        meta = encode_json({"similarity": i / 40})
        samples.append((key, {"png": image, "txt": f"caption {i}".encode(), "json": meta}))
    io = _io(tmp_path, rows)
    shard = tmp_path / "crawl" / "00000.tar"
    write_tar(str(shard), samples)
    io = StageIO(input=str(shard), out=io.out)
    cfg = _cfg("clip_score", 0.25)
    cfg.sample.clip_model = "similarity"
    result = sample.run(cfg, io)
    kept = sorted(int(r["key"]) for r in _selected(io))
    assert len(kept) == result.metrics["kept"] == 10
    assert min(kept) >= 26 and 38 not in kept and 39 not in kept  # top 12 of the 38 distinct images: 26..37
    scored = pq.read_table(f"{io.out}/sample/alignment.parquet").to_pandas()
    assert scored["clip_score"].tolist() == [i / 40 for i in range(40)]


def test_clip_score_without_a_score_says_what_to_set(tmp_path):
    from tldr_tasks.data.shards import encode_json, write_tar

    rows = [{"key": "0000", "shard": "00000", "cluster": 0, "distance": 0.0, "loss": 1.0},
            {"key": "0001", "shard": "00000", "cluster": 0, "distance": 0.0, "loss": 1.0}]
    io = _io(tmp_path, rows)
    shard = tmp_path / "crawl" / "00000.tar"
    write_tar(str(shard), [(r["key"], {"png": _png(j), "txt": b"a", "json": encode_json({})})
                           for j, r in enumerate(rows)])
    cfg = _cfg("clip_score", 0.5)
    cfg.sample.clip_model = "similarity"
    with pytest.raises(ConfigError, match="sample.clip_model"):
        sample.run(cfg, StageIO(input=str(shard), out=io.out))


def test_semdedup_with_the_cluster_pool_takes_the_better_aligned_first():
    redundancy = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.95])
    eligible = np.array([False, False, True, True, True, True])
    assert np.flatnonzero(sample.semdedup_keep(redundancy, 0.5, 0)).tolist() == [0, 1, 2]
    assert np.flatnonzero(sample.semdedup_keep(redundancy, 0.5, 0, eligible)).tolist() == [2, 3, 4]


def test_repair_keeps_what_coverage_picks_and_marks_the_misaligned_for_recaptioning(tmp_path):
    """sample.misaligned=repair: the same pairs as with no filter, and exactly the kept pairs outside the
    aligned pool carry `repair` (mostly the planted misaligned ones); drop marks none."""
    rows, bad = _planted_crawl()
    selected = {}
    for name, alignment, misaligned in (("none", "none", "drop"), ("repair", "cluster_pool", "repair"),
                                        ("drop", "cluster_pool", "drop")):
        cfg = _cfg("balanced", 0.25)
        cfg.sample.alignment, cfg.sample.misaligned = alignment, misaligned
        io = _io(tmp_path / name, rows)
        result = sample.run(cfg.validate(), io)
        selected[name] = {r["key"]: r["repair"] for r in _selected(io)}
        assert result.metrics["repair"] == sum(selected[name].values())
    assert set(selected["repair"]) == set(selected["none"])
    assert not any(selected["drop"].values())
    cluster = np.array([r["cluster"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    pool = sample.eligible_pairs(cluster, loss, sample.alignment_scores(cluster, loss), "cluster_pool", 0.5)
    marked = [int(k) for k, flag in selected["repair"].items() if flag]
    assert sorted(marked) == sorted(int(k) for k in selected["repair"] if not pool[int(k)])
    assert bad[marked].mean() > 0.5 > bad[[int(k) for k, f in selected["repair"].items() if not f]].mean()


def test_repair_without_an_aligned_pool_or_a_filter_is_refused():
    cfg = _cfg("balanced", 0.25)
    cfg.sample.misaligned = "repair"
    with pytest.raises(ConfigError, match="sample.alignment to cluster_pool or global_pool"):
        cfg.validate()
    cfg.sample.filter = "clip_score"
    cfg.validate()
    cfg.sample.clip_model = "similarity"  # the crawl's own score cannot score a new caption
    with pytest.raises(ConfigError, match="cannot score new text"):
        cfg.validate()


class _Reference:
    """A stand-in for scoring.TowerReference: scores a generated caption by the number it ends with."""

    def __init__(self):
        self.calls: list[tuple[list[int], list[str]]] = []

    def score(self, positions, texts):
        self.calls.append((list(positions), list(texts)))
        return np.array([float(t.rsplit(" ", 1)[1]) for t in texts])


def test_the_filters_repair_captions_what_it_drops_and_passes_what_then_scores_as_high(tmp_path, monkeypatch):
    """sample.misaligned=repair with sample.filter (Nguyen et al., 2023): every pair the filter drops is captioned,
    but a copy of an image (of a passing pair, or a second copy of a dropped one); the pairs whose image and new
    caption score at least the lowest passing score pass, best first after the passing ones, and are the only
    kept pairs marked `repair`."""
    from tldr_tasks.stages import caption

    n = 12
    keys = np.array([f"k{i:02d}" for i in range(n)])
    score = (n - 1 - np.arange(n)) / n  # the filter passes rows 0..5; the lowest passing score is 0.5
    digest = np.array([f"d{i}" for i in range(n)])
    digest[9], digest[11] = digest[3], digest[10]  # row 9 copies a passing image; row 11 a dropped one (row 10's)
    # what each dropped row's new caption scores: 8 above the cutoff, 6 at it, 7 and 10 below
    new_score = {8: 0.9, 6: 0.5, 7: 0.49, 10: 0.1}
    captioned: list[list[str]] = []

    def caption_rows(cfg, io, rows_keys, stems, desc):
        captioned.append(list(rows_keys))
        generated = [f"new {new_score[int(k[1:])]}" for k in rows_keys]
        return pa.table({"key": list(rows_keys), "original": ["old"] * len(rows_keys), "generated": generated,
                         "confidence": [0.0] * len(rows_keys), "grounding": [1.0] * len(rows_keys)},
                        schema=caption.CAPTION_SCHEMA)

    monkeypatch.setattr(caption, "caption_rows", caption_rows)
    cfg = _cfg("balanced", 0.5)
    cfg.sample.filter, cfg.sample.filter_share, cfg.sample.misaligned = "clip_score", 0.5, "repair"
    table = pa.table({"key": keys, "shard": ["00000"] * n})
    ev = sample.Evidence(table=table, cluster=np.zeros(n, dtype=np.int64), loss=np.ones(n), alignment=np.zeros(n),
                         score=None, pool=None, filter_rank=sample.filter_order(score, digest),
                         extra={"clip_score": score})
    io = StageIO(input=str(tmp_path / "crawl"), out=str(tmp_path / "run"))
    sample.repair_filtered(cfg, io, ev, keys, digest, _Reference())
    assert captioned == [["k06", "k07", "k08", "k10"]]  # not k09 (copies k03) nor k11 (a later copy of k10)
    assert np.flatnonzero(ev.repaired).tolist() == [6, 8] and ev.recaptioned == 4
    assert ev.filter_rank[:8].tolist() == [0, 1, 2, 3, 4, 5, 8, 6]  # the passing, then the repaired, best first
    assert ev.passing(0.5).tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    written = pq.read_table(f"{io.out}/sample/recaptioned.parquet").to_pydict()
    assert written["key"] == ["k06", "k07", "k08", "k10"] and written["clip_score_generated"] == [0.5, 0.49, 0.9, 0.1]
    keep, repair = sample.keep_mask(cfg, ev, 0.5)  # 6 of the 8 that pass
    assert keep.sum() == 6 and set(np.flatnonzero(keep)) <= {0, 1, 2, 3, 4, 5, 6, 8}
    assert np.flatnonzero(repair).tolist() == [r for r in (6, 8) if keep[r]]
    cfg.sample.misaligned = "drop"  # drop marks nothing
    assert not sample.keep_mask(cfg, ev, 0.5)[1].any()


def test_cross_fitted_losses_are_calibrated_per_fold_before_they_are_compared():
    from tldr_tasks.folds import fold_of

    keys = np.array([f"{i:07d}" for i in range(400)])
    fold = np.array([fold_of(k, 2) for k in keys])
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.5, len(keys))
    loss = np.where(fold == 1, 3.0 * base + 4.0, base)  # fold 1's captioner: harsher and more spread out
    cluster = np.zeros(len(keys), dtype=np.int64)  # one cluster: both folds' pairs compete for its pool
    raw_pool = sample.eligible_pairs(cluster, loss, sample.alignment_scores(cluster, loss), "cluster_pool", 0.5)
    assert raw_pool[fold == 1].mean() < 0.1  # uncalibrated, the harsher captioner's pairs are nearly all dropped
    calibrated = sample.calibrated_loss(loss, keys, 2)
    pool = sample.eligible_pairs(cluster, calibrated, sample.alignment_scores(cluster, calibrated), "cluster_pool",
                                 0.5)
    assert 0.4 < pool[fold == 1].mean() < 0.6 and 0.4 < pool[fold == 0].mean() < 0.6
    for f in (0, 1):  # within a fold the order is the captioner's own
        rows = fold == f
        assert (np.argsort(calibrated[rows]) == np.argsort(loss[rows])).all()
    np.testing.assert_array_equal(sample.calibrated_loss(loss, keys, 1), loss)


def test_clip_filter_then_balanced_keeps_only_passing_pairs_spread_over_clusters(tmp_path):
    """sample.filter=clip_score (here by the crawl's own similarity): only the top filter_share pass, identical
    image bytes count once, and balanced quotas are computed over the passing pairs' clusters."""
    from tldr_tasks.data.shards import encode_json, write_tar

    rows, samples = [], []
    for i in range(40):
        key = f"{i:04d}"
        cluster = 0 if i < 34 else 1 + i % 2  # two small clusters, among the best scored
        rows.append({"key": key, "shard": "00000", "cluster": cluster, "distance": 0.0, "loss": 1.0})
        image = _png(0 if i == 39 else i)  # the best-scored pair is a copy of pair 0
        samples.append((key, {"png": image, "txt": f"caption {i}".encode(),
                              "json": encode_json({"similarity": i / 40})}))
    io = _io(tmp_path, rows)
    write_tar(str(tmp_path / "crawl" / "00000.tar"), samples)
    io = StageIO(input=str(tmp_path / "crawl" / "00000.tar"), out=io.out)
    cfg = _cfg("balanced", 0.25)
    cfg.sample.filter, cfg.sample.filter_share, cfg.sample.clip_model = "clip_score", 0.5, "similarity"
    result = sample.run(cfg, io)
    kept = sorted(int(r["key"]) for r in _selected(io))
    assert len(kept) == result.metrics["kept"] == 10 and result.metrics["filter_passed"] == 20
    assert min(kept) >= 19 and 39 not in kept  # the top 20 distinct images: 19..38
    # balanced over the passing clusters: 34..38 hold clusters 1 and 2 (2 and 3 pairs), all kept; 5 of cluster 0
    assert {k for k in kept if k >= 34} == {34, 35, 36, 37, 38}


def test_filtered_semdedup_ranks_only_the_passing_pairs_and_tops_up_in_filter_order():
    """Inside a filter, SemDeDup keeps the least redundant passing pairs; a ratio above the filter's share keeps
    every passing pair, then the next ones in the filter's order."""
    n = 12
    cfg = _cfg("semdedup", 0.25)
    cfg.sample.filter, cfg.sample.filter_share = "clip_score", 0.5
    rank = np.array([11, 3, 7, 0, 5, 9, 1, 2, 4, 6, 8, 10])  # best first: the passing six are 0, 3, 5, 7, 9, 11
    redundancy = np.full(n, np.nan)
    redundancy[[0, 3, 5, 7, 9, 11]] = [0.9, 0.1, 0.8, 0.2, 0.95, 0.3]
    ev = sample.Evidence(table=None, cluster=np.zeros(n, dtype=np.int64), loss=np.ones(n), alignment=np.zeros(n),
                         score=None, pool=None, filter_rank=rank, extra={"redundancy": redundancy})
    keep, repair = sample.keep_mask(cfg, ev, 0.25)
    assert np.flatnonzero(keep).tolist() == [3, 7, 11] and not repair.any()
    keep, _ = sample.keep_mask(cfg, ev, 0.75)
    assert sorted(np.flatnonzero(keep).tolist()) == sorted(rank[:9].tolist())


@pytest.mark.parametrize("change, message", [
    ({"strategy": "hard"}, "sample.filter=clip_score runs ahead of a coverage rule"),
    ({"alignment": "cluster_pool"}, "are two alignment filters"),
    ({"filter": "agreement"}, "sample.filter"),
])
def test_filter_settings_that_cannot_work_are_refused(change, message):
    cfg = _cfg("balanced", 0.25)
    cfg.sample.filter = "clip_score"
    for key, value in change.items():
        setattr(cfg.sample, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
