"""Which evaluation model can tell data apart? Discriminative power on validation, per crawl and model.

    nice -n 5 .venv/bin/python benchmarks/eval_power.py --out runs/eval_power \
        --models towers-locked:10,towers-lit:5,small:5 --crawls synthetic,synthetic_correlated,real_emoji

Power = (oracle_clean - random) / pooled seed-to-seed SD of validation mean R@1, where the pooled SD is
sqrt((SD_oracle^2 + SD_random^2) / 2) over the seeds: how many noise widths the clean ceiling stands above a
random subset of the same size. The arms, the budget (compute-matched: 5 epochs of the ~4,500-pair arm pool)
and the scoring are the evaluation stage's own (`stages/evaluate.py` build_arms / train_and_score), on the
benchmark's crawls (`tldr_tasks.benchmark`: PROFILE, make_benchmark_crawl, the same reference quarter held
out), at ratio 0.25. One crawl per kind (`--crawl-seed`); a seed changes the subsets, the initialisation
and the batch order. The pretrained towers' features are computed once per crawl (cached below
`<out>/<crawl>/features`).

Resumable: one file per crawl, model and seed (`<out>/<crawl>/<model>/seed<N>.json`), skipped when present.
The summary goes to `benchmarks/results/eval_power.json` and `.md`. The from-scratch `small` CLIP also gets
the published benchmark's per-seed validation numbers (`benchmark_<crawl>.json`, where each seed is a crawl
of its own: a harder test of the spread) as the row `small (benchmark)`.
The winner (best power averaged over the crawls, stated before the run) is the benchmark's evaluation preset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tldr_tasks.benchmark import CRAWLS, PROFILE, machine, make_benchmark_crawl
from tldr_tasks.config import _merge, from_dict

RESULTS = Path(__file__).parent / "results"
ARMS = ("oracle_clean", "random")
FIRST_ROUND = 3  # seeds every crawl gets before any crawl gets more (a slow model still covers every crawl)


def crawl_config(model: str, seed: int):
    """The benchmark's profile with `model` as the evaluation preset; no learning-curve checkpoints."""
    return from_dict(_merge(from_dict(PROFILE).to_dict(), {
        "seed": seed, "evaluate": {"preset": model, "arms": list(ARMS), "budgets": ["compute"], "curve_points": []}}
    )).validate()


def run_crawl(out: Path, crawl: str, models: dict[str, int], crawl_seed: int) -> None:
    """Every missing (model, seed) result of one crawl."""
    import torch

    from tldr_tasks import storage
    from tldr_tasks.contract import StageIO
    from tldr_tasks.models import clip
    from tldr_tasks.stages import evaluate

    torch.set_num_threads(clip.available_cpus())
    root = out / crawl
    todo = {m: [s for s in range(n) if not (root / m / f"seed{s}.json").exists()] for m, n in models.items()}
    if not any(todo.values()):
        return
    main, _, held_out = make_benchmark_crawl(root, crawl, crawl_config("small", crawl_seed), crawl_seed)
    io = StageIO(input=main, out=str(root / "run"), eval_input=held_out, embed_cache=str(root / "features"))
    task = evaluate.load_task(held_out)
    for model, seeds in todo.items():
        if not seeds:
            continue
        with tempfile.TemporaryDirectory(prefix="eval-power-") as scratch:
            cfg = crawl_config(model, seeds[0])
            started = time.perf_counter()
            full = evaluate.spool(storage.expand_shards(main), cfg, io, f"{scratch}/input", "input")
            splits = evaluate.split_eval(evaluate.spool(storage.expand_shards(held_out), cfg, io, f"{scratch}/eval",
                                                        "eval"))
            setup = time.perf_counter() - started
            # the arms' size: what a selection at the ratio keeps (the evaluation sizes random and oracle_clean
            # like the compressed set it is given)
            size_of = full.take(np.arange(round(cfg.sample.ratio * len(full))))
            tokenizer = clip.make_tokenizer(model, iter(full.captions))
            steps = evaluate.training_steps(len(full), cfg.evaluate.epochs, cfg.evaluate.batch_size)
            for seed in seeds:
                cfg = crawl_config(model, seed)
                arms = evaluate.build_arms(list(ARMS), full, size_of, cfg, io)
                result = {"crawl": crawl, "crawl_seed": crawl_seed, "model": model, "seed": seed, "steps": steps,
                          "setup_seconds": round(setup, 1), "arms": {}}
                for name, arm in arms.items():
                    print(f"eval_power: {crawl} {model} seed {seed} {name}", file=sys.stderr, flush=True)
                    scored = evaluate.train_and_score(arm, tokenizer, splits, steps, cfg, task)
                    result["arms"][name] = {k: scored[k] for k in ("validation", "test", "train_seconds", "samples")}
                (root / model).mkdir(parents=True, exist_ok=True)
                (root / model / f"seed{seed}.json").write_text(json.dumps(evaluate._clean(result), indent=1))
                setup = 0.0


