"""Does "as good as full" survive a converged evaluation? (issue 25, item 6; docs/protocol.md section 3, exploratory)

    .venv/bin/python benchmarks/converged.py [--crawl synthetic] [--seeds 0,1,2] [--factor 4] [--work runs/protocol]

On the protocol's own runs (the compressed shards each candidate shipped, under `--work`), the evaluation again with
`factor` times the compute-matched budget (evaluate.epochs x factor), for full, random, oracle_clean, the TL;DR
row and every candidate: nothing is selected or captioned again. One file per crawl and seed,
`benchmarks/results/converged/<crawl>-seed<seed>.json` (the primary metric on validation and test at 1x, from the
protocol's record, and at `factor`x), skipped when present. Reported only: unadjusted, testing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tldr_tasks import protocol

RESULTS = Path(__file__).parent / "results"


def measure(work: Path, crawl: str, seed: int, factor: int) -> dict:
    from tldr_tasks.config import from_dict
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import load_stage_module

    record = json.loads((RESULTS / "protocol" / f"{crawl}-seed{seed}.json").read_text())
    root = work / crawl / f"seed{seed}"
    arms: dict = {}
    for number, variant in enumerate(protocol.CANDIDATES):
        cfg = from_dict({**protocol.config().to_dict(), "seed": seed}).validate()
        cfg.evaluate.epochs *= factor
        cfg.evaluate.budgets = ["compute"]
        cfg.evaluate.arms = [*protocol.BASELINES, "tldr"] if number == 0 else ["tldr"]
        out = root / f"{variant.name}-x{factor}"
        out.mkdir(exist_ok=True)
        if not (out / "shards").exists():  # the shards the candidate shipped, evaluated again
            os.symlink((root / variant.name / "shards").resolve(), out / "shards")
        main = str(root / "crawl" / "main")
        io = StageIO(input=main, out=str(out), eval_input=str(root / "crawl" / "eval"), embed_cache=str(root / "embed"),
                     captioner=StageIO(input=main, out=str(root / "captioner-run")).captioner_dir)
        load_stage_module("evaluate").run(cfg, io)
        report = json.loads((out / "evaluate" / "report.json").read_text())
        for arm, run in report["arms"].items():
            name = variant.name if arm == "tldr" else arm
            arms[name] = {f"validation_x{factor}": protocol.primary_value(run["validation"], crawl),
                          f"test_x{factor}": protocol.primary_value(run["test"], crawl), "steps": int(run["steps"]),
                          "validation_x1": record["arms"][name]["validation"], "test_x1": record["arms"][name]["test"]}
    return {"crawl": crawl, "seed": seed, "factor": factor, "metric": protocol.PRIMARY[crawl], "arms": arms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crawl", default="synthetic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--work", default="runs/protocol")
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        path = RESULTS / "converged" / f"{args.crawl}-seed{seed}.json"
        if path.exists() or not (RESULTS / "protocol" / f"{args.crawl}-seed{seed}.json").exists():
            continue  # done, or its protocol seed has not run yet
        result = measure(Path(args.work), args.crawl, seed, args.factor)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
