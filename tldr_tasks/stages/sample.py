"""Stage `sample`: choose the keys to keep from the cluster assignments.

    tldr-vlp run sample --input 'crawl/{00000..00099}.tar' --out runs/r1 --set sample.ratio=0.25

Strategies (`sample.strategy`) set each cluster's quota, all keeping exactly round(ratio * N):
    uniform        ~ratio of every cluster (the paper's default; largest-remainder quotas)
    balanced       the same number from every cluster (capped at its size): big clusters of
                   near-duplicates give up most, rare content is kept whole
    hard           within every cluster, the highest captioner loss (empty captions, NaN loss, last)
    near_centroid  within every cluster, the smallest distance to the centroid
    far_centroid   within every cluster, the largest distance
    random         uniformly at random over all samples, ignoring clusters (the paper's baseline)
    clip_score     DataComp's baseline: optional exact image dedup (`dedup_images`), then the top
                   `score_share` of the pairs by CLIP image-text cosine (scoring.py: by default the
                   built-in pretrained-towers reference, cross-fitted on the crawl; or a CLIP folder in
                   `clip_model`; or `clip_model: similarity`, the crawl's own), then a seeded subset down
                   to the ratio
    semdedup       SemDeDup: a pair's redundancy is the highest cosine between its embedding and that of
                   a higher-ranked pair of its cluster (`dedup_keep`: the better aligned, or the nearer
                   the centroid); the least redundant are kept, which is SemDeDup with its threshold
                   set where the ratio holds (stats.json: `semdedup_threshold`). With alignment
                   `cluster_pool` (a hybrid with TL;DR's filter) the better-aligned pool goes first;
                   other alignments leave SemDeDup as it is

Alignment (`sample.alignment`) decides which pairs fill a uniform or balanced quota. Every sample's
alignment score is minus its caption loss (each cross-fitted captioner's losses standardised within its fold:
`calibrated_loss`), robustly z-scored within its cluster (`alignment_scores`):
    cluster_pool   uniformly at random from the better-aligned `aligned_share` of each cluster: drops
                   misaligned pairs while keeping the cluster's variety
    global_pool    uniformly from the better-aligned `aligned_share` of all pairs by raw loss (the
                   released code's filter; favours popular content, whose loss is lowest)
    rank           best-aligned first (fewest misaligned pairs, least variety)
    none           every pair equally likely (the paper's uniform sampling)

Misaligned pairs (`sample.misaligned`), those outside the pool of cluster_pool or global_pool, or those
sample.filter drops:
    drop           a quota takes the pool first (the rest only when the pool runs short); the filter's
                   dropped pairs are never kept (at a ratio above its share, they come next in its order)
    repair         with a pool: the quota is filled as with alignment none (coverage decides), and every
                   kept pair outside the pool is marked `repair`: it ships its generated caption where that
                   passes the gate (tldr_tasks/fusion.py).
                   With sample.filter (Nguyen et al., 2023): every pair the filter drops, but a later copy of
                   an image it passed, is captioned by its cross-fitting fold's captioner (the caption stage's
                   beams and lengths), and the pair of its image and the generated caption is scored by the
                   reference that scored the original; one that scores at least the lowest passing score
                   passes, marked `repair`, and ships that generated caption (recaptioned.parquet; the caption
                   stage reuses it). Costs a caption for every dropped pair: half the crawl at filter_share 0.5

Rows are put in key order first and ties are broken by key, so the choice depends only on the
assignments and cfg.seed. Outputs in `{out}/sample/`: selected.parquet (key, shard, cluster, loss,
alignment, repair; sorted by key), alignment.parquet (the same for every selectable sample, plus `kept`, and
clip_score's `clip_score` or semdedup's `redundancy`) and stats.json (counts: input = kept + dropped + carved;
alignment distribution of the input and of the kept set), written last as the done-marker; with the filter's
repair also recaptioned.parquet (key, original, generated, confidence, grounding, clip_score_generated: every
dropped pair it captioned) and alignment.parquet's `clip_score_generated`.

The ratio curve (`sample.curve`, always on with `sample.ratio: auto`; tldr_tasks/curve.py) first carves a
validation split from the assignments (holdout.parquet: key, shard), which no score, selection or training
sees, and scores the rule at every `sample.curve_ratios` (curve.json, curve.png); with `auto` the stage then
keeps its chosen ratio (stats.json: `ratio_chosen`). Every ratio is a share of the samples outside the split.

Memory: the assignments (keys and clusters, no features); semdedup holds the features of whole
clusters, at most SEMDEDUP_ROWS rows at a time (one pass over the embed parts per group of clusters).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tldr_tasks import curve, storage
from tldr_tasks.config import AUTO, Config, ConfigError
from tldr_tasks.contract import StageIO, StageResult, numeric

if TYPE_CHECKING:
    import pyarrow as pa

# A pair whose caption loss lies this many robust standard deviations above its cluster's median is
# counted as likely misaligned (the noise estimate in stats.json and MLflow).
MISALIGNED_Z = 2.0
SEMDEDUP_ROWS = 1 << 19  # features semdedup holds at once (256-d float16: 256 MiB)


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


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(values - median) / (1.4826 * MAD), the standard deviation standing in when the MAD is 0."""
    median = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - median))
    spread = spread if spread > 1e-6 else max(float(values.std()), 1e-6)
    return (values - median) / spread


