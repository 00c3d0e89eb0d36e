"""Stage `assign`: every sample's nearest k-means centroid, one worker per shard group.

    tldr-vlp run assign --input 'crawl/{00000..00099}.tar' --out runs/r1 --shard-index 0 --num-shards 4

Each worker reads its input shards' embed parts one at a time, drops the rows `kmeans` marked as
duplicates, builds the features as `kmeans` did (pca.faiss for code_index_pca), and writes one part
per shard: `{out}/assign/{model}/{shard_stem}-{md5}.parquet` (key, shard, cluster, distance, loss),
named by the shard's content and by the trained model (`model`: a digest of centroids.npy and
pca.faiss), so a part made from another shard or another model is never reused. An existing part is
done. `cluster` reduces the parts. With one worker (`compress`) this is the single-process path; the
assignment of a row does not depend on the grouping (`tests/test_cluster.py`).

Memory: one embed part and its features at a time, whatever the crawl's size.
"""

from __future__ import annotations

import hashlib
import io as _io
import json

import numpy as np

from tldr_tasks import content, storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO, StageResult, my_parts
from tldr_tasks.stages import embed, kmeans


def model_dir(io: StageIO) -> str:
    """The folder of the parts made with the current trained model (`kmeans`'s outputs)."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in ("centroids.npy", "pca.faiss"):
        url = storage.join(io.kmeans_dir, name)
        if storage.exists(url):
            digest.update(storage.read_bytes(url))
    return storage.join(io.assign_dir, digest.hexdigest()[:12])


def part_url(directory: str, shard_url: str) -> str:
    return storage.join(directory, content.shard_id(shard_url) + ".parquet")


def trained_stats(io: StageIO) -> dict:
    """`kmeans`'s stats.json; raises saying which stage to run when it is missing."""
    stats = storage.join(io.kmeans_dir, "stats.json")
    if not storage.exists(stats):
        raise ConfigError(f"{stats} not found (run `tldr-vlp run kmeans` with the same --out first)")
    return json.loads(storage.read_text(stats))


def load_model(io: StageIO):
    """(faiss index over the centroids, PCA transform or None) that `kmeans` trained."""
    import faiss

    trained_stats(io)
    centroids = np.load(_io.BytesIO(storage.read_bytes(storage.join(io.kmeans_dir, "centroids.npy"))))
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index, load_pca(io) if storage.exists(storage.join(io.kmeans_dir, "pca.faiss")) else None


def load_pca(io: StageIO):
    """The PCA whitening `kmeans` fitted for the code_index_pca feature."""
    import faiss

    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(storage.read_bytes(storage.join(io.kmeans_dir, "pca.faiss")), np.uint8),
                               reader.data)
    return faiss.read_VectorTransform(reader)


def nearest(index, features: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and Euclidean distance to it for every row, `batch` rows at a time."""
    n = len(features)
    cluster = np.empty(n, dtype=np.int32)
    distance = np.empty(n, dtype=np.float32)
    for i in range(0, n, batch):
        squared, found = index.search(np.ascontiguousarray(features[i:i + batch], dtype=np.float32), 1)
        cluster[i:i + batch] = found[:, 0]
        distance[i:i + batch] = np.sqrt(np.maximum(squared[:, 0], 0.0))
    return cluster, distance


def assign_part(cfg: Config, part: embed.EmbedPart, drop: set[str], index, pca, stem: str):
    """The assignment table of one embed part, without the rows whose key is in `drop`."""
    import pyarrow as pa

    if len(part.features) != len(part.keys):
        raise ValueError(f"embed part of {stem} is inconsistent ({len(part.features)} features for "
                         f"{len(part.keys)} keys); delete it and rerun embed for that shard")
    keep = ~np.isin(part.keys, list(drop)) if drop else np.ones(len(part.keys), dtype=bool)
    rows = part.features[keep]
    if len(rows) and rows.shape[1] != (pca.d_in if pca is not None else index.d):
        raise ValueError(f"embed part of {stem} has {rows.shape[1]}-d features, the model "
                         f"{pca.d_in if pca is not None else index.d}-d: parts from different captioners are mixed")
    cluster, distance = nearest(index, kmeans.build_features(rows, pca), cfg.cluster.assign_batch)
    return pa.table({"key": pa.array(part.keys[keep], pa.string()),
                     "shard": pa.array([stem] * len(cluster), pa.string()), "cluster": cluster,
                     "distance": distance, "loss": part.loss[keep].astype(np.float32)})


def run(cfg: Config, io: StageIO, shard_index: int = 0, num_shards: int = 1) -> StageResult:
    """Assign this worker's input shards; shards whose part already exists are skipped."""
    from tqdm import tqdm

    shards = io.input_shards()
    mine = my_parts(shards, shard_index, num_shards)
    directory = model_dir(io)
    outputs = [part_url(directory, s) for s in mine]
    todo = [(s, u) for s, u in zip(mine, outputs) if not storage.exists(u)]
    metrics = {"samples": 0.0, "shards_done": float(len(todo)), "shards_skipped": float(len(mine) - len(todo))}
    if not todo:
        return StageResult(metrics=metrics, outputs=outputs, skipped=True)
    index, pca = load_model(io)
    duplicates: dict[str, set[str]] = {}
    for row in storage.read_parquet(storage.join(io.kmeans_dir, "duplicates.parquet")).to_pylist():
        duplicates.setdefault(row["shard"], set()).add(row["key"])
    parts = embed.parts_dir(cfg, io)
    for shard_url, url in tqdm(todo, desc="assign", unit="part"):
        stem = storage.shard_stem(shard_url)
        part = embed.load_part(embed.part_url(parts, shard_url))
        table = assign_part(cfg, part, duplicates.get(stem, set()), index, pca, stem)
        storage.write_parquet(url, table)
        metrics["samples"] += table.num_rows
    return StageResult(metrics=metrics, outputs=outputs)
