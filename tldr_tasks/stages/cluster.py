"""Stage `cluster`: k-means over the embeddings of every input shard (faiss; GPU when present).

    tldr-vlp run cluster --input 'crawl/{00000..00099}.tar' --out runs/r1 --set cluster.clusters=3000

Reads the embed parts of exactly the current input shards, drops keys repeated across shards (the
first shard in input order wins), L2-normalises the features (code_index_pca: PCA-whitened to
cluster.pca_dim first, as the released code does), trains faiss k-means on at most
clusters * max_points_per_centroid points and assigns every sample to its nearest centroid.

Outputs in `{out}/cluster/`: assignments.parquet (key, shard, cluster, distance, loss),
centroids.npy, rejects.parquet (key, shard, reason), cluster_sizes.png and stats.json, which is
written last and marks the stage done.

Memory: features stay float16 (10M x 256 -> 4.8 GiB); float32 exists only for the k-means training
sample and one assignment batch at a time.
"""

from __future__ import annotations

import io as _io
import json
import math
import time

import numpy as np

from tldr_tasks import storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.stage_cli import stage_main
from tldr_tasks.stages import embed
from tldr_tasks.stages.base import StageIO, StageResult, numeric

DUPLICATE_REASON = "duplicate key across shards"
PCA_TRAIN_POINTS = 200_000  # enough to estimate a covariance of a few hundred dims
NORMALISE_BATCH = 1 << 18  # rows converted to float32 at a time (256-d: 256 MiB)


def _outputs(out: str) -> list[str]:
    return [storage.join(out, name) for name in
            ("assignments.parquet", "centroids.npy", "rejects.parquet", "cluster_sizes.png", "stats.json")]


def _load_index(cfg: Config, io: StageIO, shards: list[str]):
    """Pass 1: keys, losses and rejects of every part (no features); duplicates across shards marked."""
    from tqdm import tqdm

    directory = embed.parts_dir(cfg, io)
    urls = [embed.part_url(directory, s) for s in shards]
    missing = [storage.shard_stem(s) for s, u in zip(shards, urls) if not storage.exists(u)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(
            f"{len(missing)} of {len(shards)} input shards are not embedded yet under {directory}: {shown} "
            "(run `tldr-vlp run embed`, all --shard-index workers, with the same --input, captioner and "
            "embed.feature first)")
    keys, losses, shard_ids, counts = [], [], [], []
    rejects: list[tuple[str | None, str, str]] = []
    for i, url in enumerate(tqdm(urls, desc="cluster: read keys", unit="part")):
        part = embed.load_part(url, features=False)
        stem = storage.shard_stem(shards[i])
        keys.append(part.keys)
        losses.append(part.loss.astype(np.float32))
        shard_ids.append(np.full(len(part.keys), i, dtype=np.int32))
        counts.append(len(part.keys))
        rejects += [(k or None, stem, r) for k, r in zip(part.reject_keys.tolist(), part.reject_reasons.tolist())]
    all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=str)
    # np.unique sorts stably when asked for indices, so each key's first occurrence (input order) wins.
    _, first = np.unique(all_keys, return_index=True)
    keep = np.zeros(len(all_keys), dtype=bool)
    keep[first] = True
    shard_id = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
    stems = [storage.shard_stem(s) for s in shards]
    for j in np.flatnonzero(~keep):
        rejects.append((str(all_keys[j]), stems[shard_id[j]], DUPLICATE_REASON))
    loss = np.concatenate(losses) if losses else np.zeros(0, np.float32)
    return urls, counts, keep, all_keys[keep], shard_id[keep], loss[keep], stems, rejects


def _l2_normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _load_features(urls: list[str], counts: list[int], keep: np.ndarray) -> np.ndarray:
    """Pass 2: the kept rows of every part into one preallocated matrix (stored dtype)."""
    from tqdm import tqdm

    n_kept = int(keep.sum())
    matrix = None
    start = offset = 0
    for url, count in zip(tqdm(urls, desc="cluster: read features", unit="part"), counts):
        part_keep = keep[start:start + count]
        start += count
        if count == 0:
            continue
        features = embed.load_part(url).features
        if len(features) != count:
            raise ValueError(f"embed part {url} is inconsistent ({len(features)} features for {count} keys); "
                             "delete it and rerun embed for that shard")
        if matrix is None:
            matrix = np.empty((n_kept, features.shape[1]), dtype=features.dtype)
        elif features.shape[1] != matrix.shape[1]:
            raise ValueError(f"embed part {url} has {features.shape[1]}-d features, others {matrix.shape[1]}-d; "
                             "parts from different captioners are mixed: delete the odd one and rerun embed")
        rows = features[part_keep]
        matrix[offset:offset + len(rows)] = rows
        offset += len(rows)
    return matrix


