"""Which captioner a run uses: captioners shared under an output root, keyed by what made them.

A captioner is determined by the seed, every `captioner.*` parameter and the crawl it was trained
on, so under a shared root (Airflow's `<output root>`) each lives in
`<root>/captioners/<params key>-<crawl version>` and records both in its `params.json`. Runs that
ask for other captioner parameters get another folder and train another captioner; embeddings stay
keyed by the captioner's weights version, so each captioner has its own.

Policy for scheduled recompression (`choose`): reuse the newest compatible captioner (same
parameters; newest = trained on the most shards, since a registered crawl only grows); train a new
one on the current crawl when the run asks for it (`retrain`), when none is compatible, or when the
crawl has grown by more than `max_growth` (a share: 0.5 = 50% more shards) since that captioner was
trained. A retrain never lands in a finished captioner's folder (that would be reused, not trained): it
takes the next free `<params key>-<crawl version>-r<N>`, and is registered as a new model version.
"""

from __future__ import annotations

import hashlib
import json
import re

from tldr_tasks import storage
from tldr_tasks.config import Config
from tldr_tasks.pipeline import PARAMS_RECORD, get_stage, stage_params

FOLDER = "captioners"


def params_key(cfg: Config) -> str:
    """Short hash of the parameters that determine a captioner (seed and captioner.*)."""
    return hashlib.sha256(json.dumps(stage_params(cfg, "train-captioner"), sort_keys=True).encode()).hexdigest()[:12]


def folder(root: str, cfg: Config, crawl_version: str | None) -> str:
    """The captioner folder for these parameters trained on that crawl version."""
    name = params_key(cfg) + (f"-{crawl_version[:12]}" if crawl_version else "")
    return storage.join(root, FOLDER, name)


def compatible(root: str, cfg: Config) -> list[dict]:
    """Finished captioners under `root` trained with cfg's captioner parameters, newest first:
    [{"url", "shards", "version"}] (shards and crawl version of their training crawl)."""
    wanted = stage_params(cfg, "train-captioner")
    found = []
    for url in storage.listdir(storage.join(root, FOLDER)):
        record_url = storage.join(url, PARAMS_RECORD)
        done = storage.join(url, get_stage("train-captioner").done_marker)
        if not (storage.exists(done) and storage.exists(record_url)):
            continue
        record = json.loads(storage.read_text(record_url))
        if record.get("params") == wanted:
            trained_on = record.get("input") or {}
            found.append({"url": url, "shards": int(trained_on.get("shards", 0)), "version": trained_on.get("version"),
                          "retrain": retrain_number(url)})
    # newest first: trained on the most shards, then the latest retrain
    return sorted(found, key=lambda c: (-c["shards"], -c["retrain"], c["url"]))


def retrain_number(url: str) -> int:
    """1 for a first training, N for the folder `...-rN` a retrain trained."""
    found = re.search(r"-r(\d+)$", url.rstrip("/"))
    return int(found.group(1)) if found else 1


def unfinished(url: str) -> str:
    """`url`, or its first `-rN` sibling (N = 2, 3, ...) that holds no finished captioner."""
    done = get_stage("train-captioner").done_marker
    candidate, number = url, 1
    while storage.exists(storage.join(candidate, done)):
        number += 1
        candidate = f"{url}-r{number}"
    return candidate


def choose(root: str, cfg: Config, crawl_version: str, crawl_shards: int, retrain: bool = False,
           max_growth: float = 0.5) -> dict:
    """The captioner folder a run on this crawl uses, and why: {"url", "reason", "trained_shards"}.

    Args:
        root: the shared output root.
        crawl_version: the current crawl's version (DVC md5, or a fingerprint of its shards).
        crawl_shards: how many shards the current crawl has.
        retrain: train a new captioner on the current crawl even if a compatible one exists.
        max_growth: retrain once the crawl has more than (1 + max_growth) x the shards the newest
            compatible captioner was trained on.
    """
    new = folder(root, cfg, crawl_version)
    if retrain:
        return {"url": unfinished(new), "reason": "retrain requested", "trained_shards": crawl_shards}
    candidates = compatible(root, cfg)
    if not candidates:
        return {"url": new, "reason": "no captioner with these parameters yet", "trained_shards": crawl_shards}
    best = candidates[0]
    if crawl_shards > best["shards"] * (1 + max_growth):
        return {"url": new, "trained_shards": crawl_shards,
                "reason": f"crawl grew from {best['shards']} to {crawl_shards} shards (> {max_growth:.0%})"}
    return {"url": best["url"], "reason": "reusing the newest compatible captioner", "trained_shards": best["shards"]}
