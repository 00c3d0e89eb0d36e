"""k-means seeding chosen on validation: the default selection under greedy k-means++ against AFK-MC2.

    .venv/bin/tldr-vlp benchmark --seeds 0,1,2 --variants semdedup --out runs/bench_kmeanspp \
        --set cluster.init=kmeans++
    .venv/bin/python benchmarks/kmeans_init.py runs/bench_kmeanspp

The published benchmark files (`benchmarks/results/benchmark_<crawl>.json`) ran with the default
seeding, AFK-MC2. This pairs their default selection with the same selection, seeds and crawls
clustered with `cluster.init=kmeans++` (mean R@1, validation split for the choice, test split
reported beside it). The arms that do not cluster (full, random, oracle_clean) must come out the
same in both runs: `baselines_max_abs_diff` checks that the published files still reproduce.
Writes `benchmarks/results/kmeans_init.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tldr_tasks.benchmark import summarise

RESULTS = Path(__file__).parent / "results"
BASELINES = ("full", "random", "oracle_clean")


def values(result: dict, split: str, arm: str) -> list[float]:
    table = result["validation"] if split == "validation" else result["arms"]
    return table[arm]["mean_r1"]["values"]


def compare(published: dict, kmeanspp: dict) -> dict:
    arm = published["chosen_on_validation"]["default"]
    out = {"arm": arm}
    for split in ("validation", "test"):
        afk, kpp = values(published, split, arm), values(kmeanspp, split, arm)
        out[split] = {"afk_mc2": summarise(afk), "kmeans++": summarise(kpp),
                      "kmeans++ - afk_mc2": summarise([b - a for a, b in zip(afk, kpp)])}
    out["baselines_max_abs_diff"] = max(
        float(np.max(np.abs(np.subtract(values(published, split, name), values(kmeanspp, split, name)))))
        for name in BASELINES for split in ("validation", "test"))
    return out


def main(folder: str) -> None:
    crawls = {}
    for path in sorted(Path(folder).glob("benchmark_*.json")):
        kmeanspp = json.loads(path.read_text())
        crawls[kmeanspp["crawl"]] = compare(json.loads((RESULTS / path.name).read_text()), kmeanspp)
    validation = {init: float(np.mean([c["validation"][init]["mean"] for c in crawls.values()]))
                  for init in ("afk_mc2", "kmeans++")}
    result = {"crawls": crawls, "validation_mean_r1": validation,
              "chosen_on_validation": max(validation, key=validation.get)}
    (RESULTS / "kmeans_init.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps({"validation_mean_r1": validation, "chosen": result["chosen_on_validation"],
                      "baselines_max_abs_diff": {k: c["baselines_max_abs_diff"] for k, c in crawls.items()}}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_kmeanspp")
