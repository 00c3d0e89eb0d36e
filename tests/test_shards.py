"""Shard reader/writer, and the reader on bad input (issue "Bad input corpus"): every sample comes out
as a Sample or a Rejected with its reason, nothing is written to disk, bombs are refused fast."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tldr_tasks.data import shards
from tldr_tasks.data.shards import (
    MAX_CAPTION_CHARS,
    ImageRejected,
    Rejected,
    Sample,
    ShardWriter,
    decode_image,
    encode_json,
    iter_shard,
    write_sidecars,
    write_tar,
)

RED = (200, 20, 20)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(colour=RED, size=(8, 8), mode="RGB") -> bytes:
    return encode(Image.new(mode, size, colour))


def make_tar(path: Path, members: list) -> str:
    """members: (name, bytes) for files, or a ready TarInfo (links, odd types) as (TarInfo, None)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(key: str, image: bytes = b"", caption: bytes | None = b"a caption", ext: str = "png",
                   meta: dict | None = None) -> list:
    members = [(f"{key}.{ext}", image or png())]
    if meta is not None:
        members.append((f"{key}.json", encode_json(meta)))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    return members


def read(url: str) -> tuple[list[Sample], list[Rejected]]:
    items = list(iter_shard(url))
    kept = [i for i in items if isinstance(i, Sample)]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert len(kept) + len(rejected) == len(items)
    return kept, rejected


def one(url: str):
    """The single outcome of a one-sample shard."""
    items = list(iter_shard(url))
    assert len(items) == 1, items
    return items[0]


# ------------------------------------------------------------------------------------------ good input


def test_round_trip_keeps_rgb_bytes_and_order(tmp_path):
    jpg = encode(Image.new("RGB", (16, 16), RED), "JPEG", quality=90)
    webp = encode(Image.new("RGB", (16, 16), RED), "WEBP")
    with ShardWriter(str(tmp_path / "out"), shard_size=2) as writer:
        writer.write("k0", {"png": png(), "txt": b"zero", "json": encode_json({"url": "u0"})})
        writer.write("k1", {"jpg": jpg, "txt": b"one"})
        writer.write("k2", {"webp": webp, "txt": "caf\u00e9".encode()})
    assert [Path(u).name for u in writer.written] == ["00000.tar", "00001.tar"]
    assert oct(os.stat(writer.written[0]).st_mode & 0o777) == "0o644"
    kept, rejected = read(writer.written[0])
    kept += read(writer.written[1])[0]
    assert not rejected
    assert [(s.key, s.shard, s.caption, s.image_ext) for s in kept] == [
        ("k0", "00000", "zero", "png"), ("k1", "00000", "one", "jpg"), ("k2", "00001", "caf\u00e9", "webp")]
    assert kept[1].image_bytes == jpg and kept[2].image_bytes == webp  # stored as they were
    assert kept[0].meta == {"url": "u0"} and kept[0].image.getpixel((0, 0)) == RED


def test_write_tar_is_byte_identical_for_equal_samples(tmp_path):
    samples = [("a", {"png": png(), "txt": b"x"}), ("b", {"png": png((1, 2, 3)), "txt": b"y"})]
    write_tar(str(tmp_path / "1.tar"), samples)
    write_tar(str(tmp_path / "2.tar"), samples)
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()


def test_write_sidecars(tmp_path):
    rows = [{"key": "0001", "caption": "a", "status": "success"}, {"key": "0002", "caption": "", "status": "failed"}]
    write_sidecars(str(tmp_path / "00003.tar"), rows)
    assert pq.read_table(tmp_path / "00003.parquet").to_pylist() == rows
    stats = json.loads((tmp_path / "00003_stats.json").read_text())
    assert stats["count"] == 2 and stats["successes"] == 1 and stats["status_dict"] == {"success": 1, "failed": 1}


def test_gzipped_shard_reads(tmp_path):
    plain = make_tar(tmp_path / "p.tar", sample_members("a") + sample_members("b"))
    (tmp_path / "z.tar").write_bytes(gzip.compress(Path(plain).read_bytes(), mtime=0))
    kept, rejected = read(str(tmp_path / "z.tar"))
    assert [s.key for s in kept] == ["a", "b"] and not rejected


# ------------------------------------------------------------------------------------------ broken tars


def _five_sample_tar(tmp_path: Path) -> tuple[bytes, dict[str, int]]:
    members = []
    for k in range(5):
        members += sample_members(f"s{k}", image=png(size=(24, 24)))
    data = Path(make_tar(tmp_path / "full.tar", members)).read_bytes()
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            offsets[m.name] = m.offset
            offsets[m.name + ":data"] = m.offset_data
    return data, offsets


