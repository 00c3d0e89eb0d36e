"""Pretrained start against from scratch, same budget: does a captioner that starts from ImageNet and BERT
describe what it did not memorise? (issue 24)

    .venv/bin/python benchmarks/captioner_pretrained.py [--seeds 0,1,2] [--crawls synthetic,real_emoji]

For every crawl and seed the benchmark's crawl (tldr_tasks.benchmark.make_benchmark_crawl) trains two
cross-fitted captioners (captioner.folds=2, the benchmark's PROFILE: 4 epochs, batch 32) per arm:
    scratch     the `tiny` preset: conv stem + ViT, GPT-2 decoder, both from random init (64 px)
    pretrained  the `pretrained` preset: frozen EfficientNet-Lite0 grid (128 px, cached once) -> codebook ->
                the first 3 layers of MiniLM-L6 as a BERT decoder with new cross-attention
and measures them as benchmarks/captioner_quality.py does (held-out accuracy head/tail, out-of-fold accuracy,
the collapse check). One file per (crawl, seed, arm) under `--out`, skipped when present, and a run already in
the committed results file is not measured again (resumable across sessions); the summary, mean and per seed,
goes to `benchmarks/results/captioner_pretrained.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tldr_tasks.benchmark import PROFILE, machine, make_benchmark_crawl, summarise
from tldr_tasks.config import _merge, from_dict

RESULTS = Path(__file__).parent / "results"
ARMS = {  # the new arm first: a run cut short still has it (the scratch arm's seed 0 is in captioner_quality.json)
    "pretrained": {"captioner": {"preset": "pretrained", "image_size": 128}},
    "scratch": {},
}
METRICS = ("heldout_accuracy", "heldout_accuracy_head", "heldout_accuracy_tail", "out_of_fold_accuracy",
           "entropy_ratio", "train_seconds")


def run_one(out: Path, crawl: str, seed: int, arm: str, committed: list[dict]) -> dict:
    """One (crawl, seed, arm): from its file under `out`, else from the committed results (a later session's
    checkout has no runs/ folder), else measured now."""
    from captioner_quality import measure

    path = out / "results" / f"{crawl}-seed{seed}-{arm}.json"
    if path.exists():
        return json.loads(path.read_text())
    done = [r for r in committed if (r["crawl"], r["seed"], r["arm"]) == (crawl, seed, arm)]
    if done:
        return done[0]
    root = out / crawl / f"seed{seed}"
    make_benchmark_crawl(root, crawl, from_dict(_merge(PROFILE, {"seed": seed})).validate(), seed)
    result = {"crawl": crawl, "seed": seed, "arm": arm, **measure(root, arm, ARMS[arm], seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(runs: list[dict]) -> dict:
    table: dict = {}
    for crawl in sorted({r["crawl"] for r in runs}):
        for arm in ARMS:
            mine = [r for r in runs if r["crawl"] == crawl and r["arm"] == arm]
            if not mine:
                continue
            row = {m: summarise([r[m] for r in mine if r[m] is not None]) for m in METRICS}  # None: not timed
            row["collapsed_seeds"] = sum(bool(r["collapsed"]) for r in mine)
            row["seeds"] = [r["seed"] for r in mine]
            table.setdefault(crawl, {})[arm] = row
    return table


def paired(runs: list[dict]) -> dict:
    """Per crawl, pretrained minus scratch on the same crawl and seed (the seeds both arms have), per accuracy."""
    out: dict = {}
    for crawl in sorted({r["crawl"] for r in runs}):
        by = {(r["arm"], r["seed"]): r for r in runs if r["crawl"] == crawl}
        seeds = sorted(s for a, s in by if a == "pretrained" and ("scratch", s) in by)
        if seeds:
            out[crawl] = {"seeds": seeds, **{m: summarise([by["pretrained", s][m] - by["scratch", s][m] for s in seeds])
                                            for m in METRICS[:4]}}
    return out


def markdown(table: dict) -> str:
    """The summary as the table docs/benchmarks.md shows: mean ± 95% CI over seeds (the mean alone for one seed),
    accuracies in %."""
    lines = ["| crawl | start | seeds | held-out accuracy | head scenes | tail scenes | out-of-fold accuracy | "
             "collapsed (seeds) | caption entropy / originals' | train s |", "|---" * 10 + "|"]
    for crawl, arms in table.items():
        for arm, row in arms.items():
            def cell(metric, scale=100.0, digits=1, row=row):
                stat = row[metric]
                mean = f"{stat['mean'] * scale:.{digits}f}"
                return mean if len(stat["values"]) < 2 else f"{mean} ± {stat['ci95'] * scale:.{digits}f}"
            lines.append(f"| {crawl} | {arm} | {len(row['seeds'])} | {cell('heldout_accuracy')} | "
                         f"{cell('heldout_accuracy_head')} | {cell('heldout_accuracy_tail')} | "
                         f"{cell('out_of_fold_accuracy')} | {row['collapsed_seeds']} of {len(row['seeds'])} | "
                         f"{cell('entropy_ratio', 1.0, 2)} | {cell('train_seconds', 1.0, 0)} |")
    return "\n".join(lines) + "\n"


def paired_markdown(differences: dict) -> str:
    """`paired`'s table as docs/benchmarks.md shows it: points of accuracy, mean ± 95% CI over the seeds."""
    lines = ["| crawl | held-out | tail scenes | out-of-fold |", "|---|---|---|---|"]
    for crawl, row in sorted(differences.items(), key=lambda item: item[0] != "synthetic"):
        cells = [f"{100 * row[m]['mean']:+.1f} ± {100 * row[m]['ci95']:.1f}"
                 for m in ("heldout_accuracy", "heldout_accuracy_tail", "out_of_fold_accuracy")]
        lines.append(f"| {crawl} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crawls", default="synthetic,real_emoji")
    parser.add_argument("--out", default="runs/captioner_pretrained")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    results_file = Path(args.results) / "captioner_pretrained.json"
    committed = json.loads(results_file.read_text())["runs"] if results_file.exists() else []
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in ARMS:
            for crawl in args.crawls.split(","):
                runs.append(run_one(Path(args.out), crawl, seed, arm, committed))
                print(json.dumps({k: runs[-1][k] for k in ("crawl", "seed", "arm", *METRICS, "collapsed")}),
                      flush=True)
                result = {"machine": machine(), "arms": ARMS, "profile": PROFILE, "summary": summary(runs),
                          "pretrained_minus_scratch": paired(runs), "runs": runs}
                (Path(args.results) / "captioner_pretrained.json").write_text(json.dumps(result, indent=1) + "\n")
                (Path(args.results) / "captioner_pretrained.md").write_text(markdown(result["summary"]))
                (Path(args.results) / "captioner_pretrained_paired.md").write_text(
                    paired_markdown(result["pretrained_minus_scratch"]))
    print(json.dumps(summary(runs), indent=1))


if __name__ == "__main__":
    main()
