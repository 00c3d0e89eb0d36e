"""Would another proxy agree better with the evaluation model? The ratio curve's proxy (tldr_tasks/curve.py) against
three variants, on auto_ratio.py's runs (issue 27, item 3: what was tried).

    .venv/bin/python benchmarks/proxy_variants.py [--seeds 0,1,2] [--crawls synthetic,...] [--work runs/protocol]

Runs after `benchmarks/auto_ratio.py` on the same work folder: per crawl and seed it reads the subsets auto_ratio's
`r<ratio>` runs kept (sample/selected.parquet), the validation split its `auto` run carved (sample/holdout.parquet)
and the crawl's cached tower features, and trains the proxy's heads (scoring.REFERENCE_PRESET, head seeds
seed+1 ... seed+3, as the proxy does) on every subset under two budgets:
    e20   20 epochs of the subset's own pairs (scoring.REFERENCE_EPOCHS: the proxy as it ships)
    cm5   the same steps at every ratio, 5 epochs of the whole rest (the protocol's compute-matched budget)
and scores each on the carved split by R@1 and R@10 (mean of image->text and text->image, captions as groups): four
proxies: e20-R@10 shipped when they were run, and e20-R@1 ships since (it held auto's promise more often, on the
seeds it was found on and on the fresh ones). Per proxy and crawl it gives the Spearman correlation of the mean curve
with the evaluation model's (compute-matched, validation, from auto_ratio's files) and, at each tolerance of
auto_ratio.TOLERANCES, the ratio auto would choose per seed and the evaluation model's loss there
(auto_ratio.tolerance_check). One file per crawl and seed in `benchmarks/results/proxy_variants/`, skipped when
present; the summary is `benchmarks/results/proxy_variants.json`, one for the seeds the variants were found on
(FOUND_ON) and one for the fresh seeds that check them.

The variants were looked at after auto_ratio's results, on the same seeds: a difference between them here chooses
nothing until fresh seeds confirm it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SEED_DIR = RESULTS / "proxy_variants"
DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"
BUDGETS = {"e20": 20, "cm5": 5}  # epochs: of the subset's own pairs (e20), of the whole rest at every ratio (cm5)
SHIPPED = "e20-r1"  # the proxy tldr_tasks/curve.py ships (before these results: e20-r10)
FOUND_ON = (0, 1, 2)  # the seeds the variants were looked at on, after auto_ratio's results; others check them


def run_one(work: Path, crawl: str, seed: int) -> dict:
    """Every variant's scores per ratio and head seed for one crawl and seed (from its file when present)."""
    import torch

    from tldr_tasks import protocol, storage
    from tldr_tasks.benchmark import make_benchmark_crawl
    from tldr_tasks.config import from_dict
    from tldr_tasks.models import clip
    from tldr_tasks.models.towers_clip import Rows, cached_features
    from tldr_tasks.scoring import REFERENCE_PRESET, feature_rows

    path = SEED_DIR / f"{crawl}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    root = work / crawl / f"seed{seed}"
    cfg = from_dict({**protocol.config().to_dict(), "seed": seed}).validate()
    main, _, _ = make_benchmark_crawl(root, crawl, cfg, seed)
    keys, features, captions, _ = cached_features(storage.expand_shards(main), clip.load_preset(REFERENCE_PRESET),
                                                  str(root / "embed"), "input")
    carved = storage.read_parquet(str(root / "auto_ratio-auto" / "sample" / "holdout.parquet"))["key"].to_pylist()
    held = [r for r in feature_rows(keys, carved) if captions[r].strip()]
    held_captions = [captions[r] for r in held]
    ratios = cfg.sample.curve_ratios
    kept = {r: storage.read_parquet(str(root / f"auto_ratio-r{r:g}" / "sample" / "selected.parquet"))["key"].to_pylist()
            for r in ratios}
    ev = cfg.evaluate
    scores: dict = {}
    for budget, epochs in BUDGETS.items():
        for ratio in ratios:
            rows = [r for r in feature_rows(keys, kept[ratio]) if captions[r].strip()]
            steps = epochs * clip.epoch_batches(len(rows) if budget == "e20" else len(kept[1.0]), ev.batch_size)
            for head in range(3):
                model, _ = clip.train_clip(Rows(features[rows]), [captions[r] for r in rows],
                                           clip.make_tokenizer(REFERENCE_PRESET, []), steps=steps,
                                           batch_size=ev.batch_size, lr=ev.lr, seed=seed + head + 1,
                                           preset=REFERENCE_PRESET, desc=f"{crawl} {seed} {budget} {ratio:g}")
                with torch.no_grad():
                    m = clip.retrieval_metrics(clip.embed_images(model, features[held]),
                                               clip.embed_texts(model, None, held_captions), held_captions,
                                               held_captions, ks=(1, 10))
                for k in (1, 10):
                    scores.setdefault(f"{budget}-r{k}", {}).setdefault(str(ratio), []).append(
                        (m[f"i2t_r{k}"] + m[f"t2i_r{k}"]) / 2)
    result = {"crawl": crawl, "seed": seed, "holdout": len(held), "scores": scores}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(runs: list[dict]) -> dict:
    """Per crawl and proxy: Spearman of the mean curves, and auto's promise at each tolerance (tolerance_check)."""
    from auto_ratio import SEED_DIR as AUTO_DIR
    from auto_ratio import tolerance_check
    from scipy import stats

    from tldr_tasks.curve import interval

    table: dict = {}
    for crawl in sorted({r["crawl"] for r in runs}):
        mine = sorted((r for r in runs if r["crawl"] == crawl), key=lambda r: r["seed"])
        auto = [json.loads((AUTO_DIR / f"{crawl}-seed{r['seed']}.json").read_text()) for r in mine]
        ratios = [float(x) for x in mine[0]["scores"]["e20-r10"]]
        model = [np.mean([a["model"][str(x)]["compute"]["validation"] for a in auto]) for x in ratios]
        table[crawl] = {"seeds": [r["seed"] for r in mine]}
        for proxy in mine[0]["scores"]:
            curves = []
            for run, a in zip(mine, auto):
                points = []
                for x in ratios:
                    mean, low, high = interval(run["scores"][proxy][str(x)])
                    points.append({"ratio": x, "mean": mean, "low": low, "high": high})
                curves.append({"proxy": {"points": points}, "model": a["model"]})
            means = [np.mean([c["proxy"]["points"][i]["mean"] for c in curves]) for i in range(len(ratios))]
            table[crawl][proxy] = {"mean_curve": dict(zip(map(str, ratios), means)),
                                   "spearman": float(stats.spearmanr(means, model)[0]),
                                   "tolerances": tolerance_check(curves, ratios)}
    return table


