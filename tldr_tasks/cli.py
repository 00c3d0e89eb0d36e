"""`tldr-vlp`: the command line.

    tldr-vlp demo [--out runs/demo]            the whole pipeline + evaluation on a synthetic crawl
    tldr-vlp compress --input URL --out URL    the main job on your own crawl
    tldr-vlp run STAGE --input URL --out URL   one stage (what Airflow tasks and dvc.yaml call)
    tldr-vlp make-crawl --out DIR              the synthetic benchmark crawl
    tldr-vlp make-real-crawl --out DIR         the real-image benchmark crawl (npm emoji packages, pinned);
                                               --source mixed: 3D emoji + furniture (npm, Debian), pinned
    tldr-vlp import --images DIR --captions F --out DIR   a folder of images + captions -> shards
    tldr-vlp stages                            the stage list with resources
    tldr-vlp report RUN_DIR                    report.html of a run (images, clusters, captions, curves)
    tldr-vlp compare RUN_ID_OR_DIR ...         parameters and metrics of several runs side by side
    tldr-vlp benchmark --seeds 0,1,2 --out DIR  the results (docs/benchmarks.md): three crawls, chosen on validation

Messages go to stderr at $TLDR_LOG_LEVEL (default INFO; DEBUG for more, WARNING for less).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from tldr_tasks.config import FEATURES, FILTERS, STRATEGIES, ConfigError, load_config, shortcut_overrides
from tldr_tasks.contract import StageIO

COMMANDS = ("demo", "compress", "run", "make-crawl", "make-real-crawl", "import", "stages", "report", "compare",
            "benchmark")


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are ConfigErrors: the CLI prints every user error the same
    way, as one `error: ...` line (argparse prints the usage and exits itself)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def add_io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="crawl shards: brace pattern, glob or folder URL")
    parser.add_argument("--out", required=True, help="run folder URL; every stage writes below it")
    parser.add_argument("--eval-input", default=None, help="clean held-out shards for the evaluation")
    parser.add_argument("--captioner", default=None, help="reuse this trained captioner folder")
    parser.add_argument("--embed-cache", default=None, help="shared per-shard embedding folder")
    parser.add_argument("--params", default=None, help="params.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter, e.g. --set sample.ratio=0.3 (repeatable)")
    parser.add_argument("--result-json", default=None,
                        help="also write the result (metrics, outputs, mlflow_run_id) to this local file "
                             "(Airflow's KubernetesPodOperator reads /airflow/xcom/return.json)")


def io_from_args(args: argparse.Namespace) -> StageIO:
    return StageIO(input=args.input, out=args.out, eval_input=args.eval_input,
                   captioner=args.captioner, embed_cache=args.embed_cache)


def stage_main(name: str, argv: list[str]) -> int:
    """`tldr-vlp run <name> --input URL --out URL ...`, the one command line of every stage: parse it
    and run the stage through `runner.execute_stage`."""
    from tldr_tasks.pipeline import get_stage
    from tldr_tasks.runner import execute_stage, result_summary

    spec = get_stage(name)
    parser = CommandParser(prog=f"tldr-vlp run {name}", description=f"Run the {name} stage.")
    add_io_arguments(parser)
    if spec.sharded:
        parser.add_argument("--shard-index", type=int, default=0)
        parser.add_argument("--num-shards", type=int, default=1)
    args = parser.parse_args(argv)
    if spec.sharded and not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index {args.shard_index} is not in [0, --num-shards {args.num_shards})")
    cfg = load_config(args.params, args.overrides)
    io = io_from_args(args)
    kwargs = {"shard_index": args.shard_index, "num_shards": args.num_shards} if spec.sharded else {}
    result, _, parent = execute_stage(cfg, io, name, **kwargs)
    if parent is None:  # a DeepSpeed rank other than 0: rank 0 reports
        return 0
    summary = result_summary(name, io, result, parent)
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(summary))
    # The last stdout line is the summary: Airflow's BashOperator pushes it as the task's XCom.
    print(json.dumps(summary))
    return 0


def _common_overrides(args: argparse.Namespace) -> list[str]:
    """Shortcut flags -> `section.key=value` overrides (explicit --set wins, it comes last)."""
    return shortcut_overrides(vars(args), args.overrides)


def _add_shortcuts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratio", help="share of samples to keep, in (0, 1] (default 0.25), or auto: the smallest "
                        "share whose ratio curve stays within sample.auto_tolerance of the whole crawl's")
    parser.add_argument("--clusters", type=int, help="k-means clusters (default 0: round(8 * sqrt(ratio * samples)))")
    parser.add_argument("--feature", help="clustering feature: " + ", ".join(FEATURES))
    parser.add_argument("--strategy", help="sampling: " + ", ".join(STRATEGIES))
    parser.add_argument("--filter", help="alignment filter ahead of uniform, balanced or semdedup: "
                        + ", ".join(FILTERS) + " (default clip_score)")
    parser.add_argument("--fusion", help="caption fusion: mix, generated, concat, original")
    parser.add_argument("--alignment", help="which pairs fill a quota: cluster_pool, global_pool, rank, none")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--params", default=None, help="params.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any parameter, e.g. --set captioner.epochs=2 (repeatable)")


def compress_main(argv: list[str]) -> int:
    from tldr_tasks.runner import compress

    parser = CommandParser(prog="tldr-vlp compress",
                           description="Compress a crawl with every TL;DR stage, locally and resumably.")
    parser.add_argument("--input", required=True, help="crawl shards: brace pattern, glob or folder URL")
    parser.add_argument("--out", required=True, help="output folder URL (resumable: rerun to continue)")
    parser.add_argument("--captioner", help="reuse a trained captioner folder instead of training one")
    parser.add_argument("--retrain-captioner", action="store_true",
                        help="train a new captioner even where --captioner names a trained one (in DIR-r2, "
                             "DIR-r3, ... beside it), registered as a new tldr-captioner version")
    parser.add_argument("--embed-cache", help="shared embedding folder: recompression embeds only new shards")
    parser.add_argument("--eval", action="store_true", help="also run the downstream evaluation")
    parser.add_argument("--eval-input", help="clean held-out shards for --eval")
    _add_shortcuts(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.params, _common_overrides(args))
    summary = compress(cfg, io_from_args(args), with_eval=args.eval, retrain_captioner=args.retrain_captioner)
    manifest = summary["manifest"]
    carved = f"{manifest['carved']} carved for the ratio curve, " if manifest.get("carved") else ""
    print(f"kept {manifest['kept']} of {manifest['input_samples']} samples "
          f"({manifest['dropped']} dropped by selection, {carved}{manifest['rejected']} rejected: see "
          f"{args.out}/shards/rejects.jsonl); shards in {args.out}/shards; MLflow run {summary['mlflow_run_id']}")
    print(caption_summary(manifest))
    if manifest.get("curve"):
        from tldr_tasks.curve import summary

        print(summary(manifest["curve"]))
    return 0


def caption_summary(manifest: dict) -> str:
    """One line on which captions shipped and why the others kept their original."""
    counts = manifest["captions"]
    kept_original = {reason.removeprefix("original:"): n for reason, n in counts.items()
                     if reason.startswith("original:") and n}
    line = (f"captions: {counts['replaced'] + counts['appended']} generated shipped ({counts['replaced']} replaced, "
            f"{counts['appended']} appended), {sum(kept_original.values())} kept the original"
            + (f" ({', '.join(f'{k} {v}' for k, v in kept_original.items())})" if kept_original else ""))
    if manifest["collapse_check"]["collapsed"]:
        line += "; the captioner COLLAPSED, so no generated caption shipped (see collapse_check in the manifest)"
    return line


def demo_main(argv: list[str]) -> int:
    from tldr_tasks.demo import demo, demo_config, results_table

    parser = CommandParser(prog="tldr-vlp demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    parser.add_argument("--samples", type=int, help="crawl size (default 6000; 8000 with --params params.yaml)")
    parser.add_argument("--noise", type=float, help="share of noisy captions (default 0.3)")
    _add_shortcuts(parser)
    args = parser.parse_args(argv)
    report = demo(args.out, demo_config(args.params, _common_overrides(args)))
    print(results_table(report))
    print(f"\nreport: {args.out}/report.json")
    return 0


def benchmark_main(argv: list[str]) -> int:
    from tldr_tasks.benchmark import ALL_CRAWLS, CRAWLS, PROFILE, VARIANTS, benchmark, markdown, update_readme
    from tldr_tasks.config import _merge, from_dict, parse_overrides

    parser = CommandParser(prog="tldr-vlp benchmark", description="Regenerate the benchmark results: "
                           "every crawl and seed compressed by every selection variant and evaluated "
                           "beside full, random and the clean ceiling; defaults chosen on the validation "
                           "split, the test split reported.")
    parser.add_argument("--crawls", default=",".join(CRAWLS), help="comma-separated (default: "
                        + ", ".join(CRAWLS) + "; also " + ", ".join(sorted(set(ALL_CRAWLS) - set(CRAWLS))) + ")")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", default="runs/benchmark", help="folder (resumable; default runs/benchmark)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="selection variants to compare (default: all of " + ", ".join(v.name for v in VARIANTS)
                        + "); the first also trains the baselines")
    parser.add_argument("--readme", help="also write the results tables into this markdown file's benchmark block "
                        "(make benchmark-variants: docs/benchmarks.md)")
    _add_shortcuts(parser)
    args = parser.parse_args(argv)
    by_name = {v.name: v for v in VARIANTS}
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        variants = [by_name[name] for name in args.variants.split(",") if name]
    except (ValueError, KeyError) as err:
        parser.error(f"--seeds takes integers and --variants names from {', '.join(by_name)}: {err}")
    crawls = [c for c in args.crawls.split(",") if c]
    unknown = [c for c in crawls if c not in ALL_CRAWLS]
    if unknown or not crawls:
        parser.error(f"--crawls takes names from {', '.join(ALL_CRAWLS)}; got {args.crawls!r}")
    # the benchmark's size (PROFILE) under the params file and the overrides
    params = load_config(args.params).to_dict() if args.params else {}
    cfg = from_dict(_merge(_merge(from_dict(PROFILE).to_dict(), params),
                           parse_overrides(_common_overrides(args)))).validate()
    results = benchmark(args.out, cfg, crawls, seeds, variants)
    if args.readme:
        update_readme(args.readme, results)
    for result in results:
        print(markdown(result))
    print(f"{args.out}/benchmark_<crawl>.json, {args.out}/learning_curve_<crawl>.png")
    return 0


REAL_CRAWLS = ("emoji", "mixed")  # make-real-crawl --source: data/real_crawl.py (the default), data/real_mixed.py


def make_real_crawl_main(argv: list[str]) -> int:
    import argparse

    from tldr_tasks import storage
    from tldr_tasks.data.real_crawl import DEFAULT_CACHE_DIR, DEFAULT_MAX_EVAL, make_real_crawl

    parser = argparse.ArgumentParser(prog="tldr-vlp make-real-crawl",
                                     description="Write a real-image benchmark crawl: `emoji` (default; four vendors, "
                                                 "one held out for eval) or `mixed` (3D emoji and furniture, "
                                                 "held-out names for eval; data/real_mixed.py).")
    parser.add_argument("--out", required=True, help="output folder URL")
    parser.add_argument("--source", choices=REAL_CRAWLS, default="emoji", help="which real crawl (default emoji)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.3, help="share of noisy train captions")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-train", type=int, default=None, help="cap on train samples (default: all)")
    parser.add_argument("--max-eval", type=int, default=None, help=f"cap on eval samples (default {DEFAULT_MAX_EVAL})")
    parser.add_argument("--eval-share", type=float, default=None,
                        help="mixed only: held-out share of the images (default real_mixed.EVAL_SHARE)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"where the downloaded archives are kept (default {DEFAULT_CACHE_DIR})")
    args = parser.parse_args(argv)
    common = {"seed": args.seed, "noise": args.noise, "image_size": args.image_size, "shard_size": args.shard_size,
              "cache_dir": args.cache_dir, "max_train": args.max_train, "max_eval": args.max_eval}
    try:
        if args.source == "mixed":
            from tldr_tasks.data.real_mixed import EVAL_SHARE, make_mixed_crawl

            stats = make_mixed_crawl(args.out, eval_share=EVAL_SHARE if args.eval_share is None else args.eval_share,
                                     **common)
        elif args.eval_share is not None:
            raise ConfigError("--eval-share is for --source mixed: the emoji crawl holds out a vendor")
        else:
            stats = make_real_crawl(args.out, **common)
    except ConfigError as err:
        parser.error(str(err))
    print(json.dumps({"out": args.out, "train_input": storage.join(args.out, stats["train_input"]),
                      "eval_input": storage.join(args.out, stats["eval_input"]),
                      "train_samples": stats["train"]["samples"], "eval_samples": stats["eval"]["samples"],
                      "noise": stats["train"]["noise"]}))
    return 0


def stages_main(argv: list[str]) -> int:
    from tldr_tasks.pipeline import STAGES

    for spec in STAGES:
        r = spec.resources
        volumes = (f"shm={r.shm_gb}G " if r.shm_gb else "") + (f"scratch={r.scratch_gb}G " if r.scratch_gb else "")
        print(f"{spec.name:<16} cpus={r.cpus:<4} memory={r.memory_gb}G gpus={r.gpus} {volumes}"
              f"{'sharded ' if spec.sharded else ''}{'optional' if spec.optional else ''}".rstrip())
    return 0


def configure_logging() -> None:
    """The package's messages (`logging.getLogger(__name__)` in stages, models and data, e.g. "resumed
    from ... at step") to stderr at $TLDR_LOG_LEVEL, default INFO; other libraries' from WARNING.
    Progress bars (tqdm) write to stderr on their own. Logging that is set up already (a test
    session) keeps its handlers."""
    level = os.environ.get("TLDR_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f"TLDR_LOG_LEVEL={level} is not a logging level (use DEBUG, INFO, WARNING or ERROR)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tldr_tasks").setLevel(level)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Kubernetes (a deleted pod), Airflow (a task marked failed) and the DeepSpeed launcher stop a
    command with SIGTERM, whose default action ends Python without unwinding: its MLflow runs stayed
    RUNNING until a later run found them. As SystemExit it unwinds, so the stage run, and a compress's
    parent run, end FAILED. The caller's handler is back when main returns (tests call it in-process).

    A user error (ConfigError: a parameter, an input, the output location, the stage order) prints one
    `error: <what> (<what to change>)` line and returns 2; any other error returns 1 after a last line
    that says where its traceback is (a file at a terminal, else the log the output goes to)."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        configure_logging()
        return _command(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:  # a user error: what to change, no traceback
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug or an outage, not the user's input: keep the traceback
        if sys.stderr.isatty():  # a person at a terminal: one line, the traceback in a file
            with tempfile.NamedTemporaryFile("w", prefix="tldr-vlp-error-", suffix=".log", delete=False) as log:
                traceback.print_exc(file=log)
            where = f"the traceback is in {log.name}"
        else:  # stderr is a log already (an Airflow task, a pod, CI): a file there would be lost with the pod
            traceback.print_exc()
            where = "the traceback is above"
        print(f"error: unexpected {type(err).__name__}: {' '.join(str(err).split())[:300]} ({where}; please "
              "report it)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from tldr_tasks.pipeline import STAGE_NAMES

        if not rest or rest[0] not in STAGE_NAMES:
            raise ConfigError(f"tldr-vlp run needs a stage, got {rest[0] if rest else 'none'!r} (use one of "
                              f"{', '.join(STAGE_NAMES)})")
        return stage_main(rest[0], rest[1:])
    if command == "make-crawl":
        from tldr_tasks.data.synthetic import main as crawl_main

        return crawl_main(rest) or 0
    if command == "import":
        from tldr_tasks.data.importer import main as import_main

        return import_main(rest) or 0
    if command in ("report", "compare"):
        from importlib import import_module

        return import_module(f"tldr_tasks.{command}").main(rest)
    return {"compress": compress_main, "demo": demo_main, "stages": stages_main,
            "benchmark": benchmark_main, "make-real-crawl": make_real_crawl_main}[command](rest)


if __name__ == "__main__":
    sys.exit(main())