def calibrated_loss(loss: np.ndarray, keys: np.ndarray, folds: int) -> np.ndarray:
    """Caption losses of K cross-fitted captioners on one scale: each fold's losses (all from its own captioner)
    robustly standardised within the fold, so a pair's score does not depend on which captioner happened to
    score it. One captioner (K = 1): unchanged (every later use is invariant to one shift and scale anyway)."""
    if folds <= 1:
        return loss
    from tldr_tasks.folds import fold_of

    fold = np.array([fold_of(str(k), folds) for k in keys])
    calibrated = loss.astype(np.float64)
    for f in range(folds):
        rows = np.flatnonzero((fold == f) & ~np.isnan(loss))
        if len(rows):
            calibrated[rows] = _robust_z(loss[rows].astype(np.float64))
    return calibrated


def alignment_scores(cluster: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """How well each caption fits its image, comparable across clusters: minus the captioner's
    length-normalised loss of the original caption (`calibrated_loss` across cross-fitting folds), robustly
    z-scored within the sample's cluster ((loss - median) / (1.4826 * MAD)). Higher is better aligned; an
    empty caption (NaN loss) is -inf. Raw loss also tracks popularity (the captioner knows head scenes best);
    within a cluster of look-alike images it mostly tracks whether the caption describes the image."""
    score = np.full(len(loss), -np.inf)
    for c in np.unique(cluster):
        rows = np.flatnonzero((cluster == c) & ~np.isnan(loss))
        if len(rows):
            score[rows] = -_robust_z(loss[rows].astype(np.float64))
    return score


def eligible_pairs(cluster: np.ndarray, loss: np.ndarray, alignment: np.ndarray, mode: str,
                   share: float) -> np.ndarray:
    """Which rows a cluster's quota is drawn from first (sample.alignment):
    cluster_pool  the better-aligned `share` of every cluster (by alignment score);
    global_pool   the better-aligned `share` of all pairs by raw loss (the released code's filter);
    none/rank     every row."""
    n = len(cluster)
    if mode in ("none", "rank"):
        return np.ones(n, dtype=bool)
    if mode == "global_pool":
        order = np.lexsort((np.arange(n), np.where(np.isnan(loss), np.inf, loss)))
        eligible = np.zeros(n, dtype=bool)
        eligible[order[: int(math.ceil(share * n))]] = True
        return eligible
    if mode == "cluster_pool":
        order = np.lexsort((np.arange(n), -alignment, cluster))
        grouped = cluster[order]
        rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
        sizes = np.bincount(cluster)
        eligible = np.zeros(n, dtype=bool)
        eligible[order[rank < np.ceil(share * sizes[grouped])]] = True
        return eligible
    raise ValueError(f"unknown sample.alignment {mode!r}")


def choose(cluster: np.ndarray, score: np.ndarray | None, ratio: float, seed: int, strategy: str,
           eligible: np.ndarray | None = None, total: int | None = None) -> np.ndarray:
    """Boolean mask of the rows to keep. Rows must already be in key order.

    Args:
        cluster: cluster id per row.
        score: per-row priority within a cluster, lower first (None: random order).
        ratio: share to keep; exactly target_count(ratio, n) rows are kept.
        seed: seeds the random strategies.
        strategy: one of config.STRATEGIES.
        eligible: rows each cluster's quota takes before any other (None: all); a cluster with too few
            eligible rows tops its quota up from the rest in score order, so the ratio holds exactly.
        total: rows to keep (None: target_count(ratio, n)).
    """
    n = len(cluster)
    total = target_count(ratio, n) if total is None else total
    keep = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        keep[rng.choice(n, total, replace=False)] = True
        return keep
    if score is None:
        score = rng.random(n)
    first = np.zeros(n) if eligible is None else (~eligible).astype(np.float64)
    sizes = np.bincount(cluster, minlength=int(cluster.max()) + 1 if n else 0)
    quotas = balanced_quotas(sizes, total) if strategy == "balanced" else cluster_quotas(sizes, ratio, total)
    # Cluster-major, eligible first, then score, then key position: the first quota rows are kept.
    order = np.lexsort((np.arange(n), score, first, cluster))
    grouped = cluster[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    keep[order[rank < quotas[grouped]]] = True
    return keep


def filter_order(score: np.ndarray, digest: np.ndarray | None) -> np.ndarray:
    """Row positions best first for an alignment filter: first copies of an image first (when `digest` is given;
    later copies of identical bytes last), then by score (highest first; NaN last), then by key position."""
    n = len(score)
    copy = np.zeros(n, dtype=bool)
    if digest is not None:
        _, first = np.unique(digest, return_index=True)
        copy[:] = True
        copy[first] = False
    return np.lexsort((np.arange(n), -np.nan_to_num(score, nan=-np.inf), copy))


def pool_keep(order: np.ndarray, total: int, share: float, seed: int) -> np.ndarray:
    """A seeded `total` of the first max(total, ceil(share * n)) rows of `order` (clip_score's pool)."""
    keep = np.zeros(len(order), dtype=bool)
    pool = order[: max(total, int(math.ceil(share * len(order))))]
    keep[np.random.default_rng(seed).choice(pool, total, replace=False)] = True
    return keep


def cluster_groups(cluster: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """Ascending row positions, grouped by whole clusters of at most max_rows rows in all (a bigger
    cluster makes a group alone)."""
    ids, inverse, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    group_of_cluster = np.zeros(len(ids), dtype=np.int64)
    group, filled = 0, 0
    for i, size in enumerate(sizes):
        if filled and filled + size > max_rows:
            group, filled = group + 1, 0
        group_of_cluster[i] = group
        filled += size
    row_group = group_of_cluster[inverse]
    order = np.argsort(row_group, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(row_group[order])) + 1) if len(order) else []


def gather_features(part_urls: dict[str, str], keys: np.ndarray, stems: np.ndarray, rows: np.ndarray,
                    pca=None) -> np.ndarray:
    """L2-normalised float16 features of the assignment rows `rows` (keys[rows], each from the embed part
    `part_urls[stems[row]]`), reading only the parts those rows come from."""
    from tldr_tasks.stages import embed, kmeans

    row_stems = stems[rows]
    pieces, positions = [], []
    for stem in np.unique(row_stems):
        at = np.flatnonzero(row_stems == stem)
        part = embed.load_part(part_urls[stem])
        order = np.argsort(part.keys, kind="stable")  # a key repeated in a part: its first row, as kmeans keeps
        pieces.append(part.features[order[np.searchsorted(part.keys, keys[rows[at]], sorter=order)]])
        positions.append(at)
    raw = np.concatenate(pieces)[np.argsort(np.concatenate(positions))]
    return kmeans.build_features(raw, pca)


def semdedup_redundancy(cfg: Config, io: StageIO, keys: np.ndarray, stems: np.ndarray, cluster: np.ndarray,
                        priority: np.ndarray, max_rows: int = SEMDEDUP_ROWS) -> np.ndarray:
    """`redundancy` of every row, computed group of clusters by group of clusters so that no more than
    max_rows features (or one cluster's) are in memory."""
    from tqdm import tqdm

    from tldr_tasks.stages import assign, kmeans

    shards = io.input_shards()
    part_urls = dict(zip((storage.shard_stem(s) for s in shards), kmeans.part_urls(cfg, io, shards)))
    pca = assign.load_pca(io) if cfg.embed.feature == "code_index_pca" else None
    result = np.full(len(cluster), -1.0)
    for rows in tqdm(cluster_groups(cluster, max_rows), desc="sample: semdedup", unit="group"):
        result[rows] = redundancy(cluster[rows], gather_features(part_urls, keys, stems, rows, pca), priority[rows])
    return result


def redundancy(cluster: np.ndarray, features: np.ndarray, priority: np.ndarray, block: int = 2048) -> np.ndarray:
    """SemDeDup's measure: per row, the highest cosine between its (L2-normalised) feature and that of a
    row of the same cluster that ranks higher (priority higher, then earlier key position); -1 for a
    cluster's first row."""
    n = len(cluster)
    order = np.lexsort((np.arange(n), -priority, cluster))
    starts = np.flatnonzero(np.r_[True, cluster[order][1:] != cluster[order][:-1]]) if n else np.zeros(0, int)
    result = np.full(n, -1.0)
    for start, end in zip(starts, np.r_[starts[1:], n]):
        rows = order[start:end]
        group = features[rows].astype(np.float32)
        for i in range(1, len(rows), block):  # each row against the rows ranked before it
            end_block = min(i + block, len(rows))
            cosine = group[i:end_block] @ group[:end_block].T
            before = np.arange(i, end_block)[:, None] > np.arange(end_block)[None, :]
            result[rows[i:end_block]] = np.where(before, cosine, -np.inf).max(axis=1)
    return result


def semdedup_keep(redundancy: np.ndarray, ratio: float, seed: int, eligible: np.ndarray | None = None,
                  total: int | None = None) -> np.ndarray:
    """semdedup's mask: the `total` (None: target_count) least redundant rows (ties in a seeded order), the
    `eligible` ones (sample.alignment's pool; None: all) before any other."""
    n = len(redundancy)
    first = np.zeros(n, dtype=bool) if eligible is None else ~eligible
    order = np.lexsort((np.random.default_rng(seed).random(n), redundancy, first))
    keep = np.zeros(n, dtype=bool)
    keep[order[: target_count(ratio, n) if total is None else total]] = True
    return keep


def scores(strategy: str, alignment_mode: str, loss: np.ndarray, distance: np.ndarray,
           alignment: np.ndarray) -> np.ndarray | None:
    """Lower is kept first; None keeps a seeded random order (uniform, balanced, random)."""
    if strategy == "hard":
        return np.where(np.isnan(loss), np.inf, -loss.astype(np.float64))
    if strategy == "near_centroid":
        return distance.astype(np.float64)
    if strategy == "far_centroid":
        return -distance.astype(np.float64)
    if alignment_mode == "rank":
        return -alignment
    return None


def distribution(values: np.ndarray, prefix: str, misaligned: bool = True) -> dict[str, float]:
    """Mean and quartiles of the finite values (empty captions excluded), for stats and MLflow; with
    `misaligned`, the share of alignment scores below -MISALIGNED_Z too."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {}
    q25, q50, q75 = np.percentile(finite, [25, 50, 75])
    out = {f"{prefix}_mean": float(finite.mean()), f"{prefix}_q25": float(q25), f"{prefix}_median": float(q50),
           f"{prefix}_q75": float(q75)}
    if misaligned:
        out[f"{prefix}_misaligned_share"] = float(np.mean(values < -MISALIGNED_Z))
    return out


def scoring_folds(io: StageIO) -> int:
    """The cross-fitting folds of the captioner that scored the losses (1 when there is none to read)."""
    from tldr_tasks.models.captioner import captioner_folds, is_complete

    return captioner_folds(io.captioner_dir) if is_complete(io.captioner_dir) else 1


@dataclass
class Evidence:
    """What the selection rules read, per sample in key order, computed once: nothing here depends on the ratio,
    so a selection at several ratios (a ratio curve) reuses it."""

    table: pa.Table  # the assignments: key, shard, cluster, distance, loss
    cluster: np.ndarray
    loss: np.ndarray  # calibrated across cross-fitting folds
    alignment: np.ndarray
    score: np.ndarray | None  # order within a cluster (`scores`)
    pool: np.ndarray | None  # sample.alignment's pool of better-aligned pairs
    filter_rank: np.ndarray | None  # sample.filter's rows, best first (`filter_order`; repaired rows after the passing)
    extra: dict = field(default_factory=dict)  # the rules' own evidence (clip_score, redundancy), for alignment.parquet
    repaired: np.ndarray | None = None  # rows the filter passes with their generated caption (`repair_filtered`)
    recaptioned: int = 0  # the filter's dropped pairs that `repair_filtered` captioned

    def passing(self, share: float) -> np.ndarray:
        """The rows sample.filter passes: the first ceil(share * n) of its order and the repaired rows, in key order."""
        repaired = 0 if self.repaired is None else int(self.repaired.sum())
        return np.sort(self.filter_rank[: int(math.ceil(share * len(self.cluster))) + repaired])


def load_assignments(io: StageIO) -> pa.Table:
    """The cluster stage's assignments (key, shard, cluster, distance, loss), sorted by key."""
    import pyarrow.compute as pc

    assignments = storage.join(io.cluster_dir, "assignments.parquet")
    if not storage.exists(assignments):
        raise ConfigError(f"{assignments} not found (run `tldr-vlp run cluster` with the same --out first)")
    table = storage.read_parquet(assignments, columns=["key", "shard", "cluster", "distance", "loss"])
    if table.num_rows == 0:
        raise ValueError(f"{assignments} holds no samples: every input was rejected (see "
                         f"{io.cluster_dir}/rejects.parquet)")
    return table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")]))


def evidence(cfg: Config, io: StageIO, table: pa.Table) -> Evidence:
    """Every per-sample score the configured rule needs: alignment, the pool, clip scores, SemDeDup's
    redundancy (among the pairs the filter passes, when there is a filter)."""
    import pyarrow as pa

    s = cfg.sample
    cluster = table["cluster"].to_numpy().astype(np.int64)
    keys = table["key"].to_numpy(zero_copy_only=False).astype(str)
    loss = calibrated_loss(table["loss"].to_numpy().astype(np.float64), keys, scoring_folds(io))
    alignment = alignment_scores(cluster, loss)
    distance = table["distance"].to_numpy().astype(np.float64)
    pool = (eligible_pairs(cluster, loss, alignment, s.alignment, s.aligned_share)
            if s.alignment in ("cluster_pool", "global_pool") else None)
    ev = Evidence(table, cluster, loss, alignment, scores(s.strategy, s.alignment, loss, distance, alignment), pool,
                  None)
    digest = None
    if s.clip_scored:
        from tldr_tasks import scoring

        # the filter's repair scores new captions with the heads that scored the originals
        reference = scoring.tower_reference(cfg, io, keys) if s.repairs_filter else None
        ev.extra["clip_score"], digest = ((reference.original_scores(), reference.digests) if reference
                                          else scoring.pair_scores(cfg, io, keys))
        ev.filter_rank = filter_order(ev.extra["clip_score"], digest if s.dedup_images else None)
        if reference is not None:
            repair_filtered(cfg, io, ev, keys, digest, reference)
    if s.strategy == "semdedup":
        priority = alignment if s.dedup_keep == "aligned" else -distance
        rows = ev.passing(s.filter_share) if s.filter != "none" else np.arange(len(cluster))
        stems = table["shard"].cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
        ev.extra["redundancy"] = np.full(len(cluster), np.nan)
        ev.extra["redundancy"][rows] = semdedup_redundancy(cfg, io, keys[rows], stems[rows], cluster[rows],
                                                           priority[rows])
    return ev


def repair_filtered(cfg: Config, io: StageIO, ev: Evidence, keys: np.ndarray, digest: np.ndarray, reference) -> None:
    """The filter's repair (sample.misaligned: repair with sample.filter): caption the pairs the filter drops (not
    the later copies of an image), score each image with its generated caption by `reference` (scoring.py's
    TowerReference), and pass those at or above the lowest passing score: `ev.repaired`, placed in `ev.filter_rank`
    right after the passing rows (best first). Writes recaptioned.parquet; `clip_score_generated` goes to
    alignment.parquet."""
    import pyarrow as pa

    from tldr_tasks.stages import caption

    n = len(keys)
    passed = ev.filter_rank[: int(math.ceil(cfg.sample.filter_share * n))]
    dropped = ev.filter_rank[len(passed):]
    if cfg.sample.dedup_images:
        dropped = dropped[~np.isin(digest[dropped], digest[passed])]
        _, first = np.unique(digest[dropped], return_index=True)  # one copy of an image the filter dropped
        dropped = dropped[first]
    dropped = np.sort(dropped)
    score = ev.extra["clip_score"]
    cutoff = np.nanmin(score[passed]) if np.isfinite(score[passed]).any() else np.inf
    stems = ev.table["shard"].cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    captions = caption.caption_rows(cfg, io, keys[dropped], stems[dropped], "sample: repair")
    generated = reference.score(dropped, captions["generated"].to_pylist())
    storage.write_parquet(storage.join(io.sample_dir, "recaptioned.parquet"),
                          captions.append_column("clip_score_generated", pa.array(generated, pa.float64())))
    ev.extra["clip_score_generated"] = np.full(n, np.nan)
    ev.extra["clip_score_generated"][dropped] = generated
    ev.recaptioned = len(dropped)
    ev.repaired = np.zeros(n, dtype=bool)
    ev.repaired[dropped[generated >= cutoff]] = True
    repaired = np.flatnonzero(ev.repaired)
    repaired = repaired[np.lexsort((repaired, -generated[np.searchsorted(dropped, repaired)]))]
    rest = ev.filter_rank[len(passed):]
    ev.filter_rank = np.concatenate([passed, repaired, rest[~ev.repaired[rest]]])


def coverage_keep(cfg: Config, ev: Evidence, rows: np.ndarray, total: int, seed: int) -> np.ndarray:
    """The coverage rule (sample.strategy) over the rows `rows` only, keeping `total` of them: a mask over `rows`."""
    s = cfg.sample
    # repair: coverage alone fills the quotas, and the kept pairs outside the pool are recaptioned
    eligible = ev.pool[rows] if ev.pool is not None and s.misaligned != "repair" else None
    if s.strategy == "semdedup":
        first = eligible if s.alignment == "cluster_pool" else None
        return semdedup_keep(ev.extra["redundancy"][rows], total / len(rows), seed, first, total)
    # hard, near_centroid and far_centroid order each cluster by their own score; random has no clusters
    score = ev.score[rows] if ev.score is not None else None
    return choose(ev.cluster[rows], score, total / len(rows), seed, s.strategy,
                  eligible if s.strategy in ("uniform", "balanced") else None, total)


def keep_mask(cfg: Config, ev: Evidence, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep, repair) masks of the rule at `ratio`, keeping exactly target_count(ratio, n) rows. With
    sample.filter, coverage runs inside the pairs the filter passes; when the ratio asks for more than pass,
    all of them are kept and the rest come next in the filter's order."""
    s = cfg.sample
    n = len(ev.cluster)
    total = target_count(ratio, n)
    keep = np.zeros(n, dtype=bool)
    if s.strategy == "clip_score":
        keep = pool_keep(ev.filter_rank, total, s.score_share, cfg.seed)
    elif s.filter != "none":
        rows = ev.passing(s.filter_share)
        if total >= len(rows):
            keep[ev.filter_rank[:total]] = True
        else:
            keep[rows[coverage_keep(cfg, ev, rows, total, cfg.seed)]] = True
    else:
        keep = coverage_keep(cfg, ev, np.arange(n), total, cfg.seed)
    repair = np.zeros(n, dtype=bool)
    if s.misaligned == "repair":
        repair = keep & (~ev.pool if ev.pool is not None else ev.repaired)
    return keep, repair


def carve_holdout(cfg: Config, io: StageIO, table: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """(the rows the selection chooses from, the carved validation split or None): with the ratio curve on
    (curve.py), the carved keys leave the table before any score is computed, and holdout.parquet lists them."""
    import pyarrow as pa

    if not cfg.sample.curve_on:
        return table, None
    curve.check_holdout(table.num_rows, cfg.sample)
    carved = curve.carve(table["key"].to_numpy(zero_copy_only=False).astype(str), cfg.sample)
    holdout = table.filter(pa.array(carved))
    storage.write_parquet(storage.join(io.sample_dir, "holdout.parquet"), holdout.select(["key", "shard"]))
    return table.filter(pa.array(~carved)), holdout


def run_curve(cfg: Config, io: StageIO, ev: Evidence, holdout: pa.Table) -> dict:
    """The ratio curve over the selectable rows (curve.py), written to curve.json and curve.png."""
    keys = ev.table["key"].to_numpy(zero_copy_only=False).astype(str)
    result = curve.ratio_curve(cfg, io, keys, holdout["key"].to_numpy(zero_copy_only=False).astype(str),
                               lambda ratio: keep_mask(cfg, ev, ratio)[0])
    storage.write_text_atomic(storage.join(io.sample_dir, "curve.json"), json.dumps(result, indent=1, sort_keys=True))
    curve.plot(result, storage.join(io.sample_dir, "curve.png"))
    return result


def run(cfg: Config, io: StageIO) -> StageResult:
    """Select the samples to keep; skipped when stats.json exists."""
    import time

    import pyarrow as pa

    out = io.sample_dir
    stats_url = storage.join(out, "stats.json")
    selected_url = storage.join(out, "selected.parquet")
    scores_url = storage.join(out, "alignment.parquet")
    if storage.exists(stats_url):
        return StageResult(metrics=numeric(json.loads(storage.read_text(stats_url))),
                           outputs=[selected_url, scores_url, stats_url], skipped=True)
    everything = load_assignments(io)
    table, holdout = carve_holdout(cfg, io, everything)
    n, carved = table.num_rows, everything.num_rows - table.num_rows
    s = cfg.sample
    if s.ratio != AUTO and target_count(s.ratio, n) == 0:
        raise ConfigError(f"sample.ratio={s.ratio} keeps 0 of {n} samples; raise it to at least {1.0 / max(n, 1):.4g} "
                          "(e.g. --set sample.ratio=0.25)")
    if holdout is not None and target_count(min(s.curve_ratios), n) == 0:
        raise ConfigError(f"sample.curve_ratios: {min(s.curve_ratios)} keeps 0 of the {n} samples outside the "
                          "validation split (raise it or drop it)")
    ev = evidence(cfg, io, table)
    curve_metrics, ratio = {}, s.ratio
    if holdout is not None:
        started = time.time()
        result = run_curve(cfg, io, ev, holdout)
        ratio = result.get("chosen_ratio", s.ratio)
        # in MLflow only: stats.json stays the same bytes on every run
        curve_metrics = {**curve.metrics(result), "curve_seconds": time.time() - started}
    keep, repair = keep_mask(cfg, ev, ratio)
    scored = table.select(["key", "shard", "cluster", "loss"]).append_column(
        "alignment", pa.array(ev.alignment, pa.float64())).append_column("repair", pa.array(repair)).append_column(
        "kept", pa.array(keep))
    for name, values in ev.extra.items():
        scored = scored.append_column(name, pa.array(values))
    storage.write_parquet(scores_url, scored)
    storage.write_parquet(selected_url, scored.filter(pa.array(keep)).drop_columns(["kept", *ev.extra]))
    kept = int(keep.sum())
    cluster, alignment = ev.cluster, ev.alignment
    stats = {"input": n + carved, "kept": kept, "dropped": n - kept, "ratio": s.ratio, "ratio_achieved": kept / n,
             "clusters": int(len(np.unique(cluster))), "clusters_kept": int(len(np.unique(cluster[keep]))),
             "strategy": s.strategy, "alignment": s.alignment, "aligned_share": s.aligned_share, "seed": cfg.seed,
             "misaligned": s.misaligned, "repair": int(repair.sum()), "filter": s.filter,
             **distribution(alignment, "alignment_input"), **distribution(alignment[keep], "alignment_kept")}
    if holdout is not None:  # input = kept + dropped + carved (the validation split)
        stats.update(carved=carved, ratio_chosen=ratio)
    if s.filter != "none":
        stats.update(filter_share=s.filter_share, filter_passed=len(ev.passing(s.filter_share)))
    if ev.repaired is not None:  # the filter's repair: pairs captioned, and those that then passed
        stats.update(recaptioned=ev.recaptioned, repaired=int(ev.repaired.sum()))
    if "redundancy" in ev.extra:  # the cosine above which SemDeDup dropped a pair at this ratio
        stats["semdedup_threshold"] = float(np.nanmax(ev.extra["redundancy"][keep]))
    if "clip_score" in ev.extra:
        clip_score = ev.extra["clip_score"]
        stats.update(distribution(clip_score, "clip_score_input", misaligned=False),
                     **distribution(clip_score[keep], "clip_score_kept", misaligned=False))
    storage.write_text_atomic(stats_url, json.dumps(stats, indent=2, sort_keys=True))
    return StageResult(metrics={**numeric(stats), **curve_metrics}, outputs=[selected_url, scores_url, stats_url])