def load_features(cfg: Config, io: StageIO) -> tuple[np.ndarray, np.ndarray]:
    """(keys, L2-normalised float16 features) of every sample the cluster stage assigns, in its order:
    what semdedup compares inside each cluster."""
    shards = io.input_shards()
    urls, counts, keep, keys, *_ = _load_index(cfg, io, shards)
    return keys, build_features(cfg, _load_features(urls, counts, keep))


def _pca_whiten(codes: np.ndarray, pca_dim: int, seed: int) -> tuple[np.ndarray, int]:
    """The released code's feature: code-index vectors PCA-whitened to pca_dim, L2-normalised (float16)."""
    import faiss

    n, width = codes.shape
    dim = min(pca_dim, width)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, PCA_TRAIN_POINTS), replace=False))
    pca = faiss.PCAMatrix(width, dim, -0.5)
    pca.epsilon = 1e-6  # constant code positions have zero variance; avoid dividing by 0
    pca.train(np.ascontiguousarray(codes[sample], dtype=np.float32))
    out = np.empty((n, dim), dtype=np.float16)
    for i in range(0, n, NORMALISE_BATCH):
        batch = pca.apply(np.ascontiguousarray(codes[i:i + NORMALISE_BATCH], dtype=np.float32))
        out[i:i + NORMALISE_BATCH] = _l2_normalise_rows(batch)
    return out, dim


def build_features(cfg: Config, raw: np.ndarray) -> np.ndarray:
    """L2-normalised float16 features (in place for float features; code indices go through PCA)."""
    if cfg.embed.feature == "code_index_pca":
        return _pca_whiten(raw, cfg.cluster.pca_dim, cfg.seed)[0]
    features = raw if raw.dtype == np.float16 else raw.astype(np.float16)
    for i in range(0, len(features), NORMALISE_BATCH):
        features[i:i + NORMALISE_BATCH] = _l2_normalise_rows(features[i:i + NORMALISE_BATCH].astype(np.float32))
    return features


def cluster_count(cfg: Config, n: int) -> int:
    """cluster.clusters, or with 0 (the default) the rule round(8 * sqrt(kept)), kept = sample.ratio * n.
    It grows with the crawl, slower than the crawl (the full-size defaults' 8,000 at 25%: 358 clusters of ~22,
    ~6 kept each; CC3M at 25%: ~6,700, within the paper's ablated 100-10,000). The factor 8 was picked
    on validation (of 2, 8 and 16) by an earlier benchmark whose results file the three-crawl benchmark
    replaced; it was not rerun, and the gaps had no interval."""
    if cfg.cluster.clusters:
        return cfg.cluster.clusters
    return max(1, min(n, round(8 * math.sqrt(cfg.sample.ratio * n))))


def train_kmeans(cfg: Config, features: np.ndarray, k: int | None = None):
    """faiss k-means with k clusters (default cluster_count) on a seeded sample of at most
    k * max_points_per_centroid rows."""
    import faiss

    n, dim = features.shape
    k = k or cluster_count(cfg, n)
    n_train = min(n, k * cfg.cluster.max_points_per_centroid)
    if n_train < n:
        rng = np.random.default_rng(cfg.seed)
        train = np.ascontiguousarray(features[np.sort(rng.choice(n, n_train, replace=False))], dtype=np.float32)
    else:
        train = np.ascontiguousarray(features, dtype=np.float32)
    # AFK-MC2 seeding (an MCMC approximation of k-means++): faiss' default random seeding often
    # puts two centroids in one dense group and never separates them (30 of 100 toy blob sets);
    # exact k-means++ costs a sequential pass per centroid (~13 min at 768k x 256, k=3000).
    kmeans = faiss.Kmeans(dim, k, niter=cfg.cluster.niter, seed=cfg.seed,
                          max_points_per_centroid=cfg.cluster.max_points_per_centroid,
                          init_method=faiss.ClusteringInitMethod_AFK_MC2,
                          gpu=faiss.get_num_gpus() > 0, verbose=False)
    kmeans.train(train)
    return kmeans, n_train


