"""Per-stage throughput and peak memory against crawl size, on whatever device is present.

    .venv/bin/python benchmarks/stage_scale.py                       # sizes 2000,5000,12500 (make bench)
    .venv/bin/python benchmarks/stage_scale.py --sizes 1000,4000 --workdir /tmp/scale

For every size: a synthetic crawl (64 px, the demo's settings), then train-captioner (one epoch),
embed, kmeans, assign, cluster, sample, caption and materialize, each run by its real `run(cfg, io)` in a child
process of its own, so its peak RSS is its own (`ru_maxrss` of the process, and separately the
largest of its own children: the captioner's data-loader workers). Samples/s is the stage's input
samples (caption: the kept ones) over its wall time, process start-up and imports excluded.

Writes `benchmarks/results/stage_scale.json`, `stage_scale.md` (the table) and `stage_scale.png`
(seconds and peak RSS against crawl size, one line per stage).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tldr_tasks.runner import thread_defaults

RESULTS = Path(__file__).parent / "results"
STAGES = ("train-captioner", "embed", "kmeans", "assign", "cluster", "sample", "caption", "materialize")
# One epoch at the demo's sizes; clusters stay at about 50 samples each at every crawl size.
OVERRIDES = ["captioner.epochs=1", "seed=0"]


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux reports KiB


def device_info() -> dict:
    import os
    import platform

    import torch

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu"}
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0))
    return info


def child(stage: str, crawl: Path, out: Path, overrides: list[str]) -> None:
    """Run one stage in this process; print its wall time, peak RSS and metrics as JSON."""
    from tldr_tasks.config import load_config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import load_stage_module

    cfg = load_config(None, overrides)
    io = StageIO(input=str(crawl / "train"), out=str(out))
    module = load_stage_module(stage)
    rss_before = peak_rss_gib()
    started = time.time()
    result = module.run(cfg, io)
    print(json.dumps({"wall_s": round(time.time() - started, 2), "peak_rss_gib": round(peak_rss_gib(), 3),
                      "children_peak_rss_gib": round(peak_rss_gib(resource.RUSAGE_CHILDREN), 3),
                      "rss_after_imports_gib": round(rss_before, 3), "metrics": result.metrics}))


def run_size(n: int, work: Path) -> dict:
    crawl = work / f"crawl{n}"
    started = time.time()
    if not (crawl / "crawl.json").exists():
        subprocess.run([sys.executable, "-m", "tldr_tasks.cli", "make-crawl", "--out", str(crawl), "--samples", str(n),
                        "--eval-samples", "100"], check=True, stdout=subprocess.DEVNULL)
    record = {"samples": n, "make_crawl_s": round(time.time() - started, 1), "stages": {}}
    out = work / f"run{n}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = OVERRIDES + [f"cluster.clusters={max(2, n // 50)}"]
    for stage in STAGES:
        command = [sys.executable, __file__, "--child", stage, str(crawl), str(out)]
        command += [item for o in overrides for item in ("--set", o)]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        metrics = result["metrics"]
        samples = int(metrics.get("captions_written", 0)) if stage == "caption" else n
        result["samples"] = samples
        result["samples_per_s"] = round(samples / result["wall_s"], 1) if samples and result["wall_s"] else None
        record["stages"][stage] = result
        print(f"n={n} {stage}: {result['wall_s']} s, {result['samples_per_s']} samples/s, "
              f"peak {result['peak_rss_gib']} GiB", file=sys.stderr)
    return record


def table(records: list[dict]) -> str:
    lines = ["| stage | " + " | ".join(f"{r['samples']:,} samples: s / samples/s / peak GiB" for r in records) + " |",
             "|---|" + "---|" * len(records)]
    for stage in STAGES:
        cells = []
        for r in records:
            s = r["stages"][stage]
            cells.append(f"{s['wall_s']:.1f} / {s['samples_per_s'] or '-'} / {s['peak_rss_gib']:.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["samples"] for r in records]
    fig, (wall, rss) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        wall.plot(sizes, [r["stages"][stage]["wall_s"] for r in records], marker="o", label=stage)
        rss.plot(sizes, [r["stages"][stage]["peak_rss_gib"] for r in records], marker="o", label=stage)
    wall.set(xscale="log", yscale="log", xlabel="crawl samples", ylabel="wall seconds", title="cost per stage")
    rss.set(xscale="log", xlabel="crawl samples", ylabel="peak RSS (GiB)", title="peak memory per stage")
    wall.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,5000,12500", help="crawl sizes, comma-separated")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "CRAWL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The executor's thread settings (passive OpenMP waits: spinning threads crawl on a busy machine),
    # set before torch loads here or in the children, which inherit them.
    thread_defaults()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.overrides)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stage_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        records = [run_size(int(n), work) for n in args.sizes.split(",")]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stage_scale.json").write_text(json.dumps({"machine": device_info(), "overrides": OVERRIDES,
                                                          "sizes": records}, indent=2) + "\n")
    (RESULTS / "stage_scale.md").write_text(table(records))
    plot(records, RESULTS / "stage_scale.png")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
