"""Stage `embed`: every image of the crawl -> its codebook feature and the captioner's loss.

One worker per shard group (`--shard-index/--num-shards`); each input shard becomes one file
`{embed_dir}/{captioner_version}-{feature}/{shard_stem}-{md5}.npz`, written atomically, named by the
shard's content (tldr_tasks.content). An existing file means the shard is done, so the stage is
resumable and incremental: a recompression with the same captioner (and a shared `--embed-cache`)
only embeds shards whose content it has not seen; a re-landed `00000.tar` with new content is
embedded again and reported as `replaced`. Each shard's outcome (embedded, reused, replaced) is
recorded in `{out}/embed/status/{shard_stem}.json` (see `shard_status`).

    tldr-vlp run embed --input 'crawl/{00000..00099}.tar' --out runs/r1 --shard-index 0 --num-shards 4

Features (`embed.feature`):
    quantized_mean   mean of the quantised token vectors            float16 [N, D]
    code_histogram   normalised histogram of code indices           float16 [N, codebook_size]
    cls              encoder CLS token before quantisation          float16 [N, D]
    code_index_pca   the released code: raw code index per token    int16/int32 [N, T]
                     (`cluster` PCA-whitens it, it needs all data)
    tower            the pretrained image tower's pooled feature    float16 [N, 1280]
                     (ImageNet EfficientNet-Lite, as SemDeDup uses pretrained image embeddings: the captioner's
                     own tower when it has one, else the built-in clip reference's, scoring.REFERENCE_PRESET)

A captioner with a frozen image tower reads the tower's tokens from their per-shard cache
(`{embed_dir}/towers/`, written by train-captioner or here). Where a later stage reads the towers' cached
features (models/towers_clip.cached_features: the `tower` feature without a captioner tower, the built-in
clip_score reference, the ratio curve), this stage's workers compute them for their shards
(`tower_features_needed`): the towers run once per image, sharded, on the workers' GPUs.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tldr_tasks import content, storage
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO, StageResult, my_parts
from tldr_tasks.data.shards import Rejected, Sample, iter_shard


@dataclass
class EmbedPart:
    """The content of one per-shard npz file.

    Attributes:
        keys: sample keys in shard order (str array).
        features: one row per key (float16; int16/int32 code indices for code_index_pca).
        loss: the per-sample loss of the original caption under the captioner of the sample's cross-fitting
            fold, which never trained on it (float32, NaN when empty).
        reject_keys: keys of samples the reader rejected ("" when the whole shard was unreadable).
        reject_reasons: why, one per reject key.
        meta: shard, feature, captioner_version, samples, rejected (no timings: parts are reproducible).
    """

    keys: np.ndarray
    features: np.ndarray
    loss: np.ndarray
    reject_keys: np.ndarray
    reject_reasons: np.ndarray
    meta: dict


def parts_dir(cfg: Config, io: StageIO, version: str | None = None) -> str:
    """The folder of one (captioner, feature) pair's per-shard parts."""
    if version is None:
        from tldr_tasks.models.captioner import captioner_version

        version = captioner_version(io.captioner_dir)
    return storage.join(io.embed_dir, f"{version}-{cfg.embed.feature}")


def part_url(directory: str, shard_url: str) -> str:
    """The part of one shard's content: another `00000.tar` gets another part."""
    return storage.join(directory, content.shard_id(shard_url) + ".npz")


def status_url(io: StageIO, stem: str) -> str:
    # In the run folder, not the (possibly shared) embed cache: the outcome belongs to this run.
    return storage.join(io.out, "embed", "status", f"{stem}.json")


def record_status(io: StageIO, shard_url: str, status: str, replaced: list[str]) -> None:
    """Write a shard's outcome unless this run already recorded one for the same content, so a resumed
    worker does not relabel the shards its killed predecessor embedded as reused."""
    stem, digest = storage.shard_stem(shard_url), content.shard_digest(shard_url)
    url = status_url(io, stem)
    if storage.exists(url) and json.loads(storage.read_text(url)).get("digest") == digest:
        return
    storage.write_text_atomic(url, json.dumps({"shard": stem, "digest": digest, "status": status,
                                               "replaced_digests": replaced}, sort_keys=True))


