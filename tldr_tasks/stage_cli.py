"""The shared command line of every stage: `tldr-vlp run <stage> --input URL --out URL ...`.

Each stage module's `main(argv)` calls `stage_main(<name>, argv)`, so all stages parse the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tldr_tasks.config import ConfigError, load_config
from tldr_tasks.stages.base import StageIO


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


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """Parse the stage's command line and run it through `runner.execute_stage`."""
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
