"""Shards decoded once into local scratch files and read back by index: random access without RAM.

The evaluation trains on seeded permutations of whole arms (every sample once per epoch, no
duplicate in a batch), which needs random access; holding the decoded crawl in memory does not
scale (12 KB per 64-px image: 123 GB for 10M). A spool writes one streaming pass over the shards
to a folder: pixels as fixed-size uint8 rows, keys / captions / KEY.json as length-prefixed blobs.
In memory stay only the blob offsets (8 bytes per sample and column) and index arrays; reads are
`os.pread`s, so the page cache (not the process) holds what is hot.

    with tempfile.TemporaryDirectory() as scratch:
        split = write_spool(shard_urls, 64, scratch + "/input", desc="input")
        split.images[np.array([5, 1, 9])]   # uint8 [3, 64, 64, 3]
        split.take(range(10)).captions[3]
"""

from __future__ import annotations

import errno
import json
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

READ_ROWS = 1024  # rows per read when streaming a whole column (digests, passes over metadata)


class _File:
    """A read-only file shared by every view of one column (closed with the last of them).

    pread, not numpy.memmap: every mapped page a read touches stays in the process's resident set,
    so after one epoch the process holds the whole pixel file (benchmarks/spool_read.py)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, size: int, offset: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read from a spool file ({len(data)} of {size} bytes at {offset})")
        return data

    def read_into(self, buffer: np.ndarray, offset: int) -> None:
        """Fill `buffer` (contiguous) from `offset`: straight into the array, no intermediate bytes."""
        view = memoryview(buffer).cast("B")
        if os.preadv(self.fd, [view], offset) != len(view):
            raise OSError(f"short read from a spool file ({len(view)} bytes at {offset})")

    def __del__(self):
        os.close(self.fd)


def _compose(index: np.ndarray | None, length: int, key) -> np.ndarray:
    """Rows of the underlying file for `key` (an int array, a slice or a range) of a view."""
    rows = (np.arange(*key.indices(length)) if isinstance(key, slice)
            else np.asarray(key, dtype=np.int64).reshape(-1))
    if len(rows) and (rows.min() < -length or rows.max() >= length):
        raise IndexError(f"index out of range for {length} rows")
    rows = np.where(rows < 0, rows + length, rows)
    return rows if index is None else index[rows]


class Pixels:
    """uint8 images [N, S, S, 3] in a spool file; indexing reads them (an int: one image [S, S, 3])."""

    def __init__(self, file: _File, count: int, size: int, index: np.ndarray | None = None):
        self._file, self._count, self.size, self._index = file, count, size, index
        self._row = size * size * 3

    def __len__(self) -> int:
        return self._count if self._index is None else len(self._index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    def take(self, index) -> Pixels:
        return Pixels(self._file, self._count, self.size, _compose(self._index, len(self), index))

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = _compose(self._index, len(self), key)
        out = np.empty((len(rows), self.size, self.size, 3), dtype=np.uint8)
        if len(rows) > 1 and np.all(np.diff(rows) == 1):  # a contiguous run: one read
            self._file.read_into(out, self._row * int(rows[0]))
        else:
            for i, row in enumerate(rows):
                self._file.read_into(out[i], self._row * int(row))
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)

    def chunks(self, rows: int = READ_ROWS) -> Iterator[np.ndarray]:
        for start in range(0, len(self), rows):
            yield self[slice(start, start + rows)]


class Blobs(Sequence):
    """Strings (or JSON objects, with loads=json.loads) in a spool file, one per sample."""

    def __init__(self, file: _File, offsets: np.ndarray, index: np.ndarray | None = None,
                 loads: Callable[[str], object] | None = None):
        self._file, self._offsets, self._index, self._loads = file, offsets, index, loads

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._index is None else len(self._index)

    def take(self, index) -> Blobs:
        return Blobs(self._file, self._offsets, _compose(self._index, len(self), index), self._loads)

    def field(self, name: str, default=None) -> Blobs:
        """A view of one key of every JSON object (`default` where it is missing)."""
        parent = self._loads
        return Blobs(self._file, self._offsets, self._index, lambda text: parent(text).get(name, default))

    def _get(self, row: int):
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        text = self._file.read(end - start, start).decode("utf-8")
        return self._loads(text) if self._loads else text

    def __getitem__(self, key):
        rows = _compose(self._index, len(self), key if not isinstance(key, (int, np.integer)) else [key])
        if isinstance(key, (int, np.integer)):
            return self._get(int(rows[0]))
        return [self._get(int(r)) for r in rows]

    def __iter__(self):
        for start in range(0, len(self), READ_ROWS):
            yield from self[slice(start, start + READ_ROWS)]


@dataclass
class Split:
    """Decoded samples of one set of shards: images uint8 [N, S, S, 3] plus per-sample text and metadata,
    spooled to local files (see the module doc). `truthful`: every sample's KEY.json has a ground truth."""

    images: Pixels
    keys: Blobs
    captions: Blobs  # KEY.txt
    metas: Blobs  # KEY.json
    truthful: bool = False

    def __len__(self) -> int:
        return len(self.keys)

    def truths(self) -> Blobs | None:
        """Every sample's ground truth, or None when any sample lacks it (a real crawl)."""
        return self.metas.field("truth") if self.truthful and len(self) else None

    def take(self, index) -> Split:
        index = np.asarray(index, dtype=np.int64)  # once for every column
        return Split(self.images.take(index), self.keys.take(index), self.captions.take(index),
                     self.metas.take(index), self.truthful)


def write_spool(urls: list[str], image_size: int, folder: str, desc: str) -> Split:
    """Decode every accepted sample of `urls` into `folder`, resizing images to `image_size` square when
    needed (bicubic), and return the spooled Split. Rejected samples are skipped: materialize accounts
    for them."""
    from PIL import Image

    from tldr_tasks.data.shards import Sample, iter_shard

    os.makedirs(folder, exist_ok=True)
    names = ("keys", "captions", "metas")
    offsets = {name: array("q", [0]) for name in names}
    files = {name: open(os.path.join(folder, name), "wb") for name in ("pixels", *names)}
    count, truthful = 0, True
    try:
        for url in tqdm(urls, desc=f"read {desc}", unit="shard", leave=False):
            for item in iter_shard(url):
                if not isinstance(item, Sample):
                    continue
                image = item.image
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BICUBIC)
                files["pixels"].write(np.asarray(image, dtype=np.uint8).tobytes())
                for name, text in (("keys", item.key), ("captions", item.caption),
                                   ("metas", json.dumps(item.meta, sort_keys=True))):
                    data = text.encode("utf-8")
                    files[name].write(data)
                    offsets[name].append(offsets[name][-1] + len(data))
                truthful = truthful and isinstance(item.meta.get("truth"), dict)
                count += 1
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        used = sum(f.tell() for f in files.values()) / 2**30
        raise OSError(errno.ENOSPC, f"the scratch folder {folder} is full after {count} samples ({used:.1f} GiB, "
                      f"{image_size * image_size * 3 // 1024} KiB per image): point TMPDIR at a larger disk, or "
                      "raise the stage's scratch_gb (stage_resources) in a pod") from err
    finally:
        for f in files.values():
            f.close()
    blobs = {name: Blobs(_File(os.path.join(folder, name)), np.frombuffer(offsets[name], dtype=np.int64),
                         loads=json.loads if name == "metas" else None) for name in names}
    return Split(Pixels(_File(os.path.join(folder, "pixels")), count, image_size), blobs["keys"],
                 blobs["captions"], blobs["metas"], truthful and count > 0)
