"""Read and write img2dataset-style WebDataset shards: `KEY.jpg|png|webp` + `KEY.txt` + `KEY.json`.

The reader never extracts to disk and never raises on bad data: every sample comes out either as
a `Sample` (image decoded and normalised to RGB) or a `Rejected` with a reason, so a run can
account for every input. A shard that cannot be read at all yields one `Rejected` with key None.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tldr_tasks import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused as decompression bombs
MAX_CAPTION_CHARS = 2000  # web captions beyond this are truncated (alt-text dumps, spam)
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # one tar member above this is refused, never read into memory
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
# An object's repr in an error message ("<_io.BytesIO object at 0x7f4b...>") differs per sample:
# a reason names the defect, so the same defect in two samples counts once.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass
class Sample:
    key: str
    shard: str  # stem of the source shard, e.g. "00012"
    image: Image.Image  # RGB
    image_bytes: bytes  # the encoded image as stored (re-encoded PNG if it had to be normalised)
    image_ext: str
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass
class Rejected:
    key: str | None  # None: the whole shard is unreadable and no samples could be counted
    shard: str
    reason: str


_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # kept byte-for-byte when already RGB


class ImageRejected(ValueError):
    """An image that cannot be used; str() is the rejection reason."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, bytes, str]:
    """Decode one encoded image and normalise it to RGB, refusing decompression bombs before decoding.

    Returns (RGB image, bytes to store, their extension): the original bytes when they already are
    an 8-bit RGB JPEG/PNG/WebP, else a PNG re-encoding (palette, alpha, CMYK, 16-bit, grayscale,
    animation, other formats). Raises ImageRejected with the reason ("empty image file",
    "decompression bomb: ...", "undecodable image: ...").
    """
    if not data:
        raise ImageRejected("empty image file")
    try:
        with warnings.catch_warnings():
            # PIL only warns below 2x its own limit; our smaller limit is checked from the header below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:  # header only: nothing has been decoded yet
                raise ImageRejected(f"decompression bomb: more than {max_pixels} pixels")
            image.load()  # the first frame of an animation
    except ImageRejected:
        raise
    except Image.DecompressionBombError:
        raise ImageRejected(f"decompression bomb: more than {max_pixels} pixels") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageRejected(_reason("undecodable image", err)) from None
    stored_ext = _STORED_FORMATS.get(image.format or "")
    sixteen_bit_png = image.format == "PNG" and len(data) > 24 and data[24] == 16  # IHDR bit depth
    keep_bytes = (stored_ext is not None and image.mode == "RGB" and not sixteen_bit_png
                  and "transparency" not in image.info and not getattr(image, "is_animated", False))
    try:
        rgb = _to_rgb(image)
    except Exception as err:
        raise ImageRejected(_reason(f"undecodable image: cannot convert mode {image.mode} to RGB", err)) from None
    if keep_bytes:
        return rgb, data, stored_ext
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return rgb, buffer.getvalue(), "png"


def _reason(what: str, err: Exception) -> str:
    """A stable rejection reason: `what: ErrorType: message`, without per-object addresses."""
    return _OBJECT_REPR.sub("", f"{what}: {type(err).__name__}: {err}")[:300]


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max() > 255 else 1.0  # 32-bit containers usually carry 16-bit data
        image = Image.fromarray(np.clip(np.rint(array / scale), 0, 255).astype(np.uint8))
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))  # transparent pixels become white
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_caption(data: bytes | None, meta: dict) -> str:
    if data is None:  # no KEY.txt: img2dataset also keeps the caption in KEY.json
        caption = meta.get("caption")
        text = caption if isinstance(caption, str) else ""
    else:
        text = data.decode("utf-8")  # UnicodeDecodeError -> rejected by the caller
    text = _CONTROL_CHARS.sub(" ", text.lstrip("\ufeff"))
    return " ".join(text.split())[:MAX_CAPTION_CHARS]