def shard_status(io: StageIO) -> dict[str, dict]:
    """{stem: {"shard", "digest", "status": embedded|reused|replaced, "replaced_digests"}} of this run."""
    records = [json.loads(storage.read_text(u)) for u in storage.listdir(storage.join(io.out, "embed", "status"),
                                                                          ".json")]
    return {r["shard"]: r for r in records}


def check_unique_stems(shards: list[str]) -> None:
    """Per-shard outputs are keyed by the shard's file stem; two inputs with one stem would collide."""
    stems: dict[str, str] = {}
    for url in shards:
        stem = storage.shard_stem(url)
        if stem in stems:
            raise ValueError(f"two input shards share the name {stem!r} ({stems[stem]} and {url}); per-shard "
                             "outputs are keyed by file name: rename one or embed them in separate runs")
        stems[stem] = url


def save_part(url: str, part: EmbedPart) -> None:
    """Write one part atomically: an npz (no pickles) whose zip entries carry a fixed timestamp, so
    the same inputs give a byte-identical file (np.savez stamps the current time; DVC would see a
    changed output on every rerun)."""
    storage.write_npz(url, {"keys": np.asarray(part.keys, dtype=str), "features": part.features,
                    "loss": np.asarray(part.loss, dtype=np.float32),
                    "reject_keys": np.asarray(part.reject_keys, dtype=str),
                    "reject_reasons": np.asarray(part.reject_reasons, dtype=str),
                    "meta": np.asarray(json.dumps(part.meta, sort_keys=True))})


def load_part(url: str, features: bool = True) -> EmbedPart:
    """Read one part; `features=False` skips the (large) feature matrix without reading its bytes."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as data:  # npz members load lazily
        return EmbedPart(
            keys=data["keys"], features=data["features"] if features else np.empty((0, 0), np.float16),
            loss=data["loss"], reject_keys=data["reject_keys"], reject_reasons=data["reject_reasons"],
            meta=json.loads(str(data["meta"])))


def _batches(samples: Iterator[Sample | Rejected], size: int, rejects: list[Rejected]) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for item in samples:
        if isinstance(item, Rejected):
            rejects.append(item)
            continue
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def compute_features(encoded, feature: str, codebook_size: int, tokens=None):
    """The clustering feature of a batch of images (a torch tensor [B, ...], not yet numpy).

    Args:
        encoded: `model.encode(pixels)` of the captioner: quantized [B,T,D], codes [B,T], cls [B,D].
        feature: one of config.FEATURES.
        codebook_size: number of codes (the histogram's length).
        tokens: the pretrained image tower's tokens [B, T, C] (towers.image_tokens; token 0 is the grid's mean),
            needed by the `tower` feature.
    """
    import torch

    if feature == "tower":
        return tokens[:, 0].float()
    if feature == "quantized_mean":
        return encoded.quantized.float().mean(dim=1)
    if feature == "cls":
        return encoded.cls.float()
    if feature == "code_histogram":
        codes = encoded.codes.long()
        hist = torch.zeros(codes.shape[0], codebook_size, device=codes.device)
        hist.scatter_add_(1, codes, torch.ones_like(codes, dtype=hist.dtype))
        return hist / codes.shape[1]
    if feature == "code_index_pca":
        return encoded.codes.long()
    raise ValueError(f"unknown embed.feature {feature!r}")


def _to_storage_dtype(array: np.ndarray, feature: str, codebook_size: int) -> np.ndarray:
    if feature == "code_index_pca":
        return array.astype(np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32)
    return array.astype(np.float16)


def embed_batch(model, pixels, with_caption: list[int], ids, mask, feature: str,
                tokens=None, feature_tokens=None) -> tuple[np.ndarray, np.ndarray]:
    """(features in their storage dtype, per-sample caption loss, NaN for samples without a caption) of
    one batch; the encoder runs once for both.

    Args:
        pixels: FloatTensor [B, 3, S, S] from `image_to_tensor`.
        with_caption: the rows that have a caption; `ids` and `mask` are theirs (`tokenize_captions`).
        tokens: the captioner's frozen tower tokens of the batch, when it has a tower (else None).
        feature_tokens: the tower tokens the `tower` feature pools.
    """
    codebook_size = model.arch["codebook_size"]
    encoded = model.encode(pixels, tokens)
    features = _to_storage_dtype(compute_features(encoded, feature, codebook_size, feature_tokens).cpu().numpy(),
                                 feature, codebook_size)
    loss = np.full(len(pixels), np.nan, dtype=np.float32)
    if with_caption:
        loss[with_caption] = model.caption_loss(encoded.quantized[with_caption], ids, mask).float().cpu().numpy()
    return features, loss


def tower_features_needed(cfg: Config, arch: dict) -> bool:
    """Whether a later stage reads the towers' cached features of the built-in reference's preset: the `tower`
    feature of a captioner (architecture `arch`) without a tower, the built-in clip_score reference, the curve."""
    s = cfg.sample
    return (s.clip_scored and not s.clip_model) or s.curve_on or (cfg.embed.feature == "tower"
                                                                   and not arch.get("image_tower"))


def token_caches(model, cfg: Config, io: StageIO, device: str) -> tuple:
    """(the captioner's tower token cache or None, the `tower` feature's or None): one object when they agree;
    without a captioner tower the `tower` feature is the built-in reference's pooled feature."""
    from tldr_tasks.models import clip
    from tldr_tasks.models.towers import TokenCache
    from tldr_tasks.models.towers_clip import PooledFeatures
    from tldr_tasks.scoring import REFERENCE_PRESET

    own = (model.arch["image_tower"], model.arch["image_size"]) if model.arch.get("image_tower") else None
    captioner_cache = TokenCache(*own, io.embed_dir, device) if own else None
    if cfg.embed.feature != "tower":
        return captioner_cache, None
    if captioner_cache is not None:
        return captioner_cache, captioner_cache
    return None, PooledFeatures(clip.load_preset(REFERENCE_PRESET), io.embed_dir, device)


