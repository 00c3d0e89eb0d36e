"""The crawl registry behind tldr_ingest: landed shards -> a DVC-versioned crawl folder. No Airflow.

A crawler (img2dataset) writes `NNNNN.tar` then `NNNNN.parquet` and `NNNNN_stats.json` into the
landing folder (any fsspec URL). A shard counts as landed once its `_stats.json` exists, or, for
writers without sidecars, once the tar has not changed for `settle_seconds`. Landed shards not yet
registered are copied into `<repo>/crawl/`, `dvc add crawl` versions the folder, `dvc push` stores
it in the remote, and the folder's DVC md5 is the crawl version (appended to `versions.jsonl`).

A shard is known by its content (md5, DVC's own hash), not its name: img2dataset numbers every job's
shards from 00000, so a second crawl re-lands `00000.tar` with other samples. Such a shard is new,
replaces the registered file of that name in a new crawl version, and is listed in `replaced_shards`;
the old version stays in the DVC cache and remote: `checkout_version(repo, version)` brings it back.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from pathlib import Path

import fsspec
import yaml

from tldr_tasks.content import file_md5
from tldr_tasks.versioning import dvc, tracked_md5

SIDECARS = (".parquet", "_stats.json")  # img2dataset writes these beside every NNNNN.tar


def _mtime(info: dict) -> float | None:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def landed_shards(landing_url: str, settle_seconds: float = 60.0, now: float | None = None) -> list[str]:
    """URLs of the complete `.tar` shards in `landing_url`, sorted by name."""
    fs, root = fsspec.core.url_to_fs(landing_url)
    if not fs.exists(root):
        return []
    protocol = landing_url.split("://", 1)[0] + "://" if "://" in landing_url else ""
    entries = {posixpath.basename(e["name"]): e for e in fs.ls(root, detail=True)}
    now = time.time() if now is None else now
    ready = []
    for name, info in sorted(entries.items()):
        if not name.endswith(".tar") or info.get("type") == "directory":
            continue
        stem = name[: -len(".tar")]
        mtime = _mtime(info)
        if f"{stem}_stats.json" in entries or (mtime is not None and now - mtime >= settle_seconds):
            path = info["name"]
            ready.append(path if not protocol or path.startswith(protocol) else protocol + path)
    return ready


def _landed_stat(url: str) -> list:
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return [int(info["size"]), _mtime(info)]


def registered_files(repo: str) -> dict[str, dict]:
    """{shard name: {"md5", "landed": [size, mtime] of the landed file it was copied from}} of the
    latest registered version; registries written before content tracking are hashed once here."""
    versions = Path(repo) / "versions.jsonl"
    lines = versions.read_text().splitlines() if versions.exists() else []
    if lines and "files" in json.loads(lines[-1]):
        return json.loads(lines[-1])["files"]
    crawl = Path(repo) / "crawl"
    return {p.name: {"md5": file_md5(str(p)), "landed": None} for p in sorted(crawl.glob("*.tar"))}


def new_shards(landing_url: str, repo: str, settle_seconds: float = 60.0) -> list[str]:
    """Landed shards whose content is not registered under their name: new names and re-landed names
    with other bytes. A file whose size and mtime match what was registered is not read again."""
    known = registered_files(repo)
    found = []
    for url in landed_shards(landing_url, settle_seconds):
        entry = known.get(posixpath.basename(url))
        if entry and (entry["landed"] == _landed_stat(url) or entry["md5"] == file_md5(url)):
            continue
        found.append(url)
    return found


def ensure_repo(repo: str, remote: str) -> None:
    """A DVC repo (no git needed) at `repo` whose default remote is `remote` (a folder or s3:// URL)."""
    Path(repo).mkdir(parents=True, exist_ok=True)
    if not (Path(repo) / ".dvc").exists():
        dvc(repo, "init", "--no-scm")
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    dvc(repo, "remote", "add", "--default", "--force", "storage", remote)


def _copy(url: str, target: Path) -> None:
    """Copy one landed file in; a partial copy never carries the final name."""
    tmp = target.with_name(target.name + ".part")
    with fsspec.open(url, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(tmp, target)


def register(shard_urls: list[str], repo: str, remote: str) -> dict:
    """Copy the shards (and their sidecars) into `<repo>/crawl`, version and push with DVC.

    Returns:
        {"version": the crawl folder's DVC md5, "url": the crawl folder, "shards": shards in it,
         "new_shards": the names added now, "replaced_shards": those of them that replaced other content}.
    """
    ensure_repo(repo, remote)
    crawl = Path(repo) / "crawl"
    crawl.mkdir(exist_ok=True)
    files = registered_files(repo)
    added, replaced = [], []
    for url in shard_urls:
        name = posixpath.basename(url)
        landed = _landed_stat(url)
        _copy(url, crawl / name)
        md5 = file_md5(str(crawl / name))
        if name in files and files[name]["md5"] != md5:
            replaced.append(name)
        files[name] = {"md5": md5, "landed": landed}
        added.append(name)
        stem = url[: -len(".tar")]
        fs, _ = fsspec.core.url_to_fs(url)
        for suffix in SIDECARS:
            if fs.exists(fsspec.core.url_to_fs(stem + suffix)[1]):
                _copy(stem + suffix, crawl / posixpath.basename(stem + suffix))
    dvc(repo, "add", "crawl")
    dvc(repo, "push")
    version = tracked_md5(repo, "crawl").removesuffix(".dir")
    record = {"version": version, "url": str(crawl), "shards": len(list(crawl.glob("*.tar"))), "new_shards": added,
              "replaced_shards": replaced}
    # The per-file md5s stay in the registry, not in the Asset event: they grow with the crawl.
    with open(Path(repo) / "versions.jsonl", "a") as f:
        f.write(json.dumps({**record, "files": files, "time": time.time()}) + "\n")
    return record


def checkout_version(repo: str, version: str) -> Path:
    """The crawl folder as registered in `version` (from versions.jsonl), restored from the DVC cache or
    remote into `<repo>/versions/<version>/`; the data repo has no git history, so a small .dvc file
    naming that version's md5 stands in for an old `crawl.dvc`."""
    target = Path(repo) / "versions" / version
    target.parent.mkdir(exist_ok=True)
    pointer = target.with_name(f"{version}.dvc")
    pointer.write_text(yaml.safe_dump({"outs": [{"md5": f"{version}.dir", "hash": "md5", "path": version}]}))
    dvc(repo, "pull", str(pointer.relative_to(repo)))
    return target
