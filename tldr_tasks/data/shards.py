"""Read and write img2dataset-style WebDataset shards: `KEY.jpg|png|webp` + `KEY.txt` + `KEY.json`.

The reader never extracts to disk and never raises on bad data: every sample comes out either as
a `Sample` (image decoded and normalised to RGB) or a `Rejected` with a reason, so a run can
account for every input. A shard that cannot be read at all yields one `Rejected` with key None.
"""

from __future__ import annotations

import io
import json
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
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


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


def _decode_image(data: bytes) -> tuple[Image.Image, bool]:
    """Decode and normalise to RGB. Returns (image, changed) where changed means the stored bytes
    are no longer a faithful RGB encoding (palette, alpha, CMYK, 16-bit, animation)."""
    if not data:
        raise ValueError("empty image file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            image.load()  # the first frame of an animation
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"decompression bomb: {err}") from None
    changed = image.mode != "RGB" or getattr(image, "is_animated", False)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[3])
        image = background
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, changed


def _decode_caption(data: bytes | None, meta: dict) -> str:
    if data is None:  # no KEY.txt: img2dataset also keeps the caption in KEY.json
        data = str(meta.get("caption") or "").encode("utf-8")
    text = data.decode("utf-8")  # UnicodeDecodeError -> rejected by the caller
    return " ".join(text.split())[:MAX_CAPTION_CHARS]


def _unsafe_member(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def _sample_from_parts(key: str, shard: str, parts: dict[str, bytes]) -> Sample | Rejected:
    if not KEY_PATTERN.match(key):
        return Rejected(key, shard, "key has characters outside [A-Za-z0-9_-]")
    image_ext = next((ext for ext in IMAGE_EXTS if ext in parts), None)
    if image_ext is None:
        return Rejected(key, shard, "no image (.jpg/.png/.webp) in sample")
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                meta = {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}  # metadata is optional; a broken one does not cost the sample
    try:
        caption = _decode_caption(parts.get("txt"), meta)
    except UnicodeDecodeError:
        return Rejected(key, shard, "caption is not valid UTF-8")
    try:
        image, changed = _decode_image(parts[image_ext])
    except Exception as err:  # PIL raises many types for corrupt data
        return Rejected(key, shard, f"undecodable image: {type(err).__name__}: {err}"[:300])
    image_bytes, stored_ext = parts[image_ext], ("jpg" if image_ext == "jpeg" else image_ext)
    if changed or stored_ext not in ("jpg", "png", "webp"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image_bytes, stored_ext = buffer.getvalue(), "png"
    return Sample(key, shard, image, image_bytes, stored_ext, caption, meta)


def iter_shard(url: str) -> Iterator[Sample | Rejected]:
    """Every sample of one shard, in order, as a Sample or a Rejected with its reason."""
    shard = storage.shard_stem(url)
    seen: set[str] = set()
    current_key: str | None = None
    parts: dict[str, bytes] = {}

    def finish() -> Sample | Rejected:
        if current_key in seen:
            return Rejected(current_key, shard, "duplicate key in shard")
        seen.add(current_key)
        return _sample_from_parts(current_key, shard, parts)

    try:
        with storage.filesystem(url)[0].open(storage.filesystem(url)[1], "rb") as raw:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    name = member.name
                    if _unsafe_member(name):
                        yield Rejected(posixpath.basename(name).split(".")[0] or None, shard,
                                       f"unsafe tar member path {name!r}")
                        continue
                    if not member.isfile():
                        if member.issym() or member.islnk():
                            yield Rejected(posixpath.basename(name).split(".")[0] or None, shard,
                                           "tar member is a link, not a file")
                        continue
                    base = posixpath.basename(name)
                    if "." not in base or base.startswith("."):
                        continue  # not part of a sample (e.g. a README in the tar)
                    key, ext = base.split(".", 1)
                    data = tar.extractfile(member).read()
                    if key != current_key:
                        if current_key is not None:
                            yield finish()
                        current_key, parts = key, {}
                    parts[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        if current_key is not None:  # the sample being read when the tar broke is incomplete
            yield Rejected(current_key, shard, f"shard truncated or corrupt: {err}"[:300])
            current_key = None
        yield Rejected(None, shard, f"shard unreadable after {len(seen)} samples: {type(err).__name__}: {err}"[:300])
        return
    if current_key is not None:
        yield finish()


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


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")
