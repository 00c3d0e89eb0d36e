"""Stage `cluster`: the reduce of the fanned-out k-means assignment.

    tldr-vlp run cluster --input 'crawl/{00000..00099}.tar' --out runs/r1

`kmeans` trains the centroids on a sample, `assign` (one worker per shard group) gives every sample
its nearest centroid, one part per input shard; this stage streams the parts, in input order, into
one table and counts the samples per cluster.

Outputs in `{out}/cluster/`: assignments.parquet (key, shard, cluster, distance, loss),
centroids.npy and rejects.parquet (kmeans's), cluster_sizes.png and stats.json, which is written
last and marks the stage done.

Memory: one part and the per-cluster counts at a time, whatever the crawl's size.
"""

from __future__ import annotations

import io as _io
import json
import time

import numpy as np

from tldr_tasks import storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO, StageResult, numeric
from tldr_tasks.stages import assign


def _outputs(out: str) -> list[str]:
    return [storage.join(out, name) for name in
            ("assignments.parquet", "centroids.npy", "rejects.parquet", "cluster_sizes.png", "stats.json")]


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
    """Reduce the assign parts of the current input shards; skipped when stats.json exists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.cluster_dir
    stats_url = storage.join(out, "stats.json")
    if storage.exists(stats_url):
        return StageResult(metrics=numeric(json.loads(storage.read_text(stats_url))), outputs=_outputs(out),
                           skipped=True)
    started = time.time()
    trained = assign.trained_stats(io)
    shards = io.input_shards()
    directory = assign.model_dir(io)
    urls = [assign.part_url(directory, s) for s in shards]
    missing = [storage.shard_stem(s) for s, u in zip(shards, urls) if not storage.exists(u)]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(shards)} input shards are not assigned yet under "
                          f"{directory}: {', '.join(missing[:10])} (run `tldr-vlp run assign`, all "
                          "--shard-index workers, with the same --input and --out first)")
    k = trained["clusters"]
    sizes = np.zeros(k, dtype=np.int64)
    distance_sum = 0.0
    stems = pa.array([storage.shard_stem(s) for s in shards], pa.string())
    schema = pa.schema([("key", pa.string()), ("shard", pa.dictionary(pa.int32(), pa.string())),
                        ("cluster", pa.int32()), ("distance", pa.float32()), ("loss", pa.float32())])
    with storage.local_staging(storage.join(out, "assignments.parquet"), suffix=".parquet") as local, \
            pq.ParquetWriter(local, schema) as writer:
        for i, url in enumerate(urls):
            part = storage.read_parquet(url)
            cluster = part["cluster"].to_numpy()
            sizes += np.bincount(cluster, minlength=k)
            distance_sum += float(part["distance"].to_numpy().astype(np.float64).sum())
            shard = pa.DictionaryArray.from_arrays(pa.array(np.full(part.num_rows, i, np.int32)), stems)
            writer.write_table(part.set_column(1, "shard", shard).cast(schema))
    for name in ("centroids.npy", "rejects.parquet"):
        storage.write_bytes_atomic(storage.join(out, name), storage.read_bytes(storage.join(io.kmeans_dir, name)))
    _plot_sizes(storage.join(out, "cluster_sizes.png"), sizes, k)
    n = int(sizes.sum())
    stats = {
        **{key: v for key, v in trained.items() if not key.endswith("_s") and key != "seconds"},
        "empty_clusters": int((sizes == 0).sum()), "cluster_size_min": int(sizes.min()),
        "cluster_size_max": int(sizes.max()), "cluster_size_median": float(np.median(sizes)),
        "mean_distance": distance_sum / max(n, 1), "seconds": round(time.time() - started, 3),
    }
    storage.write_text_atomic(stats_url, json.dumps(stats, indent=2, sort_keys=True))
    return StageResult(metrics=numeric(stats), outputs=_outputs(out))
