"""Stream a crawl's shards into training batches: memory bounded by the shuffle buffers, not the crawl.

One epoch's order is a function of (seed, epoch) only, never of the number of ranks or workers,
so a 2-rank run sees the same global batches as a 1-rank run and a resumed run the same as an
uninterrupted one:

1. `index_shards` counts every shard's trainable samples once (tar bytes and captions only, no
   image is decoded) and keeps the first captions for the tokenizer.
2. The shards are permuted by (seed, epoch); their trainable samples, concatenated in that order,
   are cut into `streams` contiguous ranges of equal size (+-1). A stream reads only the shards its
   range covers.
3. Every stream goes through its own shuffle buffer of undecoded samples (seeded by seed, epoch,
   stream): resuming at step k skips k chunks without decoding them.
4. Global batch b is chunk b (batch_size / streams samples) of every stream, in stream order.
   Stream v belongs to rank v % world; a rank's streams are split in contiguous blocks over its
   DataLoader workers, which decode images and tokenise captions. `batches` puts one step's pieces back together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tldr_tasks.data.shards import RawSample, Rejected, iter_raw_shard
from tldr_tasks.folds import in_training_set
from tldr_tasks.preprocess import images_to_uint8, tokenize_captions

log = logging.getLogger(__name__)

INDEX_THREADS = 8  # shards read at once by the index pass (I/O bound: object storage latency)


def trainable_caption(item) -> str | None:
    """The caption of a sample worth training on (a readable sample with a non-empty caption)."""
    if not isinstance(item, RawSample):
        return None
    text = item.text()
    if not isinstance(text, tuple) or not text[0].strip():
        return None
    return text[0]


def training_caption(item, folds: int, holdout: int | None) -> str | None:
    """`trainable_caption`, for the captioner that holds out fold `holdout` of `folds` (None: none)."""
    caption = trainable_caption(item)
    return caption if caption is not None and in_training_set(item.key, folds, holdout) else None


@dataclass
class ShardIndex:
    urls: list[str]
    counts: list[int]  # trainable samples per shard
    folds: int = 1  # cross-fitting (tldr_tasks/folds.py): the samples of fold `holdout` are left out
    holdout: int | None = None

    def caption(self, item) -> str | None:
        """The caption of `item` when this captioner trains on it (trainable and not held out), else None."""
        return training_caption(item, self.folds, self.holdout)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        return cls(**json.loads(text))


def index_shards(urls: list[str], keep_captions: int, folds: int = 1,
                 holdout: int | None = None) -> tuple[ShardIndex, list[str]]:
    """(trainable samples per shard, the first `keep_captions` trainable captions in input order), leaving
    out the samples of fold `holdout` of `folds` (None: none left out)."""

    def scan(url: str, keep: int) -> tuple[int, list[str]]:
        count, captions = 0, []
        for item in iter_raw_shard(url):
            caption = training_caption(item, folds, holdout)
            if caption is not None:
                count += 1
                if len(captions) < keep:
                    captions.append(caption)
        return count, captions

    counts, captions = [], []
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        # A window of shards at a time: at most that many shards' captions are held at once.
        for start in range(0, len(urls), 2 * INDEX_THREADS):
            window = urls[start: start + 2 * INDEX_THREADS]
            keep = keep_captions - len(captions)
            for count, shard_captions in pool.map(scan, window, [keep] * len(window)):
                counts.append(count)
                captions.extend(shard_captions[: keep_captions - len(captions)])
    if not sum(counts):
        raise ValueError(f"no captioned samples in {len(urls)} input shard(s): check --input")
    return ShardIndex(list(urls), counts, folds, holdout), captions


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer of `size` items: each incoming item replaces a random one, which is emitted."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class TrainStream(IterableDataset):
    """One epoch of training pieces for one rank; see the module docstring for the order.

    Every item is one step's samples from the streams of one DataLoader worker: a dict with
    `step`, `keys`, `pixels` uint8 [n,3,S,S], `input_ids` and `attention_mask` [n, max_tokens+2]
    (fixed width, so pieces concatenate) and `length` (the longest caption in the piece, in tokens).

    Args:
        batch_size: the global batch; `streams` must divide it and the world size must divide `streams`.
        start_step: the first step of the epoch to yield (resuming); earlier chunks are skipped undecoded.
        drop_last: leave out the ragged tail (fewer than batch_size samples) after the last full step.
    """

    def __init__(self, index: ShardIndex, *, batch_size: int, streams: int, seed: int, epoch: int,
                 image_size: int, tokenizer, max_tokens: int, shuffle_buffer: int, rank: int = 0,
                 world: int = 1, start_step: int = 0, drop_last: bool = True):
        super().__init__()
        if batch_size % streams or streams % world:
            raise ValueError(f"{streams} streams must divide the batch size {batch_size} and be a multiple "
                             f"of the {world} ranks")
        self.index, self.batch_size, self.streams, self.seed, self.epoch = index, batch_size, streams, seed, epoch
        self.image_size, self.tokenizer, self.max_tokens = image_size, tokenizer, max_tokens
        self.shuffle_buffer, self.rank, self.world = shuffle_buffer, rank, world
        self.start_step, self.drop_last = start_step, drop_last
        self.chunk = batch_size // streams

    def steps(self) -> int:
        """Steps this epoch yields: full global batches, plus one ragged step unless drop_last."""
        full = self.index.total // self.batch_size  # = min stream length // chunk: the ranges differ by <= 1
        return full + (0 if self.drop_last or self.index.total == full * self.batch_size else 1)

    def rank_streams(self) -> list[int]:
        return list(range(self.rank, self.streams, self.world))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Contiguous blocks: the pieces of workers 0, 1, ... joined in order are the streams in order,
        # so a batch's sample order does not depend on the worker count either.
        mine = [int(v) for v in np.array_split(self.rank_streams(), workers)[worker]]
        chunks = [self._chunks(v) for v in mine]
        for step in range(self.start_step, self.steps()):
            pieces = [next(c) for c in chunks]
            samples = [s for piece in pieces for s in piece]
            yield collate(step, samples, self.image_size, self.tokenizer, self.max_tokens)

    def _chunks(self, stream: int) -> Iterator[list]:
        """Decoded chunks of one stream from start_step on; the last one holds whatever remains."""
        total = self.index.total
        begin, end = stream * total // self.streams, (stream + 1) * total // self.streams
        rng = np.random.default_rng([self.seed, self.epoch, stream])
        raw = _shuffled(self._range(begin, end), self.shuffle_buffer, rng)
        full_steps = self.index.total // self.batch_size
        for _ in range(self.start_step * self.chunk):  # resumed: skip without decoding
            next(raw, None)
        for step in range(self.start_step, self.steps()):
            take = self.chunk if step < full_steps else end - begin  # the tail: all that is left
            yield [s for s in (decode(r) for _, r in zip(range(take), raw)) if s is not None]

    def _range(self, begin: int, end: int) -> Iterator[RawSample]:
        """Trainable raw samples [begin, end) of this epoch's shard order."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.index.urls))
        offset = 0
        for i in order:
            count = self.index.counts[i]
            if offset + count <= begin:  # entirely before the range: not even opened
                offset += count
                continue
            for item in iter_raw_shard(self.index.urls[i]):
                if self.index.caption(item) is None:
                    continue
                if offset >= end:
                    return
                if offset >= begin:
                    yield item
                offset += 1
            if offset >= end:
                return


