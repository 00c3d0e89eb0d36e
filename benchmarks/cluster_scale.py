"""kmeans, assign, cluster + sample at scale: N synthetic 256-d float16 embeddings -> wall time and peak
RSS per stage.

    .venv/bin/python benchmarks/cluster_scale.py --n 1000000 --clusters 1000

Writes N embeddings as per-shard npz parts exactly as `embed` does (Zipf-sized Gaussian blobs, so
the clustering has structure to find), then runs the real `kmeans`, `assign` (one worker), `cluster`
and `sample` stages, each in its own child process so its peak RSS (ru_maxrss) is its own. The result goes to
`benchmarks/results/cluster_scale_<N>.json`, with the purity of the clusters against the blobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VERSION = "synthetic0000"  # stands in for a captioner version: the parts' folder is keyed by it
RESULTS = Path(__file__).parent / "results"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def generate(work: Path, n: int, dim: int, blobs: int, shard_size: int, seed: int) -> dict:
    """The crawl stand-in (empty .tar files: cluster only needs their names), a finished-captioner
    marker, the embed parts and the ground-truth blob of every sample (labels.npy, input order)."""
    from tqdm import tqdm

    from tldr_tasks.config import Config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.models.captioner import MARKER
    from tldr_tasks.stages import embed

    started = time.time()
    (work / "captioner").mkdir(parents=True, exist_ok=True)
    (work / "captioner" / MARKER).write_text(json.dumps({"version": VERSION}))
    (work / "crawl").mkdir(exist_ok=True)
    directory = embed.parts_dir(Config(), StageIO(input="", out=str(work / "run")), version=VERSION)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((blobs, dim)).astype(np.float32)
    popularity = 1.0 / np.arange(1, blobs + 1) ** 0.8  # long-tailed scene popularity
    popularity /= popularity.sum()
    labels = np.empty(n, dtype=np.int32)
    for index, start in enumerate(tqdm(range(0, n, shard_size), desc="generate", unit="part")):
        count = min(shard_size, n - start)
        label = rng.choice(blobs, count, p=popularity).astype(np.int32)
        x = centres[label] + 0.6 * rng.standard_normal((count, dim), dtype=np.float32)
        keys = np.char.zfill(np.arange(start, start + count).astype(str), 10)
        stem = f"{index:05d}"
        (work / "crawl" / f"{stem}.tar").write_bytes(b"")
        embed.save_part(embed.part_url(directory, str(work / "crawl" / f"{stem}.tar")), embed.EmbedPart(
            keys=keys, features=x.astype(np.float16), loss=rng.random(count, dtype=np.float32),
            reject_keys=np.zeros(0, dtype=str), reject_reasons=np.zeros(0, dtype=str),
            meta={"shard": stem, "samples": count, "rejected": 0}))
        labels[start:start + count] = label
    np.save(work / "labels.npy", labels)
    return {"seconds": round(time.time() - started, 1), "parts": -(-n // shard_size),
            "bytes_on_disk": sum(f.stat().st_size for f in Path(directory).iterdir())}


def child(stage: str, work: Path, overrides: list[str]) -> None:
    """Run one stage in this process and print its wall time, peak RSS and metrics as JSON."""
    from tldr_tasks.config import load_config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import load_stage_module

    cfg = load_config(None, overrides)
    io = StageIO(input=str(work / "crawl"), out=str(work / "run"), captioner=str(work / "captioner"))
    module = load_stage_module(stage)
    rss_before = _peak_rss_gib()  # interpreter + numpy/pyarrow/torch imports
    started = time.time()
    result = module.run(cfg, io)
    print(json.dumps({"wall_s": round(time.time() - started, 2), "peak_rss_gib": round(_peak_rss_gib(), 3),
                      "rss_after_imports_gib": round(rss_before, 3), "metrics": result.metrics}))


def purity(work: Path) -> float:
    """Share of samples whose cluster's majority blob is their own blob."""
    import pyarrow.parquet as pq

    table = pq.read_table(work / "run" / "cluster" / "assignments.parquet", columns=["key", "cluster"])
    keys = table["key"].to_numpy(zero_copy_only=False).astype(np.int64)
    cluster = table["cluster"].to_numpy()
    labels = np.load(work / "labels.npy")[keys]
    pairs = np.unique(cluster.astype(np.int64) * (labels.max() + 1) + labels, return_counts=True)
    majority = np.zeros(cluster.max() + 1, dtype=np.int64)
    np.maximum.at(majority, pairs[0] // (labels.max() + 1), pairs[1])
    return float(majority.sum() / len(cluster))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="number of embeddings")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--blobs", type=int, default=None, help="ground-truth groups (default: --clusters)")
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per embed part")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--strategy", default="uniform")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), args.overrides)
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cluster_scale_"))
    overrides = [f"cluster.clusters={args.clusters}", f"cluster.niter={args.niter}", f"sample.ratio={args.ratio}",
                 f"sample.strategy={args.strategy}", "sample.filter=none", "seed=0"]
    record = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "blobs": args.blobs or args.clusters,
              "niter": args.niter, "shard_size": args.shard_size, "ratio": args.ratio, "strategy": args.strategy,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}}
    try:
        record["generate"] = generate(work, args.n, args.dim, args.blobs or args.clusters, args.shard_size, seed=0)
        print(f"generated: {record['generate']}", file=sys.stderr)
        for stage in ("kmeans", "assign", "cluster", "sample"):
            command = [sys.executable, __file__, "--child", stage, str(work)]
            command += [item for o in overrides for item in ("--set", o)]
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
            record[stage] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{stage}: {record[stage]}", file=sys.stderr)
        record["cluster_purity"] = round(purity(work), 4)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster_scale_{args.n}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