def assign(index, features: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and Euclidean distance to it for every row, `batch` rows at a time."""
    from tqdm import tqdm

    n = len(features)
    cluster = np.empty(n, dtype=np.int32)
    distance = np.empty(n, dtype=np.float32)
    for i in tqdm(range(0, n, batch), desc="cluster: assign", unit="batch"):
        squared, nearest = index.search(np.ascontiguousarray(features[i:i + batch], dtype=np.float32), 1)
        cluster[i:i + batch] = nearest[:, 0]
        distance[i:i + batch] = np.sqrt(np.maximum(squared[:, 0], 0.0))
    return cluster, distance


def _plot_sizes(url: str, sizes: np.ndarray, k: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas by default

    ordered = np.sort(sizes)[::-1]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(np.arange(1, k + 1), ordered, drawstyle="steps-post")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("samples in cluster")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title(f"{k} clusters, {int(sizes.sum())} samples, {int((sizes == 0).sum())} empty")
    ax.grid(alpha=0.3)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    storage.write_bytes_atomic(url, buffer.getvalue())


def run(cfg: Config, io: StageIO) -> StageResult:
    """Cluster the embeddings of the current input shards; skipped when stats.json exists."""
    import pyarrow as pa

    out = io.cluster_dir
    stats_url = storage.join(out, "stats.json")
    if storage.exists(stats_url):
        return StageResult(metrics=numeric(json.loads(storage.read_text(stats_url))), outputs=_outputs(out),
                           skipped=True)
    timings: dict[str, float] = {}
    started = time.time()
    shards = io.input_shards()
    embed.check_unique_stems(shards)
    urls, counts, keep, keys, shard_id, loss, stems, rejects = _load_index(cfg, io, shards)
    n = len(keys)
    k = cluster_count(cfg, n)
    if k > n:
        raise ConfigError(f"cluster.clusters={k} but only {n} samples were embedded (after rejects and duplicate "
                          f"removal); set cluster.clusters to at most {n} "
                          f"(e.g. --set cluster.clusters={max(1, n // 25)} for ~25 samples per cluster)")
    timings["read_keys_s"] = time.time() - started

    t = time.time()
    features = build_features(cfg, _load_features(urls, counts, keep))
    timings["features_s"] = time.time() - t

    t = time.time()
    kmeans, n_train = train_kmeans(cfg, features, k)
    timings["kmeans_s"] = time.time() - t

    t = time.time()
    cluster, distance = assign(kmeans.index, features, cfg.cluster.assign_batch)
    del features
    timings["assign_s"] = time.time() - t

    t = time.time()
    shard_col = pa.DictionaryArray.from_arrays(pa.array(shard_id, pa.int32()), pa.array(stems, pa.string()))
    storage.write_parquet(storage.join(out, "assignments.parquet"), pa.table({
        "key": pa.array(keys, pa.string()), "shard": shard_col, "cluster": cluster, "distance": distance,
        "loss": loss}))
    storage.write_parquet(storage.join(out, "rejects.parquet"), pa.table({
        "key": pa.array([r[0] for r in rejects], pa.string()), "shard": pa.array([r[1] for r in rejects], pa.string()),
        "reason": pa.array([r[2] for r in rejects], pa.string())}))
    buffer = _io.BytesIO()
    np.save(buffer, np.asarray(kmeans.centroids, dtype=np.float32))
    storage.write_bytes_atomic(storage.join(out, "centroids.npy"), buffer.getvalue())
    sizes = np.bincount(cluster, minlength=k)
    _plot_sizes(storage.join(out, "cluster_sizes.png"), sizes, k)
    timings["write_s"] = time.time() - t

    duplicates = int((~keep).sum())
    stats = {
        "samples": n, "input_shards": len(shards), "rejected": len(rejects), "duplicates": duplicates,
        "rejected_by_reader": len(rejects) - duplicates, "clusters": k, "empty_clusters": int((sizes == 0).sum()),
        "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
        "cluster_size_median": float(np.median(sizes)), "feature": cfg.embed.feature,
        "dim": int(kmeans.centroids.shape[1]), "train_points": n_train,
        "kmeans_objective": float(kmeans.obj[-1]) if kmeans.obj is not None and len(kmeans.obj) else 0.0,
        "mean_distance": float(distance.mean()), "seed": cfg.seed,
        **{k_: round(v, 3) for k_, v in timings.items()}, "seconds": round(time.time() - started, 3),
    }
    storage.write_text_atomic(stats_url, json.dumps(stats, indent=2, sort_keys=True))
    return StageResult(metrics=numeric(stats), outputs=_outputs(out))


def main(argv=None):
    return stage_main("cluster", argv)
