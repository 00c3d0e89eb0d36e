"""The trust summary: did this run make the data better?

The same label-free signals for three sets of samples, so a person can judge the selection without
ground truth:

    input    every sample the cluster stage assigned (the crawl, less what it rejected)
    kept     the selection
    random   a seeded random subset of the same size: what the selection has to beat

Per set: the captioner's caption loss (nats per token, median; lower: the caption fits its image
better) and where that median sits among the input's losses (percentile); the share of likely
misaligned pairs (caption loss more than MISALIGNED_Z robust standard deviations above its cluster's
median, or an empty caption); the share of exact duplicates (image bytes identical to another sample
of the set) and of near duplicates (codebook feature cosine >= NEAR_DUPLICATE_COSINE with another
sample of the same cluster in the set); the clusters covered; and, on a crawl with ground truth
(KEY.json "truth": the benchmark crawls), the strict judge's share of noisy original captions.
`verdict` compares kept with random on the shares and the coverage.

    summary = measure(cfg, io)    # {"thresholds", "sets": {input, kept, random}, "verdict"}; None before sample
    metrics(summary)              # {"trust.kept.misaligned_share": 0.04, ...}: one MLflow metric per fact

The materialize stage writes it into the manifest (`trust`); report.html, `compare` and MLflow read it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tldr_tasks import storage
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO

MISALIGNED_Z = 2.0  # = sample.MISALIGNED_Z: the sample stage's noise estimate uses the same line
NEAR_DUPLICATE_COSINE = 0.95
SETS = ("input", "kept", "random")
# Lower is better for these shares; a difference counts only beyond two standard errors of the random
# subset's share (what another random draw of that size would vary by).
SHARES = {"misaligned_share": "likely misaligned pairs", "exact_duplicate_share": "exact duplicate images",
          "near_duplicate_share": "near-duplicate images", "noise": "noisy captions (ground truth)"}


def measure(cfg: Config, io: StageIO) -> dict | None:
    """The trust summary of the run in `io.out`: None when the sample stage wrote no scores
    (sample/alignment.parquet). Reads the input shards once (image digests, ground truth) and the
    embed parts a group of clusters at a time (near duplicates)."""
    import pyarrow as pa

    url = storage.join(io.sample_dir, "alignment.parquet")
    if not storage.exists(url):
        return None
    table = storage.read_parquet(url, columns=["key", "shard", "cluster", "loss", "alignment", "kept"])
    keys = table["key"].to_numpy(zero_copy_only=False).astype(str)
    stems = table["shard"].cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    cluster = table["cluster"].to_numpy().astype(np.int64)
    loss = table["loss"].to_numpy().astype(np.float64)
    alignment = table["alignment"].to_numpy().astype(np.float64)
    kept = table["kept"].to_numpy(zero_copy_only=False).astype(bool)
    masks = {"input": np.ones(len(keys), dtype=bool), "kept": kept,
             "random": random_subset(len(keys), int(kept.sum()), cfg.seed)}
    digest, noisy = read_input(io, keys)
    near = near_duplicates(cfg, io, keys, stems, cluster, masks)
    finite = np.sort(loss[np.isfinite(loss)])
    sets = {name: set_facts(mask, loss, finite, alignment, cluster, digest, near[name], noisy)
            for name, mask in masks.items()}
    return {"thresholds": {"misaligned_z": MISALIGNED_Z, "near_duplicate_cosine": NEAR_DUPLICATE_COSINE,
                           "random_seed": cfg.seed},
            "ground_truth": noisy is not None, "sets": sets, "verdict": verdict(sets["kept"], sets["random"])}


def random_subset(n: int, size: int, seed: int) -> np.ndarray:
    """The reference: `size` of `n` rows uniformly at random (the `random` strategy's draw at this seed)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size, replace=False)] = True
    return mask


def read_input(io: StageIO, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(sha256 of each key's image bytes, whether the strict judge finds its original caption noisy, or None
    unless every key has ground truth), in the order of `keys`; a key's first occurrence in input order
    counts, as in the cluster stage. Images are not decoded."""
    from tldr_tasks.data.shards import IMAGE_EXTS, RawSample, iter_raw_shard
    from tldr_tasks.data.truth import describes_exactly

    row = {str(k): i for i, k in enumerate(keys)}
    digest = np.full(len(keys), "", dtype=object)
    noisy = np.zeros(len(keys), dtype=bool)
    seen = np.zeros(len(keys), dtype=bool)
    truth_everywhere = True
    for url in io.input_shards():
        for item in iter_raw_shard(url):
            i = row.get(item.key) if isinstance(item, RawSample) else None
            if i is None or seen[i]:
                continue
            seen[i] = True
            ext = next((e for e in IMAGE_EXTS if e in item.parts), None)
            digest[i] = hashlib.sha256(item.parts[ext]).hexdigest() if ext else f"missing:{item.key}"
            text = item.text()
            truth = text[1].get("truth") if isinstance(text, tuple) else None
            if truth is None:
                truth_everywhere = False
            elif truth_everywhere:
                noisy[i] = not describes_exactly(text[0], truth)
    missing = ~seen
    digest[missing] = [f"missing:{k}" for k in keys[missing]]
    return digest.astype(str), noisy if truth_everywhere and seen.all() else None


def near_duplicates(cfg: Config, io: StageIO, keys: np.ndarray, stems: np.ndarray, cluster: np.ndarray,
                    masks: dict[str, np.ndarray]) -> dict[str, int]:
    """Per set, how many of its samples have a codebook feature within NEAR_DUPLICATE_COSINE of an earlier
    (key order) sample of the same cluster in the set: the copies beyond the first of each near-duplicate
    group. Features are read a group of clusters at a time, as the semdedup selection reads them."""
    from tldr_tasks.stages import assign, kmeans, sample

    shards = io.input_shards()
    part_urls = dict(zip((storage.shard_stem(s) for s in shards), kmeans.part_urls(cfg, io, shards)))
    pca = assign.load_pca(io) if cfg.embed.feature == "code_index_pca" else None
    counts = dict.fromkeys(masks, 0)
    for rows in sample.cluster_groups(cluster, sample.SEMDEDUP_ROWS):
        features = sample.gather_features(part_urls, keys, stems, rows, pca)
        for name, mask in masks.items():
            inside = mask[rows]
            if inside.any():
                cosine = sample.redundancy(cluster[rows][inside], features[inside], np.zeros(int(inside.sum())))
                counts[name] += int((cosine >= NEAR_DUPLICATE_COSINE).sum())
    return counts


def _copies(digest: np.ndarray) -> int:
    """Samples whose image bytes another sample of the set has too, beyond the first of each."""
    return len(digest) - len(np.unique(digest))


def set_facts(mask: np.ndarray, loss: np.ndarray, input_losses: np.ndarray, alignment: np.ndarray,
              cluster: np.ndarray, digest: np.ndarray, near: int, noisy: np.ndarray | None) -> dict:
    """The signals of one set (see the module docstring). `input_losses`: the input's finite losses, sorted."""
    n = int(mask.sum())
    losses = loss[mask]
    losses = losses[np.isfinite(losses)]
    median = float(np.median(losses)) if len(losses) else None
    facts = {"samples": n, "caption_loss_median": median,
             "caption_loss_percentile": (100.0 * np.searchsorted(input_losses, median, side="right")
                                         / len(input_losses) if median is not None and len(input_losses) else None),
             "misaligned_share": float(np.mean(alignment[mask] < -MISALIGNED_Z)) if n else None,
             "exact_duplicate_share": _copies(digest[mask]) / n if n else None,
             "near_duplicate_share": near / n if n else None,
             "clusters_covered": int(len(np.unique(cluster[mask]))),
             "clusters_share": len(np.unique(cluster[mask])) / max(1, len(np.unique(cluster)))}
    if noisy is not None:
        facts["noise"] = float(np.mean(noisy[mask])) if n else None
    return facts


def verdict(kept: dict, random: dict) -> dict:
    """Kept against the random subset of the same size, signal by signal: {"better": [...], "worse": [...],
    "same": [...], "no_better_than_random": bool, "text": one sentence}. A share differs when the gap is
    beyond two standard errors of the random share; coverage differs when the cluster counts do."""
    better, worse, same = [], [], []
    n = max(1, random["samples"])
    for name, label in SHARES.items():
        if kept.get(name) is None or random.get(name) is None:
            continue
        margin = 2 * np.sqrt(max(random[name] * (1 - random[name]), 1.0 / n) / n)
        gap = random[name] - kept[name]
        (better if gap > margin else worse if gap < -margin else same).append(label)
    coverage = kept["clusters_covered"] - random["clusters_covered"]
    (better if coverage > 0 else worse if coverage < 0 else same).append("clusters covered")
    if not better:
        text = ("The kept set is no better than a random subset of the same size on these signals"
                + (f" (worse on {', '.join(worse)})." if worse else "."))
    else:
        text = (f"Better than a random subset of the same size on {', '.join(better)}"
                + (f"; worse on {', '.join(worse)}" if worse else "")
                + (f"; no clear difference on {', '.join(same)}" if same else "") + ".")
    return {"better": better, "worse": worse, "same": same, "no_better_than_random": not better, "text": text}


def metrics(summary: dict | None) -> dict[str, float]:
    """One flat metric per fact: `trust.<set>.<signal>` (input, kept, random) and
    `trust.kept_no_better_than_random` (1 or 0)."""
    if not summary:
        return {}
    out = {f"trust.{name}.{fact}": float(value) for name, facts in summary["sets"].items()
           for fact, value in facts.items() if isinstance(value, (int, float)) and value is not None}
    out["trust.kept_no_better_than_random"] = float(summary["verdict"]["no_better_than_random"])
    return out
