"""Trigger params -> the exact `tldr-vlp run <stage> ...` command of every task. Pure; no Airflow.

The `plan` task of tldr_compress calls `build_plan` once per run, so both runners run the same
commands, and the plan (visible as that task's XCom) says exactly what every task will run.

Layout of a run (the recompression layout): `<output_root>/runs/<run_id>` is the run folder;
`<output_root>/captioners/<params key>-<crawl version>` holds one captioner per set of captioner
parameters and training crawl (`tldr_tasks.captioners`: which one a run uses), and
`<output_root>/embed` the per-shard embeddings keyed by captioner version, so a scheduled rerun
reuses a compatible captioner and embeds only shards it has not embedded before.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

from tldr_tasks.config import shortcut_overrides
from tldr_tasks.pipeline import STAGES, get_stage


def task_id(stage: str) -> str:
    return stage.replace("-", "_")


def run_folder_name(run_id: str) -> str:
    """A run id as a path segment: `manual__2026-01-01T00:00:00+00:00` -> `manual__2026-01-01T00-00-00-00-00`."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", run_id)


def settings(params: Mapping) -> list[str]:
    """The `section.key=value` overrides a run's params ask for (its trigger-form fields named in
    tldr_tasks.config.SHORTCUTS, as the CLI's flags); the free-form overrides come last (win)."""
    return shortcut_overrides(params, params.get("overrides") or [])


def stage_arguments(stage: str, params: Mapping, run_id: str, input_url: str, captioner_url: str, *,
                    shard_index: int | None = None, num_shards: int | None = None,
                    result_json: str | None = None) -> list[str]:
    """The arguments after `tldr-vlp` for one task of one stage.

    Args:
        stage: a name from tldr_tasks.pipeline.STAGES.
        params: the run's params (the trigger form's fields).
        run_id: the Airflow run id; names the run folder.
        input_url: the crawl to compress (params["input_url"] or the landed crawl of an Asset event).
        captioner_url: the captioner folder the run trains or reuses.
        shard_index, num_shards: the worker's shard group, for sharded stages only.
        result_json: also write the result here (the pod runner's XCom file).
    """
    spec = get_stage(stage)
    root = str(params["output_url"]).rstrip("/")
    args = ["run", stage, "--input", input_url, "--out", f"{root}/runs/{run_folder_name(run_id)}",
            "--captioner", captioner_url, "--embed-cache", f"{root}/embed"]
    if spec.optional and params.get("eval_input_url"):
        args += ["--eval-input", str(params["eval_input_url"])]
    for item in settings(params):
        args += ["--set", item]
    if spec.sharded:
        if shard_index is None or not num_shards:
            raise ValueError(f"stage {stage} is sharded: pass shard_index and num_shards")
        args += ["--shard-index", str(shard_index), "--num-shards", str(num_shards)]
    if result_json:
        args += ["--result-json", result_json]
    return args


def check_conf(conf: Mapping | None, known: Iterable[str]) -> None:
    """Refuse a trigger's conf key that is no parameter of the DAG (`{"ration": 0.3}` would otherwise run
    with the default ratio): Airflow's params schema checks the values of known keys only."""
    from difflib import get_close_matches

    from tldr_tasks.config import ConfigError

    known = sorted(known)
    unknown = sorted(set(conf or {}) - set(known))
    if unknown:
        hints = [f"{key!r} -> {close[0]!r}" for key in unknown if (close := get_close_matches(key, known, 1))]
        raise ConfigError(f"unknown conf key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"({'did you mean ' + ', '.join(hints) + '? ' if hints else ''}the keys are: "
                          f"{', '.join(known)})")


def check_params(params: Mapping, input_url: str | None):
    """The run's resolved Config; raises ConfigError (naming what to fix) before any task starts.
    Reads nothing: the plan task then runs the stages' preflight on the input and output (open_run)."""
    from tldr_tasks.config import ConfigError, load_config

    if not input_url:
        raise ConfigError("no input crawl (set the input_url param to a folder or brace pattern of .tar shards)")
    if not params.get("output_url"):
        raise ConfigError("no output (set the output_url param to the root folder or s3:// URL for runs)")
    if params.get("run_evaluation") and not params.get("eval_input_url"):
        raise ConfigError("run_evaluation is on but eval_input_url is empty (give the clean held-out shards, "
                          "which the synthetic crawl writes beside the crawl, or turn evaluation off)")
    # A bad override is refused here, before any task (or pod) starts; the message names the key.
    return load_config(None, settings(params))


def build_plan(params: Mapping, run_id: str, *, executable: str, result_json: str,
               input_url: str | None = None, input_version: str | None = None,
               captioner_url: str | None = None) -> dict:
    """Every task's command for one run.

    Returns a flat dict (Airflow pushes each key as its own XCom): `out`, `input`, `input_version`,
    `runner`, `shard_groups`, `captioner`; for every unsharded stage `local__<task>` (the shell
    command) and `pod__<task>` (the container arguments); `groups`: one dict per shard group with the
    same two keys for every sharded stage (the mapped tasks fan out over this list).
    `captioner_url` defaults to the folder keyed by the run's captioner parameters and crawl version.
    """
    from tldr_tasks.captioners import folder

    input_url = input_url or params.get("input_url")
    cfg = check_params(params, input_url)
    groups = int(params.get("shard_groups") or 1)
    root = str(params["output_url"]).rstrip("/")
    captioner_url = captioner_url or folder(root, cfg, input_version)
    plan = {"out": f"{root}/runs/{run_folder_name(run_id)}", "input": input_url, "input_version": input_version,
            "runner": params.get("runner", "local"), "shard_groups": groups, "captioner": captioner_url,
            "groups": [{} for _ in range(groups)]}
    for spec in STAGES:
        tid = task_id(spec.name)
        if spec.sharded:
            for i, group in enumerate(plan["groups"]):
                args = stage_arguments(spec.name, params, run_id, input_url, captioner_url, shard_index=i,
                                       num_shards=groups)
                group[f"local__{tid}"] = shell_command(executable, args)
                group[f"pod__{tid}"] = args + ["--result-json", result_json]
        else:
            args = stage_arguments(spec.name, params, run_id, input_url, captioner_url)
            plan[f"local__{tid}"] = shell_command(executable, args)
            plan[f"pod__{tid}"] = args + ["--result-json", result_json]
    return plan


def shell_command(executable: str, args: list[str]) -> str:
    """The local task's bash command. The stage writes its result to a temp file that is printed
    last, so the BashOperator's XCom (the last output line) is the result even when the stage logged
    to stderr (merged into the same stream) after its summary."""
    command = shlex.join([executable, *args, "--result-json"])
    return ('set -eu; result="$(mktemp)"; trap \'rm -f "$result"\' EXIT; '
            f'{command} "$result"; echo; cat "$result"; echo')
