"""A crawl shard's identity is its content, not its file name.

img2dataset numbers every job's shards from 00000, so a second crawl lands a new `00000.tar` where
an old one was. Everything cached across runs (the ingest registry, the embedding cache, caption
parts) is therefore keyed by `{stem}-{digest}`: the md5 of the shard's bytes, the same hash DVC
records for the file, so a part names exactly the DVC object it was made from.

Cost: one read of every input shard per process that asks (local disks hash at about 1 GB/s);
the digest is remembered per process for a file whose size and mtime did not change.
"""

from __future__ import annotations

import hashlib

from tldr_tasks import storage

_CHUNK = 1 << 22  # 4 MiB reads
_memo: dict[tuple[str, int, float | None], str] = {}


def _stat(url: str) -> tuple[int, float | None]:
    fs, path = storage.filesystem(url)
    info = fs.info(path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return int(info["size"]), (mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)


def file_md5(url: str) -> str:
    """md5 hex digest of the bytes at `url` (any fsspec URL), streamed."""
    fs, path = storage.filesystem(url)
    digest = hashlib.md5(usedforsecurity=False)
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


UNREADABLE = "unreadable"  # the digest of a shard that cannot be opened: the stages reject it with the reason


def shard_digest(url: str) -> str:
    """The content identity of one shard (md5 of its bytes), remembered while size and mtime hold;
    UNREADABLE (not remembered) when it cannot be opened (permissions, a folder named `x.tar`)."""
    try:
        key = (url, *_stat(url))
        if key not in _memo:
            _memo[key] = file_md5(url)
    except OSError:
        return UNREADABLE
    return _memo[key]


def shard_id(url: str) -> str:
    """`{stem}-{md5}`: what per-shard outputs that outlive a run are named by. The stem stays in the
    name so a person can still tell which shard a part belongs to."""
    return f"{storage.shard_stem(url)}-{shard_digest(url)}"
