"""The crawl registry behind tldr_ingest: landed shards -> a DVC-versioned crawl folder. No Airflow.

A crawler (img2dataset) writes `NNNNN.tar` then `NNNNN.parquet` and `NNNNN_stats.json` into the
landing folder (any fsspec URL). A shard counts as landed once its `_stats.json` exists, or, for
writers without sidecars, once the tar has not changed for `settle_seconds`. Landed shards not yet
registered are copied into `<repo>/crawl/`, `dvc add crawl` versions the folder, `dvc push` stores
it in the remote, and the folder's DVC md5 is the crawl version (appended to `versions.jsonl`).
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import time
from pathlib import Path

import fsspec
import yaml

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


def new_shards(landing_url: str, repo: str, settle_seconds: float = 60.0) -> list[str]:
    """Landed shards whose name is not in the registered crawl yet."""
    crawl = Path(repo) / "crawl"
    known = {p.name for p in crawl.glob("*.tar")} if crawl.exists() else set()
    return [url for url in landed_shards(landing_url, settle_seconds) if posixpath.basename(url) not in known]


def dvc(repo: str, *args: str) -> str:
    """Run the venv's dvc in `repo`; a failure raises with dvc's own message."""
    from tldr_dagkit.settings import venv_bin

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([venv_bin("dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo} (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc.stdout


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
         "new_shards": the names added now}.
    """
    ensure_repo(repo, remote)
    crawl = Path(repo) / "crawl"
    crawl.mkdir(exist_ok=True)
    added = []
    for url in shard_urls:
        name = posixpath.basename(url)
        _copy(url, crawl / name)
        added.append(name)
        stem = url[: -len(".tar")]
        fs, _ = fsspec.core.url_to_fs(url)
        for suffix in SIDECARS:
            if fs.exists(fsspec.core.url_to_fs(stem + suffix)[1]):
                _copy(stem + suffix, crawl / posixpath.basename(stem + suffix))
    dvc(repo, "add", "crawl")
    dvc(repo, "push")
    meta = yaml.safe_load((Path(repo) / "crawl.dvc").read_text())
    version = meta["outs"][0]["md5"].removesuffix(".dir")
    record = {"version": version, "url": str(crawl), "shards": len(list(crawl.glob("*.tar"))), "new_shards": added}
    with open(Path(repo) / "versions.jsonl", "a") as f:
        f.write(json.dumps({**record, "time": time.time()}) + "\n")
    return record