@pytest.mark.parametrize("where", ["mid_data", "member_boundary", "mid_header", "garbage_header"])
def test_truncated_or_corrupt_tar(tmp_path, where):
    data, offsets = _five_sample_tar(tmp_path)
    if where == "mid_data":  # cut inside s2's image
        broken = data[: offsets["s2.png:data"] + 100]
    elif where == "member_boundary":  # cut right before s3's header: tarfile alone would stop quietly
        broken = data[: offsets["s3.png"]]
    elif where == "mid_header":
        broken = data[: offsets["s3.png"] + 200]
    else:  # s3's header overwritten with garbage
        broken = data[: offsets["s3.png"]] + b"\x07" * 512 + data[offsets["s3.png"] + 512:]
    (tmp_path / "broken.tar").write_bytes(broken)
    kept, rejected = read(str(tmp_path / "broken.tar"))
    assert [s.key for s in kept] == ["s0", "s1"]
    assert [r.key for r in rejected] == ["s2", None]  # s2 may be incomplete; None stands for what followed
    assert rejected[0].reason.startswith("shard truncated or corrupt")
    assert rejected[1].reason.startswith("shard unreadable after 3 samples (later samples lost)")
    assert {r.shard for r in rejected} == {"broken"}


def test_complete_tar_has_no_rejects(tmp_path):
    data, _ = _five_sample_tar(tmp_path)
    kept, rejected = read(str(tmp_path / "full.tar"))
    assert [s.key for s in kept] == ["s0", "s1", "s2", "s3", "s4"] and not rejected


@pytest.mark.parametrize("content", [b"", b"this is not a tar file at all" * 50, "png", b"\x1f\x8b\x08garbage"])
def test_not_a_tar_gives_one_shard_reject(tmp_path, content):
    (tmp_path / "00007.tar").write_bytes(png() if content == "png" else content)
    items = list(iter_shard(str(tmp_path / "00007.tar")))
    assert len(items) == 1 and isinstance(items[0], Rejected)
    assert items[0].key is None and items[0].shard == "00007"
    assert items[0].reason.startswith("shard unreadable after 0 samples")


def test_missing_shard_file_gives_one_shard_reject(tmp_path):
    items = list(iter_shard(str(tmp_path / "nope.tar")))
    assert len(items) == 1 and items[0].key is None and "FileNotFoundError" in items[0].reason


# ------------------------------------------------------------------------------------------ bad images


def test_member_named_jpg_that_is_not_an_image(tmp_path):
    url = make_tar(tmp_path / "s.tar", sample_members("a", image=b"<html>404 not found</html>", ext="jpg")
                   + sample_members("b"))
    kept, rejected = read(url)
    assert [s.key for s in kept] == ["b"]
    assert [r.key for r in rejected] == ["a"]
    assert rejected[0].reason.startswith("undecodable image: UnidentifiedImageError")


def test_the_same_defect_gives_the_same_reason(tmp_path):
    """Reasons are counted per reason: two samples with the same defect give one reason, with no
    per-object memory address in it."""
    url = make_tar(tmp_path / "s.tar", sample_members("a", image=b"not an image", ext="jpg")
                   + sample_members("b", image=b"neither is this", ext="jpg"))
    kept, rejected = read(url)
    assert not kept and [r.key for r in rejected] == ["a", "b"]
    assert {r.reason for r in rejected} == {"undecodable image: UnidentifiedImageError: cannot identify image file"}


def test_zero_byte_image(tmp_path):
    url = make_tar(tmp_path / "s.tar", [("a.jpg", b""), ("a.txt", b"x")] + sample_members("b"))
    kept, rejected = read(url)
    assert [s.key for s in kept] == ["b"]
    assert [(r.key, r.reason) for r in rejected] == [("a", "empty image file")]