def _unsafe_member(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name or ":" in name.split("/")[0]


@dataclass
class RawSample:
    """One sample's tar members, not decoded yet: what a stream shuffles and skips cheaply."""

    key: str
    shard: str
    parts: dict[str, bytes]

    def text(self) -> tuple[str, dict, str] | Rejected:
        """(caption, meta, image extension) without decoding the image, or the Rejected the
        sample gets for its key, a missing image or a caption that is not UTF-8."""
        if not KEY_PATTERN.match(self.key):
            return Rejected(self.key, self.shard, "key has characters outside [A-Za-z0-9_-]")
        image_ext = next((ext for ext in IMAGE_EXTS if ext in self.parts), None)
        if image_ext is None:
            return Rejected(self.key, self.shard, "no image (.jpg/.png/.webp) in sample")
        meta: dict = {}
        if "json" in self.parts:
            try:
                meta = json.loads(self.parts["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                meta = {}  # metadata is optional; a broken one does not cost the sample
        try:
            return _decode_caption(self.parts.get("txt"), meta), meta, image_ext
        except UnicodeDecodeError:
            return Rejected(self.key, self.shard, "caption is not valid UTF-8")

    def decode(self) -> Sample | Rejected:
        text = self.text()
        if isinstance(text, Rejected):
            return text
        caption, meta, image_ext = text
        try:
            image, image_bytes, stored_ext = decode_image(self.parts[image_ext])
        except ImageRejected as err:
            return Rejected(self.key, self.shard, str(err))
        return Sample(self.key, self.shard, image, image_bytes, stored_ext, caption, meta)


@dataclass
class _Group:
    """The tar members of one sample, collected while streaming."""

    key: str
    parts: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def _is_compressed(head: bytes) -> bool:
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"))


def iter_shard(url: str) -> Iterator[Sample | Rejected]:
    """Every sample of one shard, in order, as a Sample or a Rejected with its reason.
    See `iter_raw_shard` for the rules; images are decoded here."""
    for item in iter_raw_shard(url):
        yield item.decode() if isinstance(item, RawSample) else item


def iter_raw_shard(url: str) -> Iterator[RawSample | Rejected]:
    """Every sample of one shard, in order, as its undecoded members or a Rejected with its reason.

    Members are grouped into samples by key (the file name up to its first dot, WebDataset's rule).
    Nothing is extracted to disk. A sample is rejected when one of its members is unsafe (absolute
    path, `..`), a link or special file, or larger than MAX_MEMBER_BYTES; when its key repeats; when
    its image is empty, undecodable or a decompression bomb, or its caption not UTF-8 (both found by
    `RawSample.decode`). When the shard breaks off (truncated or corrupt tar), the sample being read is rejected and one
    `Rejected(None, ...)` stands for whatever followed; a file that is no tar at all gives only that.
    """
    shard = storage.shard_stem(url)
    seen: set[str] = set()
    group: _Group | None = None
    count = 0

    def close(done: _Group) -> RawSample | Rejected:
        if done.key in seen:
            return Rejected(done.key, shard, "duplicate key in shard")
        seen.add(done.key)
        if done.problem:
            return Rejected(done.key, shard, done.problem)
        return RawSample(done.key, shard, done.parts)

    try:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as raw:
            compressed = _is_compressed(raw.read(6))
            raw.seek(0)
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if member.isdir():
                        continue  # nothing to read; directories are never created
                    name = member.name
                    base = posixpath.basename(name)
                    key, _, ext = base.partition(".")
                    problem = None
                    # the reason names the defect, not the member: one reason however many samples have it
                    if _unsafe_member(name):
                        problem = "unsafe tar member path (absolute or with ..)"
                    elif member.issym() or member.islnk():
                        problem = "tar member is a link, not a file"
                    elif not member.isfile():
                        problem = "tar member is not a regular file"
                    elif member.size > MAX_MEMBER_BYTES:
                        problem = f"tar member is too large (over {MAX_MEMBER_BYTES} bytes)"
                    elif not key or not ext:
                        continue  # not part of a sample (a README, a hidden file)
                    key = key or base or name
                    ext = ext.lower()
                    if group is None or key != group.key or ext in group.parts:
                        if group is not None:
                            count += 1
                            yield close(group)
                        group = _Group(key)
                    if problem:
                        group.problem = group.problem or problem
                    else:
                        group.parts[ext] = tar.extractfile(member).read()
                if not compressed:
                    # tarfile ends quietly at a cut-off or garbled header; a complete tar ends with a
                    # zero block where the next header would be.
                    raw.seek(tar.offset)
                    block = raw.read(tarfile.BLOCKSIZE)
                    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
                        raise tarfile.ReadError("no end-of-archive marker: the file is cut off or corrupt "
                                                f"at byte {tar.offset}")
    except Exception as err:  # tarfile and the decompressors raise many types (even TypeError) on bad bytes
        if group is not None:  # the sample being read when the tar broke may be incomplete
            yield Rejected(group.key, shard, f"shard truncated or corrupt: {err}"[:300])
            count += 1
            group = None
        yield Rejected(None, shard, f"shard unreadable after {count} samples "
                                    f"(later samples lost): {type(err).__name__}: {err}"[:300])
        return
    if group is not None:
        yield close(group)


class ShardWriter:
    """Write samples into numbered tar shards `{out}/{index:05d}.tar`, each published atomically.

    Use as a context manager; `write(key, {ext: bytes})` adds one sample.
    """

    def __init__(self, out_url: str, shard_size: int = 1000, start_index: int = 0):
        self.out_url = out_url
        self.shard_size = shard_size
        self.index = start_index
        self.written: list[str] = []
        self._buffer: list[tuple[str, dict[str, bytes]]] = []

    def write(self, key: str, parts: dict[str, bytes]) -> None:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"invalid sample key {key!r}")
        self._buffer.append((key, parts))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        url = storage.join(self.out_url, f"{self.index:05d}.tar")
        write_tar(url, self._buffer)
        self.written.append(url)
        self.index += 1
        self._buffer = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.flush()


def write_tar(url: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """One tar shard, members sorted per sample as WebDataset expects, fixed mtimes so the same
    samples give byte-identical shards."""
    with storage.local_staging(url, suffix=".tar") as local:
        with tarfile.open(local, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, parts in samples:
                for ext in sorted(parts):
                    data = parts[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
        os.chmod(local, 0o644)  # mkstemp makes files private; shards are meant to be shared


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


SIDECAR_FIELDS = ("url", "key", "caption", "status", "error_message", "width", "height", "original_width",
                  "original_height", "sha256")  # img2dataset's parquet columns, taken from each KEY.json


def write_crawl_shard(url: str, samples: list[tuple[str, dict[str, bytes]]], metas: list[dict]) -> None:
    """One shard as img2dataset writes it: the tar and its sidecars, whose rows come from the KEY.json metas."""
    write_tar(url, samples)
    write_sidecars(url, [{k: meta[k] for k in SIDECAR_FIELDS} for meta in metas])


def write_crawl_records(out_url: str, task: dict, stats: dict) -> None:
    """A benchmark crawl's records beside its splits: eval/task.json (the evaluation task) and crawl.json."""
    storage.write_bytes_atomic(storage.join(out_url, "eval", "task.json"),
                               json.dumps(task, indent=1, sort_keys=True).encode("utf-8"))
    storage.write_bytes_atomic(storage.join(out_url, "crawl.json"),
                               json.dumps(stats, indent=2, sort_keys=True).encode("utf-8"))


def write_sidecars(tar_url: str, rows: list[dict], extra_stats: dict | None = None) -> None:
    """The files img2dataset writes beside `NNNNN.tar`: `NNNNN.parquet` (one row per sample: key,
    caption, status, ...) and `NNNNN_stats.json` (counts per status). Deterministic for equal rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = storage.shard_stem(tar_url)
    folder = posixpath.dirname(tar_url)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes_atomic(storage.join(folder, f"{stem}.parquet"), buffer.getvalue())
    status: dict[str, int] = {}
    for row in rows:
        status[str(row.get("status", "success"))] = status.get(str(row.get("status", "success")), 0) + 1
    stats = {"count": len(rows), "successes": status.get("success", 0),
             "failed_to_download": len(rows) - status.get("success", 0), "failed_to_resize": 0,
             "status_dict": status, **(extra_stats or {})}
    storage.write_bytes_atomic(storage.join(folder, f"{stem}_stats.json"),
                               json.dumps(stats, indent=2, sort_keys=True).encode("utf-8"))