def power(oracle: list[float], random: list[float]) -> dict:
    """(mean oracle - mean random) / pooled SD, with the numbers behind it."""
    sd_o, sd_r = float(np.std(oracle, ddof=1)), float(np.std(random, ddof=1))
    pooled = float(np.sqrt((sd_o ** 2 + sd_r ** 2) / 2))
    gap = float(np.mean(oracle) - np.mean(random))
    return {"seeds": len(oracle), "oracle_clean": float(np.mean(oracle)), "random": float(np.mean(random)),
            "sd_oracle_clean": sd_o, "sd_random": sd_r, "pooled_sd": pooled, "gap": gap,
            "power": gap / pooled if pooled > 0 else None,
            "values": {"oracle_clean": [float(v) for v in oracle], "random": [float(v) for v in random]}}


def summarise(out: Path, crawls: list[str], models: dict[str, int]) -> dict:
    table: dict = {}
    for crawl in crawls:
        table[crawl] = {}
        published = json.loads((RESULTS / f"benchmark_{crawl}.json").read_text())["validation"]
        table[crawl]["small (benchmark)"] = power(published["oracle_clean"]["mean_r1"]["values"],
                                                  published["random"]["mean_r1"]["values"])
        for model, n in models.items():
            runs = [json.loads((out / crawl / model / f"seed{s}.json").read_text()) for s in range(n)
                    if (out / crawl / model / f"seed{s}.json").exists()]
            if len(runs) < 2:
                continue
            row = power(*[[r["arms"][a]["validation"]["mean_r1"] for r in runs] for a in ARMS])
            row["test"] = {a: float(np.mean([r["arms"][a]["test"]["mean_r1"] for r in runs])) for a in ARMS}
            row["train_seconds"] = float(np.mean([r["arms"][a]["train_seconds"] for r in runs for a in ARMS]))
            row["feature_seconds"] = max(r["setup_seconds"] for r in runs)
            row["steps"] = runs[0]["steps"]
            row["samples_per_arm"] = {a: runs[0]["arms"][a]["samples"] for a in ARMS}
            table[crawl][model] = row
    rows = list(dict.fromkeys(m for c in crawls for m in table[c]))
    candidates = [m for m in rows if all(m in table[c] and table[c][m]["power"] is not None for c in crawls)]
    mean_power = {m: float(np.mean([table[c][m]["power"] for c in crawls])) for m in candidates}
    return {"machine": machine(), "rule": "winner = the model with the highest power averaged over the crawls "
            "(validation mean R@1; power = (oracle_clean - random) / pooled seed-to-seed SD)",
            "crawls": crawls, "table": table, "mean_power": mean_power,
            "winner": max(mean_power, key=mean_power.get) if mean_power else None}


def markdown(summary: dict) -> str:
    """The table of docs/benchmarks.md: validation mean R@1, mean ± SD over the seeds; power; test means; the
    seconds one arm trained (the shared 2-core machine, other jobs running)."""
    lines = ["| crawl | model | seeds | oracle_clean | random | pooled SD | power | test oracle / random "
             "| s per arm |", "|---|---|---|---|---|---|---|---|---|"]
    for crawl, rows in summary["table"].items():
        for model, r in rows.items():
            test = f"{r['test']['oracle_clean']:.1f} / {r['test']['random']:.1f}" if "test" in r else "–"
            seconds = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "–"
            lines.append(f"| {crawl} | {model} | {r['seeds']} | {r['oracle_clean']:.1f} ± {r['sd_oracle_clean']:.1f} "
                         f"| {r['random']:.1f} ± {r['sd_random']:.1f} | {r['pooled_sd']:.2f} "
                         f"| {r['power']:.1f} | {test} | {seconds} |")
    lines += ["", "Mean power over the crawls: " + ", ".join(f"`{m}` {p:.1f}" for m, p in
                                                              summary["mean_power"].items())
              + f"; winner: `{summary['winner']}`."]
    return "\n".join(lines) + "\n"


DOCS_START, DOCS_END = "<!-- eval_power:start -->", "<!-- eval_power:end -->"


def update_docs(path: str, table: str) -> None:
    """Replace the block between DOCS_START and DOCS_END of a markdown file with `table`."""
    text = Path(path).read_text()
    head, rest = text.split(DOCS_START, 1)
    Path(path).write_text(f"{head}{DOCS_START}\n{table}{DOCS_END}{rest.split(DOCS_END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/eval_power")
    parser.add_argument("--crawls", default=",".join(CRAWLS))
    parser.add_argument("--models", default="towers-locked:10,towers-lit:5,small:5",
                        help="comma-separated evaluate.preset:seeds")
    parser.add_argument("--crawl-seed", type=int, default=0)
    parser.add_argument("--summary-only", action="store_true", help="write the summary from the results present")
    parser.add_argument("--docs", help="a markdown file whose eval_power block gets the table (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    out, crawls = Path(args.out), args.crawls.split(",")
    models = {m: int(n) for m, n in (item.split(":") for item in args.models.split(","))}
    if not args.summary_only:
        for model, seeds in models.items():  # one model at a time over every crawl: the cheapest finishes first
            for upto in sorted({min(FIRST_ROUND, seeds), seeds}):  # a few seeds on every crawl first, then the rest
                for crawl in crawls:
                    run_crawl(out, crawl, {model: upto}, args.crawl_seed)
    summary = summarise(out, crawls, models)
    (RESULTS / "eval_power.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / "eval_power.md").write_text(markdown(summary))
    if args.docs:
        update_docs(args.docs, markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
