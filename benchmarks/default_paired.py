"""The default selection's paired differences, from the benchmark's own files.

    .venv/bin/python benchmarks/default_paired.py [benchmarks/results]   (run by `make benchmark-variants`)

`tldr-vlp benchmark` pairs the TL;DR row with every baseline. The default selection is chosen on
validation and may be another variant (a baseline, when one wins); this pairs it the same way (same
seed, same crawl, mean R@1 on the test split) from each `benchmark_<crawl>.json` (a crawl of
tldr_tasks.benchmark.ALL_CRAWLS: not the caption benchmark's `benchmark_captions_<crawl>.json` beside them),
and writes `default_paired.json` beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tldr_tasks.benchmark import ALL_CRAWLS, default_paired


def main(folder: str = "benchmarks/results") -> None:
    files = [path for crawl in ALL_CRAWLS if (path := Path(folder) / f"benchmark_{crawl}.json").exists()]
    results = {}
    for path in files:
        result = json.loads(path.read_text())
        results[result["crawl"]] = default_paired(result)
    (Path(folder) / "default_paired.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    for crawl, result in results.items():
        print(crawl, ", ".join(f"{name} {d['mean']:+.1f} ± {d['ci95']:.1f} (≥ {d['lower']:.1f})"
                               for name, d in result["paired_differences"].items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
