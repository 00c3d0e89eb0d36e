"""Is the ratio curve's proxy right? Its curve against the benchmark's evaluation model at the same ratios (issue 27).

    .venv/bin/python benchmarks/auto_ratio.py [--seeds 0,1,2] [--crawls synthetic,...] [--work runs/protocol]

The selection is what ships: params.yaml's `sample` rule, which must be one of docs/protocol.md's candidates
(tldr_tasks.protocol.shipped), run as the protocol runs it (tldr_tasks.protocol.config: the product's
captioners, `embed.feature: tower`, the `towers-locked` evaluation under both budgets). Each crawl and seed
starts from the protocol's work folder (`--work`): its crawl, reference CLIP, captioner and embed cache are
reused when that seed ran there and built the same way when not. Then
    auto      `compress` with sample.ratio=auto: the proxy's curve (tldr_tasks/curve.py: locked-tower heads on each
              subset's cached features, R@1 on the validation split carved from the crawl, curve_seeds head
              seeds) and the ratio auto chooses;
    r<ratio>  at every curve ratio, `compress` with that ratio and the same carved split (sample.curve on, a
              one-point curve), evaluated by the protocol's evaluation model on the crawl's held-out validation
              and test splits, in the crawl's primary metric (protocol.PRIMARY).
`--proxy-only`, after the proxy changed, makes the committed files' proxy curves again and keeps their
evaluation-model curves. Every run clusters into the number of clusters auto uses (kmeans.AUTO_CLUSTER_RATIO), so
the subset a run keeps at a ratio is the one the curve scored there. One committed file per crawl and seed,
`benchmarks/results/auto_ratio/<crawl>-seed<seed>.json`, skipped when present (resumable across sessions); the
summary goes to `benchmarks/results/auto_ratio.json`: per crawl, the proxy's and the evaluation model's curves
(mean and 95% CI over seeds), the Spearman rank correlation of their means over the ratios per budget, and the
ratio auto's rule chooses on each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"
SEED_DIR = RESULTS / "auto_ratio"
BUDGET_ARMS = {"compute": "tldr", "epochs": "tldr_epochs"}  # evaluate's arm name per budget
TOLERANCES = (0.02, 0.05, 0.1, 0.2)  # sample.auto_tolerance values whose promise is checked (tolerance_check)


def compressed(cfg, io, with_eval: bool) -> float:
    """Seconds of one `compress` (0 when its folder was finished before)."""
    from tldr_tasks.runner import compress

    start = time.perf_counter()
    compress(cfg, io, with_eval=with_eval)
    return round(time.perf_counter() - start, 1)


def shipped_variant():
    """The protocol candidate params.yaml ships; refused when it ships none of them."""
    from tldr_tasks import protocol
    from tldr_tasks.config import load_config

    name = protocol.shipped(load_config("params.yaml").to_dict()["sample"])
    if name is None:
        sys.exit("auto_ratio: params.yaml's sample section is none of docs/protocol.md's candidates; "
                 "this benchmark measures the shipped rule")
    return next(v for v in protocol.CANDIDATES if v.name == name)


def run_one(work: Path, crawl: str, seed: int, proxy_only: bool = False) -> dict:
    """One (crawl, seed): from its committed file, else measured now. `proxy_only` (after the proxy changed):
    the file's proxy curve is made again in a fresh `auto` folder, its evaluation-model curve kept (the subsets
    it trained on do not depend on the proxy)."""
    from tldr_tasks import protocol, storage
    from tldr_tasks.benchmark import machine, make_benchmark_crawl, train_reference_clip, variant_config
    from tldr_tasks.config import _merge, from_dict
    from tldr_tasks.contract import StageIO
    from tldr_tasks.preflight import count_input_samples
    from tldr_tasks.runner import load_stage_module
    from tldr_tasks.stages.kmeans import cluster_count

    path = SEED_DIR / f"{crawl}-seed{seed}.json"
    if path.exists() and not proxy_only:
        return json.loads(path.read_text())
    selection = shipped_variant()
    root = work / crawl / f"seed{seed}"
    cfg = from_dict({**protocol.config().to_dict(), "seed": seed}).validate()
    started = time.perf_counter()
    main, reference, held_out = make_benchmark_crawl(root, crawl, cfg, seed)
    clip_model = train_reference_clip(reference, cfg, root / "reference_clip", str(root / "embed"))
    base = StageIO(input=main, out=str(root / "captioner-run"), eval_input=held_out)
    load_stage_module("train-captioner").run(cfg, base)
    seconds = {"crawl_and_captioner": round(time.perf_counter() - started, 1)}
    samples = count_input_samples(storage.expand_shards(main))
    clusters = cluster_count(from_dict(_merge(cfg.to_dict(), {"sample": {"ratio": "auto"}})), samples)

    def variant(name: str, **sample) -> tuple:
        vcfg = variant_config(cfg, selection, samples, ["tldr"], clip_model)
        vcfg = from_dict(_merge(vcfg.to_dict(), {"sample": sample, "cluster": {"clusters": clusters}})).validate()
        return vcfg, StageIO(input=main, out=str(root / f"auto_ratio-{name}"), eval_input=held_out,
                             captioner=base.captioner_dir, embed_cache=str(root / "embed"))

    print(f"auto_ratio: {crawl} seed {seed}: auto", file=sys.stderr, flush=True)
    auto_cfg, auto_io = variant("auto", ratio="auto")
    if proxy_only:
        shutil.rmtree(auto_io.out, ignore_errors=True)
    seconds["auto"] = compressed(auto_cfg, auto_io, with_eval=False)
    proxy = json.loads(Path(auto_io.sample_dir, "curve.json").read_text())
    if proxy_only:
        result = {**json.loads(path.read_text()), "proxy": proxy}
        result["seconds"]["auto"] = seconds["auto"]
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result
    model = {}
    for ratio in auto_cfg.sample.curve_ratios:
        name = f"r{ratio:g}"
        print(f"auto_ratio: {crawl} seed {seed}: {name}", file=sys.stderr, flush=True)
        vcfg, io = variant(name, ratio=ratio, curve=True, curve_ratios=[1.0], curve_seeds=1)
        seconds[name] = compressed(vcfg, io, with_eval=True)
        report = json.loads(Path(io.evaluate_dir, "report.json").read_text())
        model[str(ratio)] = {budget: {split: protocol.primary_value(report["arms"][arm][split], crawl)
                                      for split in ("validation", "test")}
                             for budget, arm in BUDGET_ARMS.items() if arm in report["arms"]}
    result = {"crawl": crawl, "seed": seed, "selection": selection.name, "model_metric": protocol.PRIMARY[crawl],
              "machine": machine(),
              "proxy": proxy, "model": model, "seconds": seconds}
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
               "model_metric": mine[0]["model_metric"],
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
        row["tolerances"] = tolerance_check(mine, ratios)
        table[crawl] = row
    return table


def tolerance_check(runs: list[dict], ratios: list[float]) -> dict:
    """auto's promise at each of TOLERANCES, held against the evaluation model: per seed, the ratio the proxy's
    curve chooses (curve.choose_ratio, the seed's own intervals) and the evaluation model's validation loss there
    against its score on the whole rest, 1 - model(chosen) / model(1.0), per budget. The promise holds on a seed
    when that loss is at most the tolerance."""
    from tldr_tasks.curve import choose_ratio

    out = {}
    for tolerance in TOLERANCES:
        chosen = [choose_ratio(r["proxy"]["points"], tolerance) for r in runs]
        loss = {budget: [1 - r["model"][str(c)][budget]["validation"] / r["model"]["1.0"][budget]["validation"]
                         for r, c in zip(runs, chosen)]
                for budget in BUDGET_ARMS if all(budget in r["model"][str(x)] for r in runs for x in ratios)}
        holds = {budget: all(v <= tolerance for v in values) for budget, values in loss.items()}
        out[str(tolerance)] = {"proxy_chosen_per_seed": chosen, "model_loss_per_seed": loss, "holds_every_seed": holds}
    return out


def markdown(table: dict) -> str:
    """docs/benchmarks.md's tables from the summary: per crawl and ratio both curves (mean ± 95% CI over the seeds),
    their rank correlation and choices; then auto's promise per tolerance."""
    crawls = sorted(table)

    def cell(stat: dict) -> str:
        return f"{stat['mean']:.1f} ± {stat['ci95']:.1f}"

    lines = ["| crawl | ratio | proxy: mean R@1, carved split | evaluation model, compute-matched: validation "
             "| evaluation model, epoch-matched: validation |", "|---|---|---|---|---|"]
    for crawl in crawls:
        row = table[crawl]
        for ratio, stat in row["proxy"].items():
            model = [cell(row["model"][b]["validation"][ratio]) if b in row["model"] else "-" for b in BUDGET_ARMS]
            lines.append(f"| {crawl} | {float(ratio):g} | {cell(stat)} | {' | '.join(model)} |")
    lines += ["", "| crawl | evaluation metric | seeds | Spearman, proxy vs model (compute / epochs) "
              "| ratio chosen at tolerance 0.05 by the proxy's mean curve / the model's (compute / epochs) "
              "| the proxy's choice per seed |", "|---|---|---|---|---|---|"]
    for crawl in crawls:
        row = table[crawl]
        rho = " / ".join(f"{row['spearman'][b]:+.2f}" for b in BUDGET_ARMS if b in row["spearman"])
        model = " / ".join(f"{row['model_chosen'][b]:g}" for b in BUDGET_ARMS if b in row["model_chosen"])
        per_seed = ", ".join(f"{c:g}" for c in row["proxy_chosen_per_seed"])
        lines.append(f"| {crawl} | {row['model_metric']} | {len(row['seeds'])} | {rho} "
                     f"| {row['proxy_chosen']:g} / {model} | {per_seed} |")
    lines += ["", "| tolerance | " + " | ".join(crawls) + " |", "|---" * (len(crawls) + 1) + "|"]
    for tolerance in map(str, TOLERANCES):
        cells = []
        for crawl in crawls:
            check = table[crawl]["tolerances"][tolerance]
            losses = check["model_loss_per_seed"]["compute"]
            cells.append(", ".join(f"{c:g}: {100 * v:+.1f}%" for c, v in zip(check["proxy_chosen_per_seed"], losses))
                         + (" (holds)" if check["holds_every_seed"]["compute"] else " (**broken**)"))
        lines.append(f"| {tolerance} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from tldr_tasks import protocol
    from tldr_tasks.benchmark import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crawls", default=",".join(protocol.CRAWLS))
    parser.add_argument("--work", default="runs/protocol", help="the protocol's work folder, shared")
    parser.add_argument("--summarise-only", action="store_true", help="run nothing: only auto_ratio.json")
    parser.add_argument("--proxy-only", action="store_true",
                        help="after the proxy changed: make the committed files' proxy curves again, keep the rest")
    args = parser.parse_args(argv)
    for seed in [] if args.summarise_only else [int(s) for s in args.seeds.split(",")]:
        for crawl in args.crawls.split(","):
            run = run_one(Path(args.work), crawl, seed, args.proxy_only)
            print(json.dumps({"crawl": crawl, "seed": seed, "proxy_chosen": run["proxy"]["chosen_ratio"],
                              "seconds": run["seconds"]}), flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(SEED_DIR.glob("*-seed*.json"))]
    if runs:
        result = {"machine": machine(), "selection": sorted({r["selection"] for r in runs}),
                  "summary": summary(runs)}
        (RESULTS / "auto_ratio.json").write_text(json.dumps(result, indent=1) + "\n")
        from protocol import write_block  # benchmarks/protocol.py

        write_block(DOCS, "auto_ratio", markdown(result["summary"]))
        print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
