"""The default selection's paired differences, from the benchmark's own files.

    .venv/bin/python benchmarks/default_paired.py [benchmarks/results]   (run by `make benchmark`)

`tldr-vlp benchmark` pairs the TL;DR row with every baseline. The default selection is chosen on
validation and may be another variant (a baseline, when one wins); this pairs it the same way (same
seed, same crawl, mean R@1 on the test split) from each `benchmark_<crawl>.json`, and writes
`default_paired.json` beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tldr_tasks.benchmark import default_paired


def main(folder: str = "benchmarks/results") -> None:
    files = sorted(Path(folder).glob("benchmark_*.json"))
    results = {}
    for path in files:
        result = json.loads(path.read_text())
        if "crawl" in result and "chosen_on_validation" in result:
            results[result["crawl"]] = default_paired(result)
    (Path(folder) / "default_paired.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    for crawl, result in results.items():
        print(crawl, ", ".join(f"{name} {d['mean']:+.1f} ± {d['ci95']:.1f} (≥ {d['lower']:.1f})"
                               for name, d in result["paired_differences"].items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
