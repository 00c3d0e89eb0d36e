"""The benchmark's protocol checks beyond its main run: other ratios, and a 4x longer budget.

    .venv/bin/python benchmarks/sweeps.py [--crawl synthetic_correlated] [--seed 0]

Runs `tldr-vlp benchmark`'s code for one crawl and one seed (the chosen TL;DR selection of the main
run, read from benchmarks/results/benchmark_<crawl>.json, beside clip_score and semdedup, plus full
and random): at sample.ratio 0.1 and 0.5, and at ratio 0.25 with evaluate.epochs x 4. One seed each:
points on a curve, not claims (no interval). Writes benchmarks/results/sweeps.json and
benchmarks/results/ratio_sweep.png (test mean R@1 against the ratio; 0.25 is the main run's seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tldr_tasks.benchmark import PROFILE, VARIANTS, benchmark
from tldr_tasks.config import _merge, from_dict

RESULTS = Path(__file__).parent / "results"
ARMS = ("full", "random", "tldr", "clip_score", "semdedup")


def run(crawl: str, seed: int, overrides: dict, out: str, tldr: str) -> dict:
    cfg = from_dict(_merge(from_dict(PROFILE).to_dict(), overrides)).validate()
    variants = [v for v in VARIANTS if v.name in (tldr, "clip_score", "semdedup")]
    variants.sort(key=lambda v: v.name != tldr)  # the chosen one first: it trains the baselines
    result = benchmark(out, cfg, [crawl], [seed], variants)[0]
    # the main run's choice, not this run's (one seed of one crawl chooses nothing)
    result["arms"]["tldr"] = result["arms"][tldr]
    return {arm: result["arms"][arm]["mean_r1"]["mean"] for arm in ARMS if arm in result["arms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crawl", default="synthetic_correlated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sweeps")
    args = parser.parse_args()
    main_run = json.loads((RESULTS / f"benchmark_{args.crawl}.json").read_text())
    tldr = main_run["chosen_on_validation"]["tldr"]
    index = main_run["seeds"].index(args.seed)
    at_quarter = {arm: main_run["arms"][arm]["mean_r1"]["values"][index] for arm in ARMS if arm in main_run["arms"]}
    points = {"0.25": at_quarter}
    for ratio in (0.1, 0.5):
        points[str(ratio)] = run(args.crawl, args.seed, {"sample": {"ratio": ratio}}, f"{args.out}/ratio{ratio}", tldr)
    epochs = 4 * PROFILE["evaluate"]["epochs"]
    long_budget = run(args.crawl, args.seed, {"evaluate": {"epochs": epochs, "budgets": ["compute"]}},
                      f"{args.out}/budget4x", tldr)
    result = {"crawl": args.crawl, "seed": args.seed, "split": "test", "metric": "mean_r1", "tldr_variant": tldr,
              "by_ratio": points, "budget_4x": {"evaluate_epochs": epochs, "ratio": 0.25, "mean_r1": long_budget,
                                                "at_1x": at_quarter}}
    (RESULTS / "sweeps.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "ratio_sweep.png")
    print(json.dumps(result, indent=1))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(result["by_ratio"], key=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        if arm == "full":
            ax.axhline(result["by_ratio"]["0.25"]["full"], color="grey", linestyle="--", label="full")
            continue
        ax.plot([float(r) for r in ratios], [result["by_ratio"][r].get(arm) for r in ratios], marker="o",
                label=f"tldr ({result['tldr_variant']})" if arm == "tldr" else arm)
    ax.set_xlabel("sample.ratio (share of the crawl kept)")
    ax.set_ylabel("test mean R@1 (%), one seed")
    ax.set_title(f"{result['crawl']}, seed {result['seed']}: R@1 against the ratio", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
