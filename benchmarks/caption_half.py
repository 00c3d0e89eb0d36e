"""The caption half with the pretrained captioner (issue 25, item 7): do generated captions, fused or as repair,
make the default selection's data better than its original captions?

    .venv/bin/python benchmarks/caption_half.py [--crawls synthetic,...] [--seeds 0,1,2] [--out runs/caption_half]

docs/benchmarks.md "The caption half with the pretrained captioner" holds the protocol, written before the first
run: the protocol's crawls, size and evaluation (tldr_tasks/protocol.py: PROFILE, each crawl's primary metric,
the compute-matched budget), the shipped selection (clip_balanced) and the product's cross-fitted pretrained
captioners, 3 beams and caption gate. Two compressions per crawl and seed:
    fusions  the default selection shipped with `caption.fusion: generated`; its evaluation also trains the same
             selection with the originals (what ships today), `concat` and `mix`, and random with and without
             generated captions
    repair   the filter's repair (sample.misaligned: repair): the dropped pairs captioned and scored again by
             the same reference; its evaluation also trains its selection with the originals (`repair_original`)
One results file per crawl and seed, `benchmarks/results/caption_half/<crawl>-seed<N>.json`, skipped when present
(resumable); `caption_half.json` and the table in docs/benchmarks.md once every crawl has every seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tldr_tasks import protocol
from tldr_tasks.benchmark import machine, summarise

RESULTS = Path(__file__).parent / "results"
SEED_DIR = RESULTS / "caption_half"
DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"
README = Path(__file__).parent.parent / "README.md"
SEEDS = (0, 1, 2)
CAPTIONER = {"captioner": {"preset": "pretrained", "image_size": 128}}  # issue 24's pretrained captioner
# compression -> (what it changes in the shipped configuration, the evaluation's arms)
RUNS = {
    "fusions": ({"caption": {"fusion": "generated"}},
                ["full", "random", "random_generated", "tldr", "tldr_original", "tldr_concat", "tldr_mix"]),
    "repair": ({"sample": {"misaligned": "repair"}, "caption": {"fusion": "original"}}, ["tldr", "tldr_original"]),
}
# report row -> (compression, evaluation arm)
ROWS = {"original": ("fusions", "tldr_original"), "generated": ("fusions", "tldr"),
        "concat": ("fusions", "tldr_concat"), "mix": ("fusions", "tldr_mix"), "repair": ("repair", "tldr"),
        "repair_original": ("repair", "tldr_original"), "full": ("fusions", "full"), "random": ("fusions", "random"),
        "random_generated": ("fusions", "random_generated")}
CANDIDATES = ("generated", "concat", "mix", "repair")  # what could replace `original` (section "Rule")
DEFAULT = "original"


def base_config(seed: int, changes: dict | None = None):
    """The protocol's configuration (= params.yaml under its PROFILE) with the pretrained captioner, compute-matched
    only, and `changes`."""
    from tldr_tasks.config import _merge, from_dict

    profile = _merge(protocol.config().to_dict(), {**CAPTIONER, "seed": seed, "evaluate": {"budgets": ["compute"]}})
    return from_dict(_merge(profile, changes or {})).validate()


def seed_config(seed: int, run: str, clip_model: str, samples: int):
    """The shipped selection (clip_balanced, scored by the benchmark's reference CLIP) with `run`'s changes."""
    from tldr_tasks.benchmark import variant_config

    shipped = next(v for v in protocol.CANDIDATES if v.name == "clip_balanced")
    changes, arms = RUNS[run]
    return variant_config(base_config(seed, changes), shipped, samples, arms, clip_model)


def run_seed(out: Path, crawl: str, seed: int) -> dict:
    """{compression: evaluate's report.json plus the selection's stats and the manifest's caption counts}."""
    from tldr_tasks import storage
    from tldr_tasks.benchmark import make_benchmark_crawl, train_reference_clip
    from tldr_tasks.contract import StageIO
    from tldr_tasks.preflight import count_input_samples
    from tldr_tasks.runner import compress, load_stage_module

    root = out / crawl / f"seed{seed}"
    done = root / "reports.json"
    reports: dict = json.loads(done.read_text()) if done.exists() else {}
    root.mkdir(parents=True, exist_ok=True)
    base_cfg = base_config(seed)
    print(f"caption half: {crawl} seed {seed}: crawl, reference, captioners", file=sys.stderr, flush=True)
    main, reference, held_out = make_benchmark_crawl(root, crawl, base_cfg, seed)
    clip_model = train_reference_clip(reference, base_cfg, root / "reference_clip", str(root / "embed"))
    captioner = StageIO(input=main, out=str(root / "captioner-run"), eval_input=held_out)
    load_stage_module("train-captioner").run(base_cfg, captioner)
    samples = count_input_samples(storage.expand_shards(main))
    for run in RUNS:
        if run in reports:
            continue
        cfg = seed_config(seed, run, clip_model, samples)
        io = StageIO(input=main, out=str(root / run), eval_input=held_out, captioner=captioner.captioner_dir,
                     embed_cache=str(root / "embed"))
        print(f"caption half: {crawl} seed {seed}: {run}", file=sys.stderr, flush=True)
        summary = compress(cfg, io, with_eval=True)
        report = json.loads((root / run / "evaluate" / "report.json").read_text())
        manifest = json.loads((root / run / "shards" / "manifest.json").read_text())
        reports[run] = {**report, "selection": summary["results"]["sample"], "captions_shipped": manifest["captions"]}
        done.write_text(json.dumps(reports, indent=1))
    return reports


def seed_record(crawl: str, seed: int, reports: dict) -> dict:
    """One crawl and seed, compact: per row its primary metric on validation and test, every test metric and the
    shipped noise; the input's noise, the repair's counts and what each compression shipped."""
    rows = {}
    for row, (run, arm) in ROWS.items():
        result = reports[run]["arms"][arm]
        rows[row] = {"validation": protocol.primary_value(result["validation"], crawl),
                     "test": protocol.primary_value(result["test"], crawl),
                     "test_metrics": {k: v for k, v in result["test"].items() if isinstance(v, (int, float))},
                     "noise": reports[run].get("noise_rate", {}).get(arm)}
    selection = reports["repair"]["selection"]
    return {"crawl": crawl, "seed": seed, "metric": protocol.PRIMARY[crawl],
            "noise_input": reports["fusions"]["noise_rate_input"], "rows": rows,
            "repair": {k: selection.get(k) for k in ("recaptioned", "repaired", "repair", "kept", "filter_passed")},
            "captions_shipped": {run: reports[run]["captions_shipped"] for run in RUNS},
            "caption_accuracy": reports["fusions"].get("caption_accuracy")}


def run_one(out: Path, crawl: str, seed: int) -> dict:
    path = SEED_DIR / f"{crawl}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.time()
    record = {**seed_record(crawl, seed, run_seed(out, crawl, seed)), "seconds": round(time.time() - started),
              "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def decide(records: dict[str, list[dict]]) -> dict:
    """The protocol's rule on the validation split: per candidate, whether it ships less noise than its input on
    every crawl and seed, its per-seed score (mean over crawls of validation / full's), and the paired difference
    with `original`; the default changes only to an eligible candidate whose difference's 95% lower bound is
    above 0 (the highest mean among several)."""
    crawls = sorted(records)
    seeds = sorted(r["seed"] for r in records[crawls[0]])

    def share(row: str) -> list[float]:
        return [float(np.mean([next(r for r in records[c] if r["seed"] == s)["rows"][row]["validation"]
                               / next(r for r in records[c] if r["seed"] == s)["rows"]["full"]["validation"]
                               for c in crawls])) for s in seeds]

    base = share(DEFAULT)
    terms = {}
    for row in CANDIDATES:
        below = all(r["rows"][row]["noise"] < r["noise_input"] for c in crawls for r in records[c])
        diff = summarise(np.subtract(share(row), base).tolist())
        terms[row] = {"below_input_every_crawl_and_seed": below, "share_of_full": summarise(share(row)),
                      f"minus_{DEFAULT}": {**diff, "lower": diff["mean"] - diff["ci95"]}}
    winners = [r for r in CANDIDATES if terms[r]["below_input_every_crawl_and_seed"]
               and terms[r][f"minus_{DEFAULT}"]["lower"] > 0]
    chosen = max(winners, key=lambda r: terms[r]["share_of_full"]["mean"]) if winners else DEFAULT
    return {"crawls": crawls, "seeds": seeds, "default_share_of_full": summarise(base), "candidates": terms,
            "chosen": chosen}


def summary(records: dict[str, list[dict]]) -> dict:
    """Test split, reported once: per crawl every row's mean ± 95% CI, its paired difference with `original`,
    its shipped noise, and the repair's counts."""
    per_crawl = {}
    for crawl, recs in records.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        base = [r["rows"][DEFAULT]["test"] for r in recs]
        rows = {}
        for row in ROWS:
            values = [r["rows"][row]["test"] for r in recs]
            diff = summarise(np.subtract(values, base).tolist())
            rows[row] = {"test": summarise(values), f"minus_{DEFAULT}": {**diff, "lower": diff["mean"] - diff["ci95"]},
                         "noise": summarise([r["rows"][row]["noise"] for r in recs])}
        per_crawl[crawl] = {"metric": recs[0]["metric"], "rows": rows,
                            "noise_input": summarise([r["noise_input"] for r in recs]),
                            "recaptioned": [r["repair"]["recaptioned"] for r in recs],
                            "repaired": [r["repair"]["repaired"] for r in recs],
                            "repair_kept": [r["repair"]["repair"] for r in recs],
                            "kept": [r["repair"]["kept"] for r in recs],
                            "generated_shipped": [r["captions_shipped"]["fusions"].get("replaced", 0) for r in recs],
                            "seconds": [r["seconds"] for r in recs], "machine": recs[0]["machine"]}
    return {"split": "test", "budget": "compute", "crawls": per_crawl}


def markdown(result: dict) -> str:
    """docs/benchmarks.md's tables of caption_half.json."""
    rule = result["rule"]
    lines = [f"Seeds {', '.join(map(str, rule['seeds']))}; the rule on validation (share of full's score, mean over "
             "crawls; paired difference with `original`, 95% CI):", "",
             "| candidate | ships less noise than its input on every crawl and seed | share of full | minus original "
             "(lower bound) |", "|---|---|---|---|",
             f"| original (ships today) | – | {rule['default_share_of_full']['mean']:.3f} | – |"]
    for row, t in rule["candidates"].items():
        d = t[f"minus_{DEFAULT}"]
        lines.append(f"| {row} | {'yes' if t['below_input_every_crawl_and_seed'] else 'no'} "
                     f"| {t['share_of_full']['mean']:.3f} | {d['mean']:+.3f} ± {d['ci95']:.3f} ({d['lower']:+.3f}) |")
    lines += ["", f"Chosen: **{rule['chosen']}**" + (" (no change)" if rule["chosen"] == DEFAULT else "") + ".", "",
              "Test split, reported once: each crawl's primary metric (mean ± 95% CI over seeds; paired difference "
              "with `original`) and the strict judge's misaligned share of what the row trains on.", ""]
    for crawl, c in result["summary"]["crawls"].items():
        lines += [f"**{crawl}** ({c['metric']}; input noise {100 * c['noise_input']['mean']:.1f}%; the repair "
                  f"captioned {_mean(c['recaptioned'])} dropped pairs, passed {_mean(c['repaired'])}, kept "
                  f"{_mean(c['repair_kept'])} of {_mean(c['kept'])}; `fusions` shipped "
                  f"{_mean(c['generated_shipped'])} generated captions; mean over seeds):", "",
                  "| row | test | minus original | noise |", "|---|---|---|---|"]
        for row, r in c["rows"].items():
            d = r[f"minus_{DEFAULT}"]
            lines.append(f"| {row} | {r['test']['mean']:.1f} ± {r['test']['ci95']:.1f} "
                         f"| {d['mean']:+.1f} ± {d['ci95']:.1f} | {100 * r['noise']['mean']:.1f}% |")
        lines.append("")
    seconds = result["make_benchmark_seconds"]
    lines.append(f"`make benchmark` took {seconds['total_seconds'] / 3600:.1f} h on {result['machine']}, the sum of "
                 "its results files' times: " + ", ".join(f"{name} {part['seconds'] / 3600:.1f} h ({part['files']} of "
                                                          f"{part['of']} files)" for name, part in seconds.items()
                                                          if isinstance(part, dict)) + ".\n")
    return "\n".join(lines)


def readme_table(result: dict) -> str:
    """README's short form of caption_half.json: the rule's outcome, then per crawl each row's test score and the
    misaligned share of what it trains on."""
    rule, crawls = result["rule"], result["summary"]["crawls"]
    lines = ["| test split (mean over seeds; misaligned share trained on) | "
             + " | ".join(f"{c} ({crawls[c]['metric']})" for c in crawls) + " |",
             "|---|" + "---|" * len(crawls),
             "| input noise | " + " | ".join(f"{100 * crawls[c]['noise_input']['mean']:.1f}%" for c in crawls) + " |"]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(
            f"{crawls[c]['rows'][row]['test']['mean']:.1f} ± {crawls[c]['rows'][row]['test']['ci95']:.1f} "
            f"({100 * crawls[c]['rows'][row]['noise']['mean']:.1f}%)" for c in crawls) + " |")
    shares = ", ".join(f"{row} {t['minus_' + DEFAULT]['mean']:+.3f} (lower bound {t['minus_' + DEFAULT]['lower']:+.3f}"
                       f"{'' if t['below_input_every_crawl_and_seed'] else '; ships more noise than its input'})"
                       for row, t in rule["candidates"].items())
    return ("\n".join(lines) + f"\n\nThe rule on validation (share of full's score, paired with `original`): {shares}. "
            f"Chosen: **{rule['chosen']}**" + (" (no change)" if rule["chosen"] == DEFAULT else "") + ".\n")


def _mean(values: list) -> str:
    return f"{np.mean(values):.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crawls", default=",".join(protocol.CRAWLS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--out", default="runs/caption_half")
    args = parser.parse_args(argv)
    crawls, seeds = [c for c in args.crawls.split(",") if c], [int(s) for s in args.seeds.split(",") if s]
    for seed in seeds:  # seed-major: every crawl gets a seed before any gets the next
        for crawl in crawls:
            print(f"caption half: {crawl} seed {seed}", file=sys.stderr, flush=True)
            run_one(Path(args.out), crawl, seed)
    if complete():
        records = {c: [json.loads((SEED_DIR / f"{c}-seed{s}.json").read_text()) for s in SEEDS]
                   for c in protocol.CRAWLS}
        result = {"machine": machine(), "rule": decide(records), "summary": summary(records),
                  "make_benchmark_seconds": make_benchmark_seconds()}
        (RESULTS / "caption_half.json").write_text(json.dumps(result, indent=1) + "\n")
    from protocol import write_block  # benchmarks/protocol.py

    write_block(DOCS, "caption_half", block())
    write_block(README, "caption_half", readme_block())
    print(block())


def make_benchmark_seconds() -> dict:
    """`make benchmark`'s wall time: per part, the sum of what each of its results files took (the protocol's
    selection and confirmation seeds, then this benchmark's) as each ran, resumed across sessions, and how many
    files that is."""
    from protocol import SEED_DIR as PROTOCOL_DIR  # benchmarks/protocol.py

    parts = {"protocol_selection": [PROTOCOL_DIR / f"{c}-seed{s}.json" for c in protocol.CRAWLS
                                    for s in protocol.SELECTION_SEEDS],
             "protocol_confirmation": [PROTOCOL_DIR / f"{c}-seed{s}.json" for c in protocol.CRAWLS
                                       for s in protocol.CONFIRMATION_SEEDS],
             "caption_half": [SEED_DIR / f"{c}-seed{s}.json" for c in protocol.CRAWLS for s in SEEDS]}
    result = {}
    for name, paths in parts.items():
        present = [p for p in paths if p.exists()]
        result[name] = {"seconds": sum(json.loads(p.read_text())["seconds"] for p in present),
                        "files": len(present), "of": len(paths)}
    return {**result, "total_seconds": sum(part["seconds"] for part in result.values())}


def complete() -> bool:
    return all((SEED_DIR / f"{c}-seed{s}.json").exists() for c in protocol.CRAWLS for s in SEEDS)


def readme_block() -> str:
    """README's caption_half block: the short table once every crawl has every seed, until then the same note as
    docs/benchmarks.md's."""
    return readme_table(json.loads((RESULTS / "caption_half.json").read_text())) if complete() else block()


def block() -> str:
    """docs/benchmarks.md's caption_half block from the committed files: the tables once every crawl has every
    seed, until then which runs are in (the rule decides nothing on part of them)."""
    if complete():
        return markdown(json.loads((RESULTS / "caption_half.json").read_text()))
    done = {c: [s for s in SEEDS if (SEED_DIR / f"{c}-seed{s}.json").exists()] for c in protocol.CRAWLS}
    count = sum(map(len, done.values()))
    return (f"Under way: {count} of {len(SEEDS) * len(protocol.CRAWLS)} crawl-seeds are in "
            "`benchmarks/results/caption_half/` (" + "; ".join(f"{c}: {', '.join(map(str, s)) or 'none'}"
                                                            for c, s in done.items())
            + "). The rule decides, and the tables come, when all are in.\n")


if __name__ == "__main__":
    main()