def _tokens(cache, stem: str, batch: list[Sample], device: str):
    return None if cache is None else cache.lookup([f"{stem}/{s.key}" for s in batch]).to(device)


def embed_shard(captioners: list, cfg: Config, shard_url: str, device: str, version: str,
                caches: tuple = (None, None)) -> EmbedPart:
    """Embed every sample of one shard (the pure core of the stage). `captioners`: [(model, tokenizer)] of
    every cross-fitting fold (`load_fold_captioners`): fold 0's gives every sample its feature (one codebook
    space), and each sample's caption loss comes from its own fold's captioner, which never trained on it.
    `caches`: `token_caches(...)`, the frozen tower tokens of the captioners and of the `tower` feature."""
    import torch
    from tqdm import tqdm

    from tldr_tasks.folds import fold_of
    from tldr_tasks.preprocess import image_to_tensor, tokenize_captions

    model, tokenizer = captioners[0]
    # The saved architecture, not cfg.captioner: a reused --captioner may differ from this run's params.
    feature, arch = cfg.embed.feature, model.arch
    codebook_size, image_size, max_tokens = arch["codebook_size"], arch["image_size"], arch["max_tokens"]
    rejects: list[Rejected] = []
    keys: list[str] = []
    features: list[np.ndarray] = []
    losses: list[np.ndarray] = []
    stem = storage.shard_stem(shard_url)
    for cache in {id(c): c for c in caches if c is not None}.values():
        cache.register([shard_url])
    with torch.inference_mode():
        for batch in tqdm(_batches(iter_shard(shard_url), cfg.embed.batch_size, rejects),
                          desc=f"embed {stem}", unit="batch", leave=False):
            pixels = image_to_tensor([s.image for s in batch], image_size).to(device)
            folds = [fold_of(s.key, len(captioners)) if s.caption.strip() else -1 for s in batch]
            with_caption = [i for i, fold in enumerate(folds) if fold == 0]
            ids = mask = None
            if with_caption:
                ids, mask = tokenize_captions(tokenizer, [batch[i].caption for i in with_caption], max_tokens)
                ids, mask = ids.to(device), mask.to(device)
            tokens, feature_tokens = (_tokens(cache, stem, batch, device) for cache in caches)
            feats, loss = embed_batch(model, pixels, with_caption, ids, mask, feature, tokens, feature_tokens)
            for fold, (fold_model, fold_tokenizer) in enumerate(captioners[1:], start=1):
                rows = [i for i, f in enumerate(folds) if f == fold]
                if rows:
                    ids, mask = tokenize_captions(fold_tokenizer, [batch[i].caption for i in rows], max_tokens)
                    loss[rows] = fold_model.per_sample_loss(
                        pixels[rows], ids.to(device), mask.to(device),
                        None if tokens is None else tokens[rows]).float().cpu().numpy()
            features.append(feats)
            losses.append(loss)
            keys += [s.key for s in batch]
    if features:
        matrix = np.concatenate(features)
    else:  # a shard with nothing readable still gets a part, so it counts as done
        width = codebook_size if feature == "code_histogram" else 0
        matrix = _to_storage_dtype(np.zeros((0, width)), feature, codebook_size)
    # No timings in the part: it is a pure function of (shard, captioner, feature).
    meta = {"shard": stem, "feature": feature, "captioner_version": version, "samples": len(keys),
            "rejected": len(rejects)}
    return EmbedPart(keys=np.asarray(keys, dtype=str), features=matrix,
                     loss=np.concatenate(losses) if losses else np.zeros(0, np.float32),
                     reject_keys=np.asarray([r.key or "" for r in rejects], dtype=str),
                     reject_reasons=np.asarray([r.reason for r in rejects], dtype=str), meta=meta)


