"""Per-worker peak memory of the fanned-out clustering against the crawl's size.

    .venv/bin/python benchmarks/cluster_fanout.py --sizes 5000000,50000000

For each size, low-dimensional float16 embed parts (cluster_scale.generate: Zipf-sized Gaussian blobs)
are written to a temporary folder, then `kmeans`, every `assign` worker (--workers shard groups, one
after the other) and the `cluster` reduce run, each in a child process of its own, so each peak RSS
(ru_maxrss) is that process's alone. The folder is deleted after each size. Writes
`benchmarks/results/cluster_fanout.json`: `sizes`, `peak_gib_per_worker` (the largest assign worker's
peak), and per size the kmeans and reduce peaks and every process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cluster_scale import _peak_rss_gib, generate  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def child(stage: str, work: Path, overrides: list[str], shard_index: int, num_shards: int) -> None:
    """Run one stage (one shard group of a sharded one) here; print wall time, peak RSS and metrics."""
    from tldr_tasks.config import load_config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.pipeline import get_stage
    from tldr_tasks.runner import load_stage_module, thread_defaults

    thread_defaults()  # the executor's OpenMP settings: spinning faiss threads crawl on a shared machine
    cfg = load_config(None, overrides)
    io = StageIO(input=str(work / "crawl"), out=str(work / "run"), captioner=str(work / "captioner"))
    kwargs = {"shard_index": shard_index, "num_shards": num_shards} if get_stage(stage).sharded else {}
    started = time.time()
    result = load_stage_module(stage).run(cfg, io, **kwargs)
    print(json.dumps({"wall_s": round(time.time() - started, 2), "peak_rss_gib": round(_peak_rss_gib(), 3),
                      "metrics": result.metrics}))


def run_child(stage: str, work: Path, overrides: list[str], shard_index: int = 0, num_shards: int = 1) -> dict:
    command = [sys.executable, __file__, "--child", stage, str(work), str(shard_index), str(num_shards)]
    command += [item for o in overrides for item in ("--set", o)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(n: int, args, overrides: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="cluster_fanout_", dir=args.workdir))
    try:
        record = {"n": n, "generate": generate(work, n, args.dim, args.clusters, args.shard_size, seed=0)}
        record["kmeans"] = run_child("kmeans", work, overrides)
        record["assign"] = [run_child("assign", work, overrides, i, args.workers) for i in range(args.workers)]
        record["cluster"] = run_child("cluster", work, overrides)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(record), file=sys.stderr)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000000,50000000", help="crawl sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4, help="assign shard groups")
    parser.add_argument("--shard-size", type=int, default=250_000, help="samples per embed part")
    parser.add_argument("--workdir", default=None, help="where the temporary crawls go (default: $TMPDIR)")
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "WORKDIR", "INDEX", "GROUPS"), help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        stage, work, index, groups = args.child
        child(stage, Path(work), args.overrides, int(index), int(groups))
        return 0
    overrides = [f"cluster.clusters={args.clusters}", "seed=0"]
    records = [measure(int(n), args, overrides) for n in args.sizes.split(",")]
    out = {"sizes": [r["n"] for r in records],
           "peak_gib_per_worker": [max(a["peak_rss_gib"] for a in r["assign"]) for r in records],
           "kmeans_peak_gib": [r["kmeans"]["peak_rss_gib"] for r in records],
           "reduce_peak_gib": [r["cluster"]["peak_rss_gib"] for r in records],
           "dim": args.dim, "clusters": args.clusters, "workers": args.workers, "shard_size": args.shard_size,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "runs": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster_fanout.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("sizes", "peak_gib_per_worker", "kmeans_peak_gib", "reduce_peak_gib")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
