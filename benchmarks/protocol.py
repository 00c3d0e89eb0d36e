"""docs/protocol.md's runs: every candidate selection and baseline on every crawl and seed, then the default rule.

    .venv/bin/python benchmarks/protocol.py --phase selection [--crawls synthetic,...] [--seeds 0,1] [--out DIR]

One results file per crawl and seed, `benchmarks/results/protocol/<crawl>-seed<seed>.json`
(tldr_tasks.protocol.seed_record), skipped when present: a run of many hours spans sessions and resumes where it
stopped. The work folder (`--out`, default runs/protocol) only holds what a seed in progress has made.
`--phase selection` runs seeds 0-4 (section 5) and, once every crawl has them all, writes
`benchmarks/results/protocol_choices.json` (section 4's rule, tldr_tasks.protocol.default_rule). Until then it
writes `protocol_interim.json`: the same terms over the seeds every crawl has so far, which choose nothing. Either way
it rewrites docs/benchmarks.md's table (choices_markdown).
`--phase confirmation` runs seeds 100-109, and only once protocol_choices.json is committed; with every crawl's ten
seeds it writes `protocol_confirmation.json` and `.md` (section 6: paired tests, Holm per family). Either phase then
rewrites the README's table (readme_block): the confirmation's once it is complete, until then the selection seeds'
with the number of confirmation runs committed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tldr_tasks import protocol
from tldr_tasks.benchmark import machine, run_seed

RESULTS = Path(__file__).parent / "results"
SEED_DIR = RESULTS / "protocol"
CHOICES = RESULTS / "protocol_choices.json"
CONFIRMATION = RESULTS / "protocol_confirmation.json"
DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"
README = Path(__file__).parent.parent / "README.md"


def write_block(path: Path, name: str, body: str) -> None:
    """Replace what lies between `<!-- name:start -->` and `<!-- name:end -->` in `path` with `body`."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    text = path.read_text()
    head, rest = text.split(start, 1)
    path.write_text(head + start + body + end + rest.split(end, 1)[1])


def run_one(out: Path, crawl: str, seed: int) -> dict:
    path = SEED_DIR / f"{crawl}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.time()
    reports = run_seed(out, crawl, protocol.config(), seed, protocol.CANDIDATES)
    record = {**protocol.seed_record(crawl, seed, reports), "seconds": round(time.time() - started),
              "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def records(crawls: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """The committed records of these crawls, for the seeds every one of them has."""
    have = {c: {int(p.stem.rsplit("seed", 1)[1]) for p in SEED_DIR.glob(f"{c}-seed*.json")} for c in crawls}
    common = sorted(set(seeds).intersection(*have.values()))
    return {c: [json.loads((SEED_DIR / f"{c}-seed{s}.json").read_text()) for s in common] for c in crawls}


def confirmation_runs() -> int:
    """How many of the confirmation's crawl-seeds have a committed results file."""
    return sum(1 for seed in protocol.CONFIRMATION_SEEDS for crawl in protocol.CRAWLS
               if (SEED_DIR / f"{crawl}-seed{seed}.json").exists())


def readme_block() -> str:
    """The README's results table from the committed files: the confirmation's once it is complete, else the
    selection seeds' with the confirmation's progress."""
    if CONFIRMATION.exists():
        return protocol.confirmation_readme(json.loads(CONFIRMATION.read_text()),
                                            records(list(protocol.CRAWLS), list(protocol.CONFIRMATION_SEEDS)))
    choices = json.loads(CHOICES.read_text())
    return protocol.readme_markdown(choices, records(choices["crawls"], choices["seeds"]), confirmation_runs())


def docs_block() -> str:
    """docs/benchmarks.md's confirmation block: protocol_confirmation.md once the confirmation is complete, else
    its progress."""
    if CONFIRMATION.exists():
        return protocol.confirmation_markdown(json.loads(CONFIRMATION.read_text()))
    planned = len(protocol.CRAWLS) * len(protocol.CONFIRMATION_SEEDS)
    return (f"Under way: {confirmation_runs()} of {planned} crawl-seeds are in `benchmarks/results/protocol/`. "
            "Nothing is confirmed until all are in; then this block is `protocol_confirmation.md`.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=("selection", "confirmation"), default="selection")
    parser.add_argument("--crawls", default=",".join(protocol.CRAWLS))
    parser.add_argument("--seeds", default="", help="default: the phase's seeds")
    parser.add_argument("--out", default="runs/protocol")
    parser.add_argument("--summarise-only", action="store_true", help="run nothing: only the rule's files")
    args = parser.parse_args()
    if args.phase == "confirmation" and not CHOICES.exists():
        parser.error(f"{CHOICES} is not there: the confirmation runs only after the choices are committed")
    phase_seeds = protocol.SELECTION_SEEDS if args.phase == "selection" else protocol.CONFIRMATION_SEEDS
    seeds = [int(s) for s in args.seeds.split(",") if s] or list(phase_seeds)
    crawls = [c for c in args.crawls.split(",") if c]
    # seed-major: every crawl gets a seed before any crawl gets the next
    for seed in [] if args.summarise_only else seeds:
        for crawl in crawls:
            print(f"protocol: {crawl} seed {seed}", file=sys.stderr, flush=True)
            run_one(Path(args.out), crawl, seed)
    if args.phase == "selection":
        from tldr_tasks.config import load_config

        # the default when the choice was made: a committed choice is not remade against the default it chose
        shipped = (json.loads(CHOICES.read_text())["shipped"] if CHOICES.exists()
                   else protocol.shipped(load_config("params.yaml").to_dict()["sample"]))
        done = records(list(protocol.CRAWLS), list(protocol.SELECTION_SEEDS))
        complete = all(len(v) == len(protocol.SELECTION_SEEDS) for v in done.values())
        if not complete:  # the crawls begun so far, over the seeds they all have
            begun = [c for c in protocol.CRAWLS if any(SEED_DIR.glob(f"{c}-seed*.json"))]
            done = records(begun, list(protocol.SELECTION_SEEDS)) if begun else {}
        if not any(done.values()):
            return
        result = {"phase": "selection", "complete": complete, **protocol.default_rule(done, shipped),
                  "evaluation_model": protocol.PROFILE["evaluate"]["preset"],
                  "features": protocol.PROFILE["embed"]["feature"]}
        if not complete:
            result = {"note": "interim: fewer than the protocol's crawls or selection seeds; this chooses nothing",
                      **result}
        (CHOICES if complete else RESULTS / "protocol_interim.json").write_text(json.dumps(result, indent=1) + "\n")
        write_block(DOCS, "protocol", protocol.choices_markdown(result))
        if not complete:
            write_block(README, "results", protocol.readme_markdown(result, done))
            return
    else:
        done = records(list(protocol.CRAWLS), list(protocol.CONFIRMATION_SEEDS))
        if len(next(iter(done.values()))) == len(protocol.CONFIRMATION_SEEDS):
            result = protocol.confirmation(done, json.loads(CHOICES.read_text()))
            CONFIRMATION.write_text(json.dumps(result, indent=1) + "\n")
            (RESULTS / "protocol_confirmation.md").write_text(protocol.confirmation_markdown(result))
        write_block(DOCS, "confirmation", docs_block())
    write_block(README, "results", readme_block())


if __name__ == "__main__":
    main()
