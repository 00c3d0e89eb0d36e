"""Is the ratio curve's proxy right? Its curve against the benchmark's evaluation model at the same ratios (issue 27).

    .venv/bin/python benchmarks/auto_ratio.py [--seeds 0,1,2] [--crawls synthetic,synthetic_correlated,real_emoji]

For every crawl and seed: the benchmark's crawl (tldr_tasks.benchmark.make_benchmark_crawl, its PROFILE) and one
captioner, then with the default selection rule
    auto      `compress` with sample.ratio=auto: the proxy's curve (tldr_tasks/curve.py: locked-tower heads on each
              subset's cached features, R@10 on the validation split carved from the crawl, curve_seeds head
              seeds) and the ratio auto chooses;
    r<ratio>  at every curve ratio, `compress` with that ratio and the same carved split (sample.curve on, a
              one-point curve), evaluated by the benchmark's evaluation model (PROFILE's evaluate section: both
              budgets) on the crawl's clean held-out validation and test splits.
Every run clusters into the number of clusters auto uses (kmeans.AUTO_CLUSTER_RATIO), so the subset a run keeps
at a ratio is the one the curve scored there. One file per (crawl, seed) under `--out`/results, skipped when
present (resumable); the summary goes to `benchmarks/results/auto_ratio.json`: per crawl, the proxy's and the
evaluation model's curves (mean and 95% CI over seeds, validation mean R@1 for the model), the Spearman rank
correlation of their means over the ratios per budget, and the ratio auto's rule chooses on each curve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUDGET_ARMS = {"compute": "tldr", "epochs": "tldr_epochs"}  # evaluate's arm name per budget


def compressed(cfg, io, with_eval: bool) -> float:
    """Seconds of one `compress` (0 when its folder was finished before)."""
    from tldr_tasks.runner import compress

    start = time.perf_counter()
    compress(cfg, io, with_eval=with_eval)
    return round(time.perf_counter() - start, 1)


def run_one(out: Path, crawl: str, seed: int) -> dict:
    """One (crawl, seed): from its file under `out`, else measured now."""
    from tldr_tasks import storage
    from tldr_tasks.benchmark import PROFILE, make_benchmark_crawl
    from tldr_tasks.config import _merge, from_dict
    from tldr_tasks.contract import StageIO
    from tldr_tasks.preflight import count_input_samples
    from tldr_tasks.runner import load_stage_module
    from tldr_tasks.stages.kmeans import cluster_count

    path = out / "results" / f"{crawl}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    root = out / crawl / f"seed{seed}"
    cfg = from_dict(_merge(PROFILE, {"seed": seed})).validate()
    started = time.perf_counter()
    main, _, held_out = make_benchmark_crawl(root, crawl, cfg, seed)
    base = StageIO(input=main, out=str(root / "captioner-run"), eval_input=held_out)
    load_stage_module("train-captioner").run(cfg, base)
    seconds = {"crawl_and_captioner": round(time.perf_counter() - started, 1)}

    def variant(name: str, **sample) -> tuple:
        clusters = cluster_count(from_dict(_merge(cfg.to_dict(), {"sample": {"ratio": "auto"}})),
                                 count_input_samples(storage.expand_shards(main)))
        vcfg = from_dict(_merge(cfg.to_dict(), {"sample": sample, "cluster": {"clusters": clusters},
                                                "evaluate": {"arms": ["tldr"]}})).validate()
        return vcfg, StageIO(input=main, out=str(root / name), eval_input=held_out, captioner=base.captioner_dir,
                             embed_cache=str(root / "embed"))

    auto_cfg, auto_io = variant("auto", ratio="auto")
    seconds["auto"] = compressed(auto_cfg, auto_io, with_eval=False)
    proxy = json.loads(Path(auto_io.sample_dir, "curve.json").read_text())
    model = {}
    for ratio in auto_cfg.sample.curve_ratios:
        name = f"r{ratio:g}"
        vcfg, io = variant(name, ratio=ratio, curve=True, curve_ratios=[1.0], curve_seeds=1)
        seconds[name] = compressed(vcfg, io, with_eval=True)
        report = json.loads(Path(io.evaluate_dir, "report.json").read_text())
        model[str(ratio)] = {budget: {split: report["arms"][arm][split]["mean_r1"] for split in ("validation", "test")}
                             for budget, arm in BUDGET_ARMS.items() if arm in report["arms"]}
    result = {"crawl": crawl, "seed": seed, "proxy": proxy, "model": model, "seconds": seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(runs: list[dict]) -> dict:
    """Per crawl: both curves over the seeds, their rank correlation per budget, and auto's choice on each."""
    from scipy import stats

    from tldr_tasks.benchmark import summarise
    from tldr_tasks.curve import choose_ratio

    def chosen(curve: dict, tolerance: float) -> float:
        return choose_ratio([{"ratio": float(r), "mean": s["mean"], "low": s["mean"] - s["ci95"]}
                             for r, s in curve.items()], tolerance)

    table = {}
    for crawl in sorted({r["crawl"] for r in runs}):
        mine = [r for r in runs if r["crawl"] == crawl]
        tolerance = mine[0]["proxy"]["tolerance"]
        ratios = [p["ratio"] for p in mine[0]["proxy"]["points"]]
        proxy = {str(ratio): summarise([next(p["mean"] for p in r["proxy"]["points"] if p["ratio"] == ratio)
                                        for r in mine]) for ratio in ratios}
        row = {"seeds": [r["seed"] for r in mine], "tolerance": tolerance, "proxy": proxy,
               "proxy_metric": mine[0]["proxy"]["metric"],
               "proxy_chosen_per_seed": [r["proxy"]["chosen_ratio"] for r in mine],
               "proxy_chosen": chosen(proxy, tolerance), "model": {}, "spearman": {}, "model_chosen": {}}
        for budget in BUDGET_ARMS:
            if not all(budget in r["model"][str(ratio)] for r in mine for ratio in ratios):
                continue
            curve = {split: {str(ratio): summarise([r["model"][str(ratio)][budget][split] for r in mine])
                             for ratio in ratios} for split in ("validation", "test")}
            row["model"][budget] = curve
            row["spearman"][budget] = float(stats.spearmanr([proxy[str(r)]["mean"] for r in ratios],
                                                            [curve["validation"][str(r)]["mean"] for r in ratios])[0])
            row["model_chosen"][budget] = chosen(curve["validation"], tolerance)
        table[crawl] = row
    return table


def main(argv: list[str] | None = None) -> None:
    from tldr_tasks.benchmark import CRAWLS, machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crawls", default=",".join(CRAWLS))
    parser.add_argument("--out", default="runs/auto_ratio")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for crawl in args.crawls.split(","):
            runs.append(run_one(Path(args.out), crawl, seed))
            print(json.dumps({"crawl": crawl, "seed": seed, "proxy_chosen": runs[-1]["proxy"]["chosen_ratio"],
                              "seconds": runs[-1]["seconds"]}), flush=True)
            result = {"machine": machine(), "summary": summary(runs), "runs": runs}
            (Path(args.results) / "auto_ratio.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary(runs), indent=1))


if __name__ == "__main__":
    main()