def test_truncated_image_data(tmp_path):
    jpg = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    result = one(make_tar(tmp_path / "s.tar", sample_members("a", image=jpg[: len(jpg) // 2], ext="jpg")))
    assert isinstance(result, Rejected) and result.reason.startswith("undecodable image: OSError")


def _png_header_only(width: int, height: int) -> bytes:
    """A ~70-byte PNG that claims width x height RGB pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [40000, 9000])  # 9000^2 is under PIL's own limit but over ours
def test_decompression_bomb_rejected_without_allocating(tmp_path, side):
    """The header check's time is measured in benchmarks/io_speed.py."""
    url = make_tar(tmp_path / "s.tar", sample_members("bomb", image=_png_header_only(side, side))
                   + sample_members("ok"))
    tracemalloc.start()
    kept, rejected = read(url)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20  # header check only: no pixel buffer of GBs
    assert [s.key for s in kept] == ["ok"]
    assert [r.key for r in rejected] == ["bomb"] and rejected[0].reason.startswith("decompression bomb")
    assert rejected[0].reason == f"decompression bomb: more than {shards.MAX_IMAGE_PIXELS} pixels"  # either size


def test_decode_image_raises_image_rejected():
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(_png_header_only(40000, 40000))
    with pytest.raises(ImageRejected, match="empty image file"):
        decode_image(b"")


# ------------------------------------------------------------------------------------------ odd modes, kept


def _png_rgb16(width: int, height: int, value: int) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG; PIL cannot write one."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + struct.pack(">H", value) * 3 * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def _gif_two_frames() -> bytes:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _rgba() -> bytes:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black
    image.putpixel((0, 0), (10, 200, 30, 255))
    return encode(image)


def _palette() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 30, 144, 255] + [0] * 762)
    return encode(image)


ODD_IMAGES = {
    # name: (bytes, ext in the tar, expected pixel (0,0), expected pixel (7,7))
    "cmyk_jpeg": (lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), "jpg",
                  (255, 0, 0), (255, 0, 0)),
    "gray16_png": (lambda: encode(Image.fromarray(np.full((8, 8), 32896, np.uint16))), "png",
                   (128, 128, 128), (128, 128, 128)),
    "rgb48_png": (lambda: _png_rgb16(8, 8, 0xC8C8), "png", (200, 200, 200), (200, 200, 200)),
    "gray_png": (lambda: png(77, mode="L"), "png", (77, 77, 77), (77, 77, 77)),
    "gray_jpeg": (lambda: encode(Image.new("L", (8, 8), 77), "JPEG", quality=95), "jpg", (77, 77, 77), (77, 77, 77)),
    "bilevel_png": (lambda: png(1, mode="1"), "png", (255, 255, 255), (255, 255, 255)),
    "palette_png": (_palette, "png", (30, 144, 255), (30, 144, 255)),
    "rgba_png": (_rgba, "png", (10, 200, 30), (255, 255, 255)),  # transparent -> white
    "la_png": (lambda: png((90, 255), mode="LA"), "png", (90, 90, 90), (90, 90, 90)),
    "animated_gif": (_gif_two_frames, "gif", (255, 0, 0), (255, 0, 0)),  # the first frame
    "bmp": (lambda: encode(Image.new("RGB", (8, 8), RED), "BMP"), "bmp", RED, RED),
    "png_named_jpg": (lambda: png(), "jpg", RED, RED),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_image_modes_are_normalised_to_rgb_and_kept(tmp_path, name):
    make, ext, first, last = ODD_IMAGES[name]
    result = one(make_tar(tmp_path / "s.tar", sample_members("a", image=make(), ext=ext)))
    assert isinstance(result, Sample), result
    assert result.image.mode == "RGB" and result.image.size == (8, 8)
    tolerance = 6 if "jpeg" in name else 1
    for xy, expected in (((0, 0), first), ((7, 7), last)):
        pixel = result.image.getpixel(xy)
        assert np.abs(np.subtract(pixel, expected)).max() <= tolerance, (xy, pixel)
    # What is stored decodes to the same RGB pixels and carries the extension of its real format.
    stored = Image.open(io.BytesIO(result.image_bytes))
    assert {"png": "PNG", "jpg": "JPEG"}[result.image_ext] == stored.format and stored.mode == "RGB"
    assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(result.image))
    if name == "png_named_jpg":
        assert result.image_ext == "png"
    # Only 8-bit RGB JPEG/PNG/WebP bytes are kept as they were; everything else is re-encoded as PNG.
    assert (result.image_bytes == make()) == (name == "png_named_jpg")


# ------------------------------------------------------------------------------------------ captions


def test_missing_txt_takes_caption_from_json_or_empty(tmp_path):
    url = make_tar(tmp_path / "s.tar", sample_members("a", caption=None, meta={"caption": "from  json"})
                   + sample_members("b", caption=None) + sample_members("c", caption=None, meta={"caption": 7}))
    kept, rejected = read(url)
    assert [(s.key, s.caption) for s in kept] == [("a", "from json"), ("b", ""), ("c", "")] and not rejected


def test_empty_caption_is_kept(tmp_path):
    result = one(make_tar(tmp_path / "s.tar", sample_members("a", caption=b"")))
    assert isinstance(result, Sample) and result.caption == ""


def test_non_utf8_caption_rejected(tmp_path):
    url = make_tar(tmp_path / "s.tar", sample_members("a", caption=b"caf\xe9 au lait") + sample_members("b"))
    kept, rejected = read(url)
    assert [s.key for s in kept] == ["b"]
    assert [(r.key, r.reason) for r in rejected] == [("a", "caption is not valid UTF-8")]


def test_huge_caption_truncated_and_control_chars_cleaned(tmp_path):
    url = make_tar(tmp_path / "s.tar", sample_members("a", caption=b"word " * 20000)  # 100 KB
                   + sample_members("b", caption="\ufeffa\x00b\tc\r\n d".encode()))
    kept, rejected = read(url)
    assert not rejected and len(kept) == 2
    assert len(kept[0].caption) == MAX_CAPTION_CHARS and kept[0].caption.startswith("word word")
    assert kept[1].caption == "a b c d"


def test_broken_json_metadata_does_not_cost_the_sample(tmp_path):
    result = one(make_tar(tmp_path / "s.tar", [("a.png", png()), ("a.json", b"{not json"), ("a.txt", b"x")]))
    assert isinstance(result, Sample) and result.meta == {} and result.caption == "x"


# ------------------------------------------------------------------------------------------ structure


def test_duplicate_keys_second_rejected(tmp_path):
    members = (sample_members("a", caption=b"first") + sample_members("b")
               + sample_members("a", caption=b"second")  # again later in the shard
               + sample_members("c") + sample_members("c", caption=b"again"))  # again right away
    kept, rejected = read(make_tar(tmp_path / "s.tar", members))
    assert [(s.key, s.caption) for s in kept] == [("a", "first"), ("b", "a caption"), ("c", "a caption")]
    assert [(r.key, r.reason) for r in rejected] == [("a", "duplicate key in shard"), ("c", "duplicate key in shard")]
    assert len(kept) + len(rejected) == 5


def test_unsafe_paths_and_links_rejected_and_nothing_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside"
    symlink = tarfile.TarInfo("link.png")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hardlink = tarfile.TarInfo("hard.png")
    hardlink.type, hardlink.linkname = tarfile.LNKTYPE, "ok.png"
    fifo = tarfile.TarInfo("pipe.png")
    fifo.type = tarfile.FIFOTYPE
    members = (sample_members("ok")
               + [("../../evil.png", png()), ("../../evil.txt", b"x")]
               + [(f"{outside}/abs.png", png()), (f"{outside}/abs.txt", b"x")]
               + [("sub/../../dotdot.png", png())]
               + [(symlink, None), ("link.txt", b"x")]
               + [(hardlink, None)] + [(fifo, None)]
               + sample_members("ok2"))
    url = make_tar(work / "s.tar", members)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(work)  # so a relative escape would land under tmp_path, where we look
    try:
        kept, rejected = read(url)
    finally:
        os.chdir(cwd)
    assert [s.key for s in kept] == ["ok", "ok2"]
    reasons = {r.key: r.reason for r in rejected}
    assert list(reasons) == ["evil", "abs", "dotdot", "link", "hard", "pipe"]
    assert reasons["evil"] == reasons["abs"] == reasons["dotdot"] == "unsafe tar member path (absolute or with ..)"
    assert reasons["link"] == reasons["hard"] == "tar member is a link, not a file"
    assert reasons["pipe"] == "tar member is not a regular file"
    assert len(kept) + len(rejected) == 8
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and not outside.exists()


def test_sample_without_image_bad_key_and_stray_files(tmp_path):
    members = ([("README", b"hello"), (".hidden.txt", b"x"), ("dir/", b"")]
               + [("a.txt", b"caption only"), ("a.json", b"{}")]
               + sample_members("bad key")
               + sample_members("dir/nested"))  # WebDataset keys may sit in folders: key "nested"
    kept, rejected = read(make_tar(tmp_path / "s.tar", members))
    assert [s.key for s in kept] == ["nested"]
    assert [(r.key, r.reason) for r in rejected] == [
        ("a", "no image (.jpg/.png/.webp) in sample"), ("bad key", "key has characters outside [A-Za-z0-9_-]")]


def test_oversized_member_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 1000)
    url = make_tar(tmp_path / "s.tar", sample_members("big", image=png(size=(64, 64)) + b"\x00" * 5000)
                   + sample_members("small"))
    kept, rejected = read(url)
    assert [s.key for s in kept] == ["small"]
    assert [r.key for r in rejected] == ["big"] and rejected[0].reason == "tar member is too large (over 1000 bytes)"
