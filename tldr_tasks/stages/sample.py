"""Stage `sample`: choose the keys to keep from the cluster assignments.

    tldr-vlp run sample --input 'crawl/{00000..00099}.tar' --out runs/r1 --set sample.ratio=0.25

Strategies (`sample.strategy`), all keeping round(ratio * N) samples:
    uniform        uniformly at random within every cluster (the paper's default); per-cluster quotas
                   by largest remainder, so each cluster keeps ~ratio of its members
    balanced       the same number from every cluster (capped at its size), uniformly at random within:
                   big clusters of near-duplicates give up most, rare content is kept whole
    hard           within every cluster, the highest captioner loss (empty captions, NaN loss, last)
    near_centroid  within every cluster, the smallest distance to the centroid
    far_centroid   within every cluster, the largest distance
    random         uniformly at random over all samples, ignoring clusters (the paper's baseline)

Rows are put in key order first and ties are broken by key, so the choice depends only on the
assignments and cfg.seed. Outputs in `{out}/sample/`: selected.parquet (key, shard, cluster; sorted
by key) and stats.json, written last as the done-marker.
"""

from __future__ import annotations

import json
import math

import numpy as np

from tldr_tasks import storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.stage_cli import stage_main
from tldr_tasks.stages.base import StageIO, StageResult


def target_count(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up (Python's round() would round 0.5 to even)."""
    return int(math.floor(ratio * n + 0.5))


def cluster_quotas(sizes: np.ndarray, ratio: float, total: int) -> np.ndarray:
    """Per-cluster counts summing to `total`: floor(ratio * size), then one more for the clusters
    with the largest remainders (ties: lower cluster id)."""
    exact = ratio * sizes.astype(np.float64)
    quotas = np.minimum(np.floor(exact).astype(np.int64), sizes)
    remaining = total - int(quotas.sum())
    if remaining > 0:
        remainder = exact - quotas
        candidates = np.flatnonzero(quotas < sizes)
        order = candidates[np.lexsort((candidates, -remainder[candidates]))]
        quotas[order[:remaining]] += 1
    return quotas


def balanced_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Water-filling: every cluster keeps min(size, cap), with the cap chosen so the counts sum to
    `total`; the few extra rows go to the lowest cluster ids among those not yet exhausted."""
    if total >= int(sizes.sum()):
        return sizes.copy()
    cap = 0
    while int(np.minimum(sizes, cap + 1).sum()) <= total:
        cap += 1
    quotas = np.minimum(sizes, cap)
    extra = total - int(quotas.sum())
    quotas[np.flatnonzero(sizes > cap)[:extra]] += 1
    return quotas


def choose(cluster: np.ndarray, score: np.ndarray | None, ratio: float, seed: int, strategy: str) -> np.ndarray:
    """Boolean mask of the rows to keep. Rows must already be in key order.

    Args:
        cluster: cluster id per row.
        score: per-row priority within a cluster, lower first (None for uniform and random).
        ratio: share to keep.
        seed: seeds the random strategies.
        strategy: one of config.STRATEGIES.
    """
    n = len(cluster)
    total = target_count(ratio, n)
    keep = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        keep[rng.choice(n, total, replace=False)] = True
        return keep
    if strategy in ("uniform", "balanced"):
        score = rng.random(n)
    sizes = np.bincount(cluster, minlength=int(cluster.max()) + 1 if n else 0)
    quotas = balanced_quotas(sizes, total) if strategy == "balanced" else cluster_quotas(sizes, ratio, total)
    # Cluster-major, then score, then key position: the first quota rows of each cluster are kept.
    order = np.lexsort((np.arange(n), score, cluster))
    grouped = cluster[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    keep[order[rank < quotas[grouped]]] = True
    return keep


def scores(strategy: str, loss: np.ndarray, distance: np.ndarray) -> np.ndarray | None:
    """Lower is kept first."""
    if strategy == "hard":
        return np.where(np.isnan(loss), np.inf, -loss.astype(np.float64))
    if strategy == "near_centroid":
        return distance.astype(np.float64)
    if strategy == "far_centroid":
        return -distance.astype(np.float64)
    return None


def _numeric(stats: dict) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run(cfg: Config, io: StageIO) -> StageResult:
    """Select the samples to keep; skipped when stats.json exists."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = io.sample_dir
    stats_url = storage.join(out, "stats.json")
    selected_url = storage.join(out, "selected.parquet")
    if storage.exists(stats_url):
        return StageResult(metrics=_numeric(json.loads(storage.read_text(stats_url))),
                           outputs=[selected_url, stats_url], skipped=True)
    assignments = storage.join(io.cluster_dir, "assignments.parquet")
    if not storage.exists(assignments):
        raise FileNotFoundError(f"{assignments} not found: run `tldr-vlp run cluster` with the same --out first")
    with storage.filesystem(assignments)[0].open(storage.filesystem(assignments)[1], "rb") as f:
        table = pq.read_table(f, columns=["key", "shard", "cluster", "distance", "loss"])
    table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")]))
    n = table.num_rows
    if n == 0:
        raise ValueError(f"{assignments} holds no samples: every input was rejected (see "
                         f"{io.cluster_dir}/rejects.parquet)")
    ratio, strategy = cfg.sample.ratio, cfg.sample.strategy
    if target_count(ratio, n) == 0:
        raise ConfigError(f"sample.ratio={ratio} keeps 0 of {n} samples; raise it to at least {1.0 / max(n, 1):.4g} "
                          "(e.g. --set sample.ratio=0.25)")
    cluster = table["cluster"].to_numpy().astype(np.int64)
    score = scores(strategy, table["loss"].to_numpy().astype(np.float64),
                   table["distance"].to_numpy().astype(np.float64))
    keep = choose(cluster, score, ratio, cfg.seed, strategy)
    selected = table.filter(pa.array(keep)).select(["key", "shard", "cluster"])
    with storage.local_staging(selected_url, suffix=".parquet") as local:
        pq.write_table(selected, local)
    kept = int(keep.sum())
    stats = {"input": n, "kept": kept, "dropped": n - kept, "ratio": ratio, "ratio_achieved": kept / n,
             "clusters": int(len(np.unique(cluster))), "clusters_kept": int(len(np.unique(cluster[keep]))),
             "strategy": strategy, "seed": cfg.seed}
    storage.write_text_atomic(stats_url, json.dumps(stats, indent=2, sort_keys=True))
    return StageResult(metrics=_numeric(stats), outputs=[selected_url, stats_url])


def main(argv=None):
    return stage_main("sample", argv)
