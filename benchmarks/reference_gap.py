"""The one place the protocol's benchmark differs from the product, measured once (issue 25, item 5).

    .venv/bin/python benchmarks/reference_gap.py [--crawls synthetic,...] [--seed 0] [--work runs/protocol]

In the product, the clip_score reference's heads are cross-fitted on the crawl being selected (scoring.py); in the
benchmark they train on the crawl's reference quarter, which no arm draws from (benchmark.train_reference_clip).
For every crawl whose protocol seed is done (its work folder under `--work` and its record in
results/protocol/), the CLIP-based candidates run again with the product's reference, on the same captioner,
embeddings and evaluation, and are set beside the protocol's arms: shipped noise and the primary metric on
validation. Writes results/reference_gap.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tldr_tasks import protocol
from tldr_tasks.benchmark import variant_config

RESULTS = Path(__file__).parent / "results"
VARIANTS = [v for v in protocol.CANDIDATES if "clip_score" in (v.sample.get("strategy"), v.sample.get("filter"))]


def measure(work: Path, crawl: str, seed: int) -> dict:
    from tldr_tasks import storage
    from tldr_tasks.config import from_dict
    from tldr_tasks.contract import StageIO
    from tldr_tasks.preflight import count_input_samples
    from tldr_tasks.runner import compress

    record = json.loads((RESULTS / "protocol" / f"{crawl}-seed{seed}.json").read_text())
    root = work / crawl / f"seed{seed}"
    main, held_out = str(root / "crawl" / "main"), str(root / "crawl" / "eval")
    cfg = from_dict({**protocol.config().to_dict(), "seed": seed}).validate()
    samples = count_input_samples(storage.expand_shards(main))
    rows = {}
    for variant in VARIANTS:
        vcfg = variant_config(cfg, variant, samples, ["tldr"], "")  # "": the built-in, cross-fitted reference
        out = root / f"{variant.name}-product-reference"
        captioner = StageIO(input=main, out=str(root / "captioner-run")).captioner_dir  # the protocol's
        io = StageIO(input=main, out=str(out), eval_input=held_out, captioner=captioner,
                     embed_cache=str(root / "embed"))
        compress(vcfg, io, with_eval=True)
        report = json.loads((out / "evaluate" / "report.json").read_text())
        benchmark_arm = record["arms"][variant.name]
        rows[variant.name] = {
            "benchmark_reference": {"noise": benchmark_arm["noise"], "validation": benchmark_arm["validation"]},
            "product_reference": {"noise": report["noise_rate"]["tldr"],
                                  "validation": protocol.primary_value(report["arms"]["tldr"]["validation"], crawl)}}
    return {"crawl": crawl, "seed": seed, "metric": protocol.PRIMARY[crawl], "noise_input": record["noise_input"],
            "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crawls", default=",".join(protocol.CRAWLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/protocol")
    args = parser.parse_args()
    path = RESULTS / "reference_gap.json"
    done = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for crawl in args.crawls.split(","):
        if any((r["crawl"], r["seed"]) == (crawl, args.seed) for r in done["runs"]):
            continue
        if not (RESULTS / "protocol" / f"{crawl}-seed{args.seed}.json").exists():
            continue  # its protocol seed has not run yet
        done["runs"].append(measure(Path(args.work), crawl, args.seed))
        path.write_text(json.dumps(done, indent=1) + "\n")


if __name__ == "__main__":
    main()
