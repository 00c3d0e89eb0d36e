"""Fusion of original and generated captions, evaluated rather than assumed.

Trains the evaluation's CLIP on the same TL;DR subset with each fusion mode (compute-matched steps)
and scores it on the clean held-out split. Run after `tldr-vlp demo` (it reuses the demo's
crawl and compressed shards):

    .venv/bin/python benchmarks/fusion.py --demo runs/demo

Writes benchmarks/results/fusion_seed<S>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tldr_tasks.config import FUSIONS, load_config
from tldr_tasks.stages import evaluate
from tldr_tasks.stages.base import StageIO


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demo = Path(args.demo).resolve()
    config = json.loads((demo / "run" / "config.json").read_text())["config"]
    bench = demo / "fusion-bench"
    bench.mkdir(exist_ok=True)
    if not (bench / "shards").exists():
        os.symlink(demo / "run" / "shards", bench / "shards")
    overrides = [f"evaluate.{k}={v}" for k, v in config["evaluate"].items() if k not in ("arms", "protocols")]
    cfg = load_config(None, [*overrides, f"seed={args.seed}", "evaluate.protocols=compute_matched",
                             "evaluate.arms=" + ",".join(f"tldr_{mode}" for mode in FUSIONS)])
    io = StageIO(input=str(demo / "crawl" / "train"), out=str(bench), eval_input=str(demo / "crawl" / "eval"))
    evaluate.run(cfg, io)
    report = json.loads((bench / "evaluate" / "report.json").read_text())["retrieval"]
    out = Path(__file__).parent / "results" / f"fusion_seed{args.seed}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(f"{'fusion':<12}{'mean R@1':>10}{'i2t R@1':>10}{'t2i R@1':>10}{'zero-shot':>11}")
    for arm, metrics in report.items():
        print(f"{arm.removeprefix('tldr_'):<12}{metrics['mean_r1']:>10.1f}{metrics['i2t_r1']:>10.1f}"
              f"{metrics['t2i_r1']:>10.1f}{metrics['zero_shot_acc']:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
