"""Importer: a folder of images + captions file -> img2dataset-style shards, every row accounted for."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tldr_tasks.data.importer import import_folder, main
from tldr_tasks.data.shards import Rejected, Sample, iter_shard


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "red.png").write_bytes(_encode(Image.new("RGB", (10, 12), (255, 0, 0)), "PNG"))
    (images / "sub" / "blue.jpg").write_bytes(_encode(Image.new("RGB", (16, 16), (0, 0, 255)), "JPEG"))
    (images / "green.gif").write_bytes(_encode(Image.new("RGB", (8, 8), (0, 255, 0)), "GIF"))
    (images / "gray.webp").write_bytes(_encode(Image.new("L", (8, 8), 128), "WEBP"))
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "bomb.png").write_bytes(_bomb())
    (tmp_path / "secret.png").write_bytes(_encode(Image.new("RGB", (8, 8)), "PNG"))
    return tmp_path


ROWS = [
    {"path": "red.png", "caption": "a red  square"},
    {"path": "sub/blue.jpg", "caption": "a blue square"},
    {"path": "missing.png", "caption": "gone"},
    {"path": "green.gif", "caption": "green"},
    {"path": "broken.jpg", "caption": "broken"},
    {"path": "../secret.png", "caption": "escape"},
    {"path": "empty.png", "caption": ""},
    {"path": "gray.webp"},
    {"caption": "no path"},
    {"path": "bomb.png", "caption": "bomb"},
    {"path": "sub", "caption": "a folder"},
]


def _write_jsonl(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return str(path)


def _read_all(out: Path) -> list[Sample]:
    samples = []
    for tar in sorted(out.glob("*.tar")):
        items = list(iter_shard(str(tar)))
        assert not [i for i in items if isinstance(i, Rejected)]
        samples += items
    return samples


def test_import_jsonl_accounts_for_every_row(folder):
    captions = _write_jsonl(folder / "captions.jsonl", ROWS, extra_lines=("{broken json", "[1, 2]", ""))
    out = folder / "out"
    stats = import_folder(str(folder / "images"), captions, str(out), shard_size=2)
    assert stats["input"] == 13 and stats["written"] == 4 and stats["rejected"] == 9
    assert stats["written"] + stats["rejected"] == stats["input"]
    assert stats["by_reason"] == {"missing_file": 2, "undecodable": 1, "unsafe_path": 1, "empty_file": 1,
                                  "bad_row": 3, "decompression_bomb": 1}
    assert sum(stats["by_reason"].values()) == stats["rejected"]
    assert [Path(u).name for u in stats["shards"]] == ["00000.tar", "00001.tar"]

    samples = _read_all(out)
    assert [(s.key, s.caption, s.image_ext, s.meta["url"]) for s in samples] == [
        ("0000000", "a red square", "png", "red.png"),
        ("0000001", "a blue square", "jpg", "sub/blue.jpg"),
        ("0000003", "green", "png", "green.gif"),  # GIF re-encoded as PNG
        ("0000007", "", "webp", "gray.webp"),  # WebP decodes as RGB: kept as is
    ]
    assert samples[1].image_bytes == (folder / "images" / "sub" / "blue.jpg").read_bytes()  # stored as is
    assert samples[0].image.size == (10, 12) and samples[0].meta["width"] == 10 and samples[0].meta["height"] == 12
    assert samples[2].image.getpixel((0, 0)) == (0, 255, 0)
    for s in samples:
        assert s.meta["status"] == "success" and s.meta["key"] == s.key
        assert s.meta["sha256"] == hashlib.sha256(s.image_bytes).hexdigest()

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["path"], r["reason"]) for r in rejects] == [
        ("0000002", "missing.png", "missing_file"), ("0000004", "broken.jpg", "undecodable"),
        ("0000005", "../secret.png", "unsafe_path"), ("0000006", "empty.png", "empty_file"),
        ("0000008", None, "bad_row"), ("0000009", "bomb.png", "decompression_bomb"),
        ("0000010", "sub", "missing_file"), ("0000011", None, "bad_row"), ("0000012", None, "bad_row")]
    assert "not JSON" in rejects[7]["detail"] and "not a JSON object" in rejects[8]["detail"]
    # img2dataset side files beside each shard, and the summary.
    assert [r["key"] for r in pq.read_table(out / "00001.parquet").to_pylist()] == ["0000003", "0000007"]
    assert json.loads((out / "00000_stats.json").read_text())["successes"] == 2
    assert json.loads((out / "import.json").read_text())["written"] == 4


def test_import_csv_with_quoted_captions(folder):
    path = folder / "captions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerow(["red.png", 'a "red" square, on white'])
        writer.writerow(["sub/blue.jpg", "blue"])
        writer.writerow(["nope.jpg", "missing"])
    stats = import_folder(str(folder / "images"), str(path), str(folder / "out"))
    assert (stats["input"], stats["written"], stats["rejected"]) == (3, 2, 1)
    samples = _read_all(folder / "out")
    assert [(s.key, s.caption) for s in samples] == [("0000000", 'a "red" square, on white'), ("0000001", "blue")]


def test_csv_without_header_and_missing_inputs_say_what_to_fix(folder):
    (folder / "bad.csv").write_text("red.png,a caption\n")
    with pytest.raises(ValueError, match="header row with columns path,caption"):
        import_folder(str(folder / "images"), str(folder / "bad.csv"), str(folder / "out"))
    with pytest.raises(ValueError, match="captions file not found"):
        import_folder(str(folder / "images"), str(folder / "none.jsonl"), str(folder / "out"))
    with pytest.raises(ValueError, match="images folder not found"):
        import_folder(str(folder / "nowhere"), _write_jsonl(folder / "c.jsonl", ROWS[:1]), str(folder / "out"))


def test_cli(folder, capsys):
    captions = _write_jsonl(folder / "captions.jsonl", ROWS[:3])
    assert main(["--images", str(folder / "images"), "--captions", captions, "--out", str(folder / "cli"),
                 "--shard-size", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"input": 3, "written": 2, "rejected": 1, "by_reason": {"missing_file": 1}, "shards": 2}
    assert sorted(p.name for p in (folder / "cli").glob("*.tar")) == ["00000.tar", "00001.tar"]
    with pytest.raises(SystemExit):
        main(["--images", str(folder / "images"), "--captions", str(folder / "none.jsonl"), "--out", "x"])