def decode(raw: RawSample):
    """The decoded Sample, or None (logged) when its pixels do not decode."""
    sample = raw.decode()
    if isinstance(sample, Rejected):
        # Members that looked fine but pixels that do not decode: rare; the step is one sample short.
        log.warning("skipping %s/%s in training: %s", raw.shard, raw.key, sample.reason)
        return None
    return sample


def collate(step: int, samples: list, image_size: int, tokenizer, max_tokens: int) -> dict:
    """One piece: see TrainStream."""
    width = max_tokens + 2
    ids = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    pixels = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    if samples:
        pixels = images_to_uint8([s.image for s in samples], image_size)
        piece_ids, piece_mask = tokenize_captions(tokenizer, [s.caption for s in samples], max_tokens)
        ids[:, : piece_ids.shape[1]], mask[:, : piece_mask.shape[1]] = piece_ids, piece_mask
    return {"step": step, "keys": [f"{s.shard}/{s.key}" for s in samples], "pixels": pixels, "input_ids": ids,
            "attention_mask": mask, "length": int(mask.sum(1).max()) if samples else 0}


def loader_workers(requested: int, dataset: TrainStream) -> int:
    """Workers that get at least one stream (more would sit idle)."""
    return min(requested, len(dataset.rank_streams()))


def batches(dataset: TrainStream, workers: int, device: torch.device) -> Iterator[dict]:
    """One rank's batches, step by step: the pieces of its workers moved to `device` and joined.

    Pieces are pinned by the DataLoader on GPU and copied without blocking; captions are trimmed to
    the step's longest from the pieces' CPU-side `length`, so nothing waits for the device.
    """
    workers = loader_workers(workers, dataset)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=cuda,
                        prefetch_factor=4 if workers else None)
    per_step = max(workers, 1)  # in-order DataLoader: worker 0, 1, ..., then worker 0 again
    pieces: list[dict] = []
    for piece in loader:
        pieces.append(piece)
        if len(pieces) < per_step:
            continue
        steps = {p["step"] for p in pieces}
        if len(steps) != 1:
            raise RuntimeError(f"loader pieces out of step: {sorted(steps)}")
        yield _join(pieces, device)
        pieces = []


def _join(pieces: list[dict], device: torch.device) -> dict:
    length = max(p["length"] for p in pieces)
    joined = {name: torch.cat([p[name].to(device, non_blocking=True) for p in pieces])
              for name in ("pixels", "input_ids", "attention_mask")}
    return {"step": pieces[0]["step"], "keys": [k for p in pieces for k in p["keys"]],
            "pixels": joined["pixels"], "input_ids": joined["input_ids"][:, :length],
            "attention_mask": joined["attention_mask"][:, :length]}


def head(index: ShardIndex, count: int, image_size: int, tokenizer, max_tokens: int) -> dict:
    """The first `count` trainable samples in input order, collated like a training piece."""
    raw = (item for url in index.urls for item in iter_raw_shard(url) if index.caption(item) is not None)
    samples = [s for s in (decode(r) for _, r in zip(range(count), raw)) if s is not None]
    piece = collate(0, samples, image_size, tokenizer, max_tokens)
    length = piece["length"]
    return {**piece, "input_ids": piece["input_ids"][:, :length], "attention_mask": piece["attention_mask"][:, :length]}