def run(cfg: Config, io: StageIO, shard_index: int = 0, num_shards: int = 1) -> StageResult:
    """Embed this worker's input shards; shards whose part already exists are reused."""
    import torch

    from tldr_tasks.models.captioner import captioner_arch, captioner_version, load_fold_captioners

    shards = io.input_shards()
    check_unique_stems(shards)
    mine = my_parts(shards, shard_index, num_shards)
    version = captioner_version(io.captioner_dir)
    directory = parts_dir(cfg, io, version)
    cached = {posixpath.basename(u) for u in storage.listdir(directory, ".npz")}
    todo = []
    replaced = 0
    for shard_url in mine:
        name = posixpath.basename(part_url(directory, shard_url))
        # Parts of earlier content under the same file name: `{stem}-{md5}.npz` with another md5.
        older = sorted(n.removesuffix(".npz").rsplit("-", 1)[1] for n in cached
                       if n != name and n.rsplit("-", 1)[0] == storage.shard_stem(shard_url))
        status = "reused" if name in cached else ("replaced" if older else "embedded")
        record_status(io, shard_url, status, older)
        if status != "reused":
            todo.append(shard_url)
            replaced += status == "replaced"
    metrics = {"samples": 0.0, "rejected": 0.0, "shards_embedded": float(len(todo)),
               "shards_reused": float(len(mine) - len(todo)), "shards_replaced": float(replaced),
               "images_per_s": 0.0}
    outputs = [part_url(directory, s) for s in mine]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tower_features_needed(cfg, captioner_arch(io.captioner_dir)):
        from tldr_tasks.models import clip
        from tldr_tasks.models.towers_clip import ensure_features
        from tldr_tasks.scoring import REFERENCE_PRESET

        metrics["tower_feature_shards"] = float(ensure_features(mine, clip.load_preset(REFERENCE_PRESET),
                                                                io.embed_dir, device))
    if not todo:
        return StageResult(metrics=metrics, outputs=outputs, skipped=True)
    captioners = load_fold_captioners(io.captioner_dir, device=device)
    caches = token_caches(captioners[0][0], cfg, io, device)
    started = time.time()
    for shard_url in todo:
        part = embed_shard(captioners, cfg, shard_url, device, version, caches)
        save_part(part_url(directory, shard_url), part)
        metrics["samples"] += part.meta["samples"]
        metrics["rejected"] += part.meta["rejected"]
    elapsed = max(time.time() - started, 1e-9)
    metrics["images_per_s"] = round(metrics["samples"] / elapsed, 2)
    return StageResult(metrics=metrics, outputs=outputs)