def markdown(table: dict) -> str:
    """docs/benchmarks.md's table: per proxy, its Spearman correlation with the evaluation model on each crawl and
    on how many crawl-seeds auto's promise held at each tolerance (compute-matched budget)."""
    from auto_ratio import TOLERANCES

    crawls = sorted(table)
    proxies = [p for p in table[crawls[0]] if p != "seeds"]
    head = " | ".join(f"Spearman: {c}" for c in crawls)
    held = " | ".join(f"promise held at {t:g}" for t in TOLERANCES)
    lines = [f"| proxy | {head} | {held} |", "|---" * (1 + len(crawls) + len(TOLERANCES)) + "|"]
    for proxy in proxies:
        counts = []
        for t in map(str, TOLERANCES):
            losses = [v for c in crawls for v in table[c][proxy]["tolerances"][t]["model_loss_per_seed"]["compute"]]
            counts.append(f"{sum(v <= float(t) for v in losses)} of {len(losses)}")
        rho = " | ".join(f"{table[c][proxy]['spearman']:+.2f}" for c in crawls)
        name = f"**{proxy}** (ships)" if proxy == SHIPPED else proxy
        lines.append(f"| {name} | {rho} | {' | '.join(counts)} |")
    seeds = sorted({s for c in crawls for s in table[c]["seeds"]})
    return "\n".join(lines) + f"\n\nSeeds {', '.join(map(str, seeds))}.\n"


def page(result: dict) -> str:
    """The seeds the variants were found on, then the fresh seeds that check them (when they have run)."""
    text = "Found on:\n\n" + markdown(result["found_on"])
    return text + ("\nFresh seeds, the check:\n\n" + markdown(result["fresh"]) if "fresh" in result else "")


def main(argv: list[str] | None = None) -> None:
    from tldr_tasks import protocol
    from tldr_tasks.benchmark import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crawls", default=",".join(protocol.CRAWLS))
    parser.add_argument("--work", default="runs/protocol", help="auto_ratio.py's work folder")
    parser.add_argument("--summarise-only", action="store_true", help="run nothing: only proxy_variants.json")
    args = parser.parse_args(argv)
    for seed in [] if args.summarise_only else [int(s) for s in args.seeds.split(",")]:
        for crawl in args.crawls.split(","):
            run_one(Path(args.work), crawl, seed)
    runs = [json.loads(p.read_text()) for p in sorted(SEED_DIR.glob("*-seed*.json"))]
    groups = {"found_on": [r for r in runs if r["seed"] in FOUND_ON],
              "fresh": [r for r in runs if r["seed"] not in FOUND_ON]}
    if runs:
        result = {"machine": machine(), **{name: summary(group) for name, group in groups.items() if group}}
        (RESULTS / "proxy_variants.json").write_text(json.dumps(result, indent=1) + "\n")
        from protocol import write_block  # benchmarks/protocol.py

        write_block(DOCS, "proxy_variants", page(result))
        print(page(result))


if __name__ == "__main__":
    main()
