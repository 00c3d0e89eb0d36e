"""Import a folder of images plus a captions file as img2dataset-style WebDataset shards.

    tldr-vlp import --images photos/ --captions captions.jsonl --out crawl/ [--shard-size 1000]

The captions file is JSON lines (`{"path": ..., "caption": ...}`) or CSV with a `path,caption`
header; paths are relative to the images folder. Every row becomes a sample `KEY.jpg|png|webp`
(the original bytes when already an RGB JPEG/PNG/WebP, else a PNG), `KEY.txt`, `KEY.json`, with
keys zero-padded by row order. Rows whose file is missing, outside the folder or undecodable are
written to `{out}/rejects.jsonl` with the reason, so input = written + rejected.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator

from tldr_tasks import storage
from tldr_tasks.data.shards import ImageRejected, decode_image, encode_json, write_sidecars, write_tar


def _read_rows(captions_file: str) -> Iterator[dict | str]:
    """Rows of the captions file as dicts; a row that cannot be parsed comes out as its error string."""
    text = storage.read_bytes(captions_file).decode("utf-8-sig")
    if captions_file.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{captions_file}: the CSV needs a header row with columns path,caption")
        yield from reader
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield f"line {number} is not JSON: {err}"
            continue
        yield row if isinstance(row, dict) else f"line {number} is not a JSON object"


def _resolve(images_dir: str, relative: str) -> str | None:
    """The full URL of `relative` inside `images_dir`, or None when it points outside."""
    if not relative or relative.startswith(("/", "\\")) or "://" in relative:
        return None
    parts = relative.replace("\\", "/").split("/")
    if ".." in parts:
        return None
    return storage.join(images_dir, *[p for p in parts if p not in ("", ".")])


def import_folder(images_dir: str, captions_file: str, out_url: str, shard_size: int = 1000) -> dict:
    """Write `{out}/00000.tar ...` from a folder of images and a captions file (jsonl or csv).

    Returns {"input", "written", "rejected", "by_reason", "shards"}; input = written + rejected.
    Rejects (one JSON object per line: key, path, reason) go to `{out}/rejects.jsonl`.
    """
    from tqdm import tqdm

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if not storage.exists(captions_file):
        raise ValueError(f"captions file not found: {captions_file} (pass --captions FILE.jsonl or FILE.csv)")
    if not storage.exists(images_dir):
        raise ValueError(f"images folder not found: {images_dir} (pass --images DIR)")
    rows = list(_read_rows(captions_file))
    digits = max(7, len(str(len(rows))))
    rejects: list[dict] = []
    by_reason: dict[str, int] = {}
    written = 0

    def reject(key: str, path, code: str, detail: str) -> None:
        rejects.append({"key": key, "path": path, "reason": code, "detail": detail})
        by_reason[code] = by_reason.get(code, 0) + 1

    shards: list[str] = []
    buffer: list[tuple[str, dict[str, bytes]]] = []
    sidecar_rows: list[dict] = []

    def flush() -> None:
        if buffer:
            url = storage.join(out_url, f"{len(shards):05d}.tar")
            write_tar(url, buffer)
            write_sidecars(url, sidecar_rows)
            shards.append(url)
            buffer.clear()
            sidecar_rows.clear()

    for index, row in enumerate(tqdm(rows, desc="import", unit="img", file=sys.stderr, disable=None)):
        key = f"{index:0{digits}d}"
        if isinstance(row, str):
            reject(key, None, "bad_row", row)
            continue
        relative = str(row.get("path") or "")
        caption = row.get("caption")
        caption = "" if caption is None else " ".join(str(caption).split())
        url = _resolve(images_dir, relative)
        if not relative:
            reject(key, None, "bad_row", "the row has no path")
            continue
        if url is None:
            reject(key, relative, "unsafe_path", "the path is absolute or leaves the images folder")
            continue
        try:
            data = storage.read_bytes(url)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
            reject(key, relative, "missing_file", f"{type(err).__name__}: {err}"[:300])
            continue
        try:
            image, image_bytes, ext = decode_image(data)
        except ImageRejected as err:
            code = "decompression_bomb" if str(err).startswith("decompression bomb") else (
                "empty_file" if str(err).startswith("empty") else "undecodable")
            reject(key, relative, code, str(err))
            continue
        meta = {"url": relative, "key": key, "caption": caption, "status": "success", "error_message": None,
                "width": image.width, "height": image.height, "original_width": image.width,
                "original_height": image.height, "exif": None, "sha256": hashlib.sha256(image_bytes).hexdigest()}
        buffer.append((key, {ext: image_bytes, "txt": caption.encode("utf-8"), "json": encode_json(meta)}))
        sidecar_rows.append({k: v for k, v in meta.items() if k != "exif"})
        written += 1
        if len(buffer) >= shard_size:
            flush()
    flush()
    storage.write_bytes_atomic(storage.join(out_url, "rejects.jsonl"),
                               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode("utf-8"))
    stats = {"input": len(rows), "written": written, "rejected": len(rejects), "by_reason": by_reason,
             "shards": shards}
    storage.write_bytes_atomic(storage.join(out_url, "import.json"), json.dumps(stats, indent=2).encode("utf-8"))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tldr-vlp import",
                                     description="Turn a folder of images + a captions file into WebDataset shards.")
    parser.add_argument("--images", required=True, help="folder the caption paths are relative to")
    parser.add_argument("--captions", required=True, help="captions.jsonl ({path, caption} per line) or .csv")
    parser.add_argument("--out", required=True, help="output folder URL for the shards and rejects.jsonl")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    args = parser.parse_args(argv)
    try:
        stats = import_folder(os.path.expanduser(args.images), args.captions, args.out, args.shard_size)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps({k: v for k, v in stats.items() if k != "shards"} | {"shards": len(stats["shards"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
