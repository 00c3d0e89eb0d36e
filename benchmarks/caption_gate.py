"""The caption gate's thresholds chosen on validation R@1, never on ground truth.

    .venv/bin/python benchmarks/caption_gate.py --out runs/bench_captions --seeds 0,1,2 \
        --crawls synthetic,synthetic_incomplete,real_emoji

The gate reads two signals a user has for every generated caption, both from the out-of-fold captioner
that wrote it (tldr_tasks/fusion.py): confidence (mean token log-probability given the image) and
grounding (that minus the same given another image). For every crawl and seed of benchmarks/captions.py,
its `drop` run's compressed set (whose KEY.json keeps each sample's generated caption and scores) is
evaluated again with caption.fusion=generated under each other setting of GATES (the evaluation re-decides
every caption with `fusion.ship_caption`, as materialize would); the `earlier` setting's row is that run's own
`tldr` (fusion generated, the gate it ran with), and `tldr_original` its selection with the original captions.
The setting with the best mean validation R@1 over the crawls is chosen; the test split is reported,
paired with the same selection's original captions.
Writes `benchmarks/results/caption_gate.json` and `caption_gate.md` (its table in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from captions import arguments, captions_config

from tldr_tasks.benchmark import machine, summarise

RESULTS = Path(__file__).parent / "results"
# (caption.min_confidence, caption.min_grounding); `earlier`: the default before this sweep, whose row is the
# drop run's own `tldr`
GATES = {"off": (-math.inf, -math.inf), "earlier": (-1.0, 0.5), "grounded": (-1.0, 1.5), "confident": (-0.3, 0.5)}


def shipped_share(root: Path, seed: int, gate: str) -> float:
    """Share of the `drop` run's kept samples whose generated caption ships (fusion generated) under one gate."""
    from tldr_tasks import fusion, storage
    from tldr_tasks.data.shards import Sample, iter_shard

    metas = [s.meta for url in storage.listdir(str(root / "drop" / "shards"), ".tar") for s in iter_shard(url)
             if isinstance(s, Sample)]
    collapsed = fusion.collapse_check([m["original_caption"] for m in metas], [m["generated_caption"] for m in metas],
                                      captions_config(seed).caption.min_entropy_ratio)["collapsed"]
    nan = float("nan")
    reasons = [fusion.ship_caption(m["source_key"], m["original_caption"], m["generated_caption"],
                                   nan if m["confidence"] is None else m["confidence"],
                                   nan if m["grounding"] is None else m["grounding"], mode="generated",
                                   min_confidence=GATES[gate][0], min_grounding=GATES[gate][1], seed=seed,
                                   collapsed=collapsed)[1] for m in metas]
    return reasons.count(fusion.REPLACED) / len(reasons)


def evaluate_gate(root: Path, seed: int, gate: str) -> dict:
    """{"validation", "test", "noise"} of the `drop` run's selection shipped with fusion=generated under one gate
    (arm `tldr_generated`; for the `earlier` gate, the drop run's own `tldr`), and the same for `tldr_original`."""
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import load_stage_module

    drop = json.loads((root / "reports.json").read_text())["drop"]
    if gate == "earlier":
        return {arm: {**drop["arms"][source], "noise": drop.get("noise_rate", {}).get(source)}
                for arm, source in (("tldr_generated", "tldr"), ("tldr_original", "tldr_original"))}
    folder = root / f"gate-{gate}"
    folder.mkdir(exist_ok=True)
    if not (folder / "shards").exists():  # the same compressed set: only the captions are re-decided
        os.symlink(root / "drop" / "shards", folder / "shards")
    cfg = captions_config(seed)
    cfg.sample.strategy, cfg.sample.alignment = "balanced", "cluster_pool"
    cfg.caption.fusion = "generated"
    cfg.caption.min_confidence, cfg.caption.min_grounding = GATES[gate]
    cfg.evaluate.arms = ["tldr_generated"]
    io = StageIO(input=str(root / "crawl" / "main"), out=str(folder), eval_input=str(root / "crawl" / "eval"),
                 captioner=str(root / "captioner-run" / "captioner"))
    load_stage_module("evaluate").run(cfg.validate(), io)
    report = json.loads((folder / "evaluate" / "report.json").read_text())
    return {"tldr_generated": {**report["arms"]["tldr_generated"],
                               "noise": report.get("noise_rate", {}).get("tldr_generated")}}


def markdown(result: dict) -> str:
    """The gate table of docs/benchmarks.md."""
    chosen = result["chosen_on_validation"]
    crawls = list(result["crawls"])
    lines = [f"Chosen: `{chosen}` (confidence ≥ {result['gates'][chosen][0]:g}, grounding ≥ "
             f"{result['gates'][chosen][1]:g}). Test mean R@1 (paired difference with the selection's original "
             "captions), and the share of kept pairs whose generated caption ships:", "",
             "| gate (confidence, grounding) | validation (mean of crawls) | " + " | ".join(crawls) + " |",
             "|---|---|" + "---|" * len(crawls)]
    for name, (confidence, grounding) in result["gates"].items():
        cells = []
        for crawl in crawls:
            row = result["crawls"][crawl][name]
            diff = row[f"{name} - tldr_original"]
            cells.append(f"{row['test']['mean']:.1f} ({diff['mean']:+.1f} ± {diff['ci95']:.1f}), shipped "
                         f"{100 * row['generated_shipped_share']['mean']:.1f}%")
        lines.append(f"| {name} ({confidence:g}, {grounding:g}) | {result['validation_mean_r1'][name]:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__.split("\n")[0], argv)
    seeds, crawls = [int(s) for s in args.seeds.split(",")], args.crawls.split(",")
    reports = {crawl: {gate: [{**evaluate_gate(Path(args.out) / crawl / f"seed{seed}", seed, gate),
                               "shipped": shipped_share(Path(args.out) / crawl / f"seed{seed}", seed, gate)}
                              for seed in seeds] for gate in GATES} for crawl in crawls}

    def r1(crawl: str, gate: str, split: str, arm: str = "tldr_generated") -> list[float]:
        return [r[arm][split]["mean_r1"] for r in reports[crawl][gate]]

    validation = {gate: float(np.mean([np.mean(r1(c, gate, "validation")) for c in crawls])) for gate in GATES}
    chosen = max(validation, key=validation.get)
    result = {"machine": machine(), "seeds": seeds, "gates": {g: list(v) for g, v in GATES.items()},
              "validation_mean_r1": validation, "chosen_on_validation": chosen, "crawls": {}}
    for crawl in crawls:
        original = r1(crawl, "earlier", "test", "tldr_original")
        result["crawls"][crawl] = {
            "tldr_original": summarise(original),
            **{gate: {"test": summarise(r1(crawl, gate, "test")),
                      "validation": summarise(r1(crawl, gate, "validation")),
                      "generated_shipped_share": summarise([r["shipped"] for r in reports[crawl][gate]]),
                      "noise_rate": summarise([r["tldr_generated"]["noise"] for r in reports[crawl][gate]])
                      if reports[crawl][gate][0]["tldr_generated"]["noise"] is not None else None,
                      f"{gate} - tldr_original": summarise(np.subtract(r1(crawl, gate, "test"), original).tolist())}
               for gate in GATES}}
    (Path(args.results) / "caption_gate.json").write_text(json.dumps(result, indent=1) + "\n")
    (Path(args.results) / "caption_gate.md").write_text(markdown(result))
    print(json.dumps({"validation_mean_r1": validation, "chosen": chosen}))


if __name__ == "__main__":
    main()
