"""What the ratio curve (tldr_tasks/curve.py) costs next to the pipeline, on the demo's crawl or a larger one.

    .venv/bin/python benchmarks/curve_cost.py                    # the demo's 6,000 pairs: results/curve_cost.json
    .venv/bin/python benchmarks/curve_cost.py --samples 60000    # ten times larger: results/curve_cost_60000.json

Makes the synthetic crawl of the demo's profile (tldr_tasks.demo.PROFILE's crawl section, `--samples` pairs,
seed 0) and cluster assignments for it (random clusters and losses: the curve's cost does not depend on which
pairs the rule keeps, only on how many), then runs the sample stage twice in fresh run folders under the
product's thread settings (runner.thread_defaults, set before torch loads): without the curve
(`sample.strategy=uniform`, `sample.filter=none`), and with `sample.ratio=auto` and the default curve (every
curve ratio, sample.curve_seeds seeds). The tower features are computed once before, timed on their own (the first run's
cost; a rerun or an evaluation with the towers reads them from the cache). Records the wall and CPU seconds of
each part (CPU seconds are what other work on the machine inflates least), the peak RSS of this process, the
size of the crawl's cached features and of the largest subset the curve copies, the load average and the
machine, beside the demo's own time (results/demo_time.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"


def assignments(crawl: str, run: Path, clusters: int) -> None:
    """cluster/assignments.parquet of every train sample: random clusters and losses (seed 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tldr_tasks import storage
    from tldr_tasks.data.shards import Sample, iter_shard

    rng = np.random.default_rng(0)
    keys, shards = [], []
    for url in storage.expand_shards(crawl):
        for item in iter_shard(url):
            if isinstance(item, Sample):
                keys.append(item.key)
                shards.append(storage.shard_stem(url))
    (run / "cluster").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "shard": shards, "cluster": rng.integers(clusters, size=len(keys)),
                             "distance": rng.random(len(keys)), "loss": rng.random(len(keys))}),
                   run / "cluster" / "assignments.parquet")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far: what other work on the machine inflates least."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(work) -> dict[str, float]:
    """{"wall", "cpu"} seconds of `work()`."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return {"wall": round(time.perf_counter() - wall, 1), "cpu": round(cpu_seconds() - cpu, 1)}


def main(argv: list[str] | None = None) -> None:
    from tldr_tasks.runner import thread_defaults

    thread_defaults()  # the product's thread settings, before torch reads them at its import (runner.py)
    from tldr_tasks import storage
    from tldr_tasks.benchmark import machine
    from tldr_tasks.config import CrawlConfig, load_config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.data.synthetic import make_crawl
    from tldr_tasks.demo import PROFILE
    from tldr_tasks.models import clip
    from tldr_tasks.models.towers_clip import cached_features
    from tldr_tasks.scoring import REFERENCE_PRESET
    from tldr_tasks.stages import sample
    from tldr_tasks.stages.kmeans import cluster_count

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=PROFILE["crawl"]["samples"])
    parser.add_argument("--out", default="runs/curve_cost")
    args = parser.parse_args(argv)
    out = Path(args.out) / f"{args.samples}"
    crawl = out / "crawl"
    if not (crawl / "crawl.json").exists():
        make_crawl(str(crawl), CrawlConfig(**{**PROFILE["crawl"], "samples": args.samples}), seed=0)
    load = [os.getloadavg()[0]]
    rule = ["sample.strategy=uniform", "sample.filter=none"]  # the curve's cost does not depend on the rule
    auto = load_config(None, ["sample.ratio=auto", *rule])
    cache = out / "embed"
    loaded = {}
    seconds = {"tower_features_first_run": timed(lambda: loaded.update(features=cached_features(
        storage.expand_shards(str(crawl / "train")), clip.load_preset(REFERENCE_PRESET), str(cache), "input")[1]))}
    features = loaded["features"]
    for name, overrides in (("sample_without_curve", rule), ("sample_with_curve", ["sample.ratio=auto", *rule])):
        run = out / name
        if run.exists():  # a fresh run folder each time: the stage skips a finished one
            shutil.rmtree(run)
        assignments(str(crawl / "train"), run, cluster_count(auto, args.samples))
        io = StageIO(input=str(crawl / "train"), out=str(run), embed_cache=str(cache))
        seconds[name] = timed(lambda overrides=overrides, io=io: sample.run(load_config(None, overrides), io))
        load.append(os.getloadavg()[0])
    curve = json.loads((out / "sample_with_curve" / "sample" / "curve.json").read_text())
    largest = max(p["kept"] for p in curve["points"])
    demo = json.loads((RESULTS / "demo_time.json").read_text())
    result = {
        "what": "the ratio curve's cost in the sample stage (curve.py), default curve, sample.ratio=auto",
        "samples": args.samples, "holdout": curve["holdout"], "curve_ratios": [p["ratio"] for p in curve["points"]],
        "curve_seeds": curve["seeds"],
        "seconds": {**seconds, "curve": {kind: round(seconds["sample_with_curve"][kind]
                                                     - seconds["sample_without_curve"][kind], 1)
                                         for kind in ("wall", "cpu")}},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "cached_features_gib": round(features.nbytes / 2**30, 3),
        "largest_subset_features_gib": round(largest * features.shape[1] * 4 / 2**30, 3),
        "chosen_ratio": curve["chosen_ratio"],
        "demo_seconds": demo["seconds"] if args.samples == PROFILE["crawl"]["samples"] else None,
        "load_average_1min": [round(x, 2) for x in load], "machine": machine(),
    }
    name = "curve_cost.json" if args.samples == PROFILE["crawl"]["samples"] else f"curve_cost_{args.samples}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    from protocol import write_block  # benchmarks/protocol.py

    write_block(DOCS, "curve_cost", markdown())


def markdown() -> str:
    """docs/benchmarks.md's cost table from every committed curve_cost*.json, smallest crawl first."""
    files = sorted((json.loads(p.read_text()) for p in RESULTS.glob("curve_cost*.json")), key=lambda r: r["samples"])
    lines = ["| crawl | carved split | tower features, first run: wall / CPU s | the curve's trainings and scores: "
             "wall / CPU s | sample stage without the curve: wall s | peak RSS GiB | cached features GiB "
             "| largest subset's copy GiB | load average (1 min) |", "|---" * 9 + "|"]
    for r in files:
        sec, load = r["seconds"], r["load_average_1min"]
        lines.append(f"| {r['samples']:,} pairs | {r['holdout']:,} | {sec['tower_features_first_run']['wall']} / "
                     f"{sec['tower_features_first_run']['cpu']} | {sec['curve']['wall']} / {sec['curve']['cpu']} "
                     f"| {sec['sample_without_curve']['wall']} | {r['peak_rss_gib']} | {r['cached_features_gib']} "
                     f"| {r['largest_subset_features_gib']} | {min(load)}-{max(load)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
