"""The stage executor and the local runner.

`execute_stage` is the one way a stage runs: `compress` calls it in this process, `tldr-vlp run`
(Airflow's BashOperator, the Kubernetes pod, dvc.yaml) calls it in a process of its own. The
runners differ only in where a stage runs, never in what it does: preflight, the stage's params
record, the MLflow stage run, the captioner's registration and the result.

`compress` is the main job on a user's crawl (`tldr-vlp compress --input URL --out URL`). A rerun
with the same --out skips every finished part; a rerun with different parameters is refused, so
an output folder never mixes two configurations, nor two versions of the input crawl.

Every path ends a compression the same way (`record_run`: `compress` here, Airflow's `publish` for
the local and the Kubernetes runner): the parent MLflow run gets the summary metrics under the names
`tldr-vlp compare` shows for a run folder, the manifest, report.html and plot tables as artifacts,
and the lineage (input and output datasets with their digests, the captioner).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from tldr_tasks import preflight, storage, tracking
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import TIMINGS_DIR, StageIO, StageResult, cpu_limit
from tldr_tasks.pipeline import PARAMS_RECORD, STAGES, get_stage, stage_params
from tldr_tasks.report import write_report
from tldr_tasks.runs import load_run, summary_metrics


def check_run_config(cfg: Config, io: StageIO) -> None:
    """Record the resolved config and the input's content (`{stem}-{md5}` per shard) in
    `out/config.json`; refuse an --out made with other parameters or from other input content.

    The content matters as much as the parameters: finished stages are skipped on a rerun, so a rerun
    on a re-landed crawl would otherwise serve the old crawl's clusters, selection and shards."""
    from tldr_tasks import content

    url = storage.join(io.out, "config.json")
    shards = [content.shard_id(u) for u in io.input_shards()]
    if storage.exists(url):
        previous = json.loads(storage.read_text(url))
        if previous.get("hash") != cfg.hash():
            changed = sorted(k for k in cfg.to_dict() if cfg.to_dict()[k] != previous.get("config", {}).get(k))
            raise ConfigError(f"{io.out} holds a run made with other parameters, sections changed: "
                              f"{', '.join(changed) or 'unknown'} (use a new --out or delete that folder)")
        recorded = previous.get("input_shards")
        if recorded is not None and recorded != shards:  # None: a record from before inputs were kept
            added, gone = sorted(set(shards) - set(recorded)), sorted(set(recorded) - set(shards))
            raise ConfigError(f"{tracking.redact(io.out)} was made from other input content, new or changed "
                              f"shards: {', '.join(added[:5]) or 'none'}; missing: {', '.join(gone[:5]) or 'none'}; "
                              "its finished stages would be served stale (use a new --out for the new crawl; "
                              "pass --embed-cache and --captioner to reuse unchanged shards' work)")
        return
    storage.write_text_atomic(url, json.dumps({"hash": cfg.hash(), "config": cfg.to_dict(),
                                               "input_shards": shards}, indent=1))


CPU_MODES = ("owned", "shared")
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")  # what thread_defaults sets


def thread_defaults() -> None:
    """OpenMP settings for the stage's torch and faiss, set before they load (a caller's choice wins): one
    thread per core this process may use (CPU affinity and cgroup quota, not the node's cores), and
    a wait policy from what the runner knows of those cores (`TLDR_CPUS`):

    owned   a pod with its own CPU limit (the Kubernetes runner sets it), or a machine a user gives to
            one run: OpenMP's short spin before sleeping, the faster solo;
    shared  the default, and a local Airflow worker running several stage tasks at once: passive
            waiting, so idle threads sleep instead of spinning on a core another process needs
            (spinning beside other work is 2.7-4.2x slower: benchmarks/results/contention_captioner.json).
    """
    mode = os.environ.get("TLDR_CPUS", "shared")
    if mode not in CPU_MODES:
        raise ConfigError(f"TLDR_CPUS={mode!r} is not one of {', '.join(CPU_MODES)} (unset it, or set shared "
                          "where stages share the cores)")
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_limit()))
    if mode == "shared":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextmanager
def stage_threads() -> Iterator[None]:
    """`thread_defaults` for one run in this process (a stage, a compress; `@stage_threads()` on the function),
    then the caller's environment as it was: a process that goes on to other work (a notebook, a test
    session) keeps its own settings, and a later evaluation, which sizes torch's threads from
    OMP_NUM_THREADS, is not sized by this run's."""
    saved = {name: os.environ.get(name) for name in THREAD_VARS}
    thread_defaults()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def input_fingerprint(input_url: str, version: str | None = None) -> dict:
    """A crawl's identity without reading it: {"version", "shards"}: `version` when the crawl has a
    registered one (tldr_ingest's DVC md5), else a hash of its shard names and sizes."""
    import hashlib

    shards = storage.expand_shards(input_url)
    if not version:
        sizes = [f"{storage.shard_stem(u)}:{storage.filesystem(u)[0].size(storage.filesystem(u)[1])}" for u in shards]
        version = hashlib.sha256("\n".join(sizes).encode()).hexdigest()[:12]
    return {"version": version, "shards": len(shards)}


def check_stage_params(cfg: Config, io: StageIO, name: str) -> None:
    """Refuse to add to a stage's output made with other parameters; record them on first use.

    The record (`params.json` in the stage's folder) holds every parameter the stage's output
    depends on, upstream stages' included, so a rerun with the same ones skips finished parts and
    one with other ones is refused with the changed keys named, never mixed with stale parts.
    Exempt: embed (its shared folder is keyed by captioner version and feature) and a captioner
    passed with --captioner (reused as it is, whatever it was trained with).
    """
    spec = get_stage(name)
    if spec.keyed_output or (name == "train-captioner" and io.captioner):
        if name == "train-captioner" and not spec.is_done(io) and not storage.exists(
                storage.join(io.captioner_dir, PARAMS_RECORD)):
            _write_record(cfg, io, name)  # a captioner about to be trained: its identity, for reuse
        return
    url = storage.join(spec.output_dir(io), PARAMS_RECORD)
    if not storage.exists(url):
        _write_record(cfg, io, name)
        return
    recorded = json.loads(storage.read_text(url))["params"]
    wanted = stage_params(cfg, name)
    changed = [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(recorded) | set(wanted))
               if recorded.get(k) != wanted.get(k)]
    if changed:
        raise ConfigError(f"{tracking.redact(spec.output_dir(io))} was made with other parameters, changed "
                          f"{'; '.join(changed)} (rerun with the recorded values, use a new --out, or delete "
                          f"that folder and those of the stages after {name})")


def _write_record(cfg: Config, io: StageIO, name: str) -> None:
    spec = get_stage(name)
    record = {"stage": name, "params": stage_params(cfg, name)}
    if name == "train-captioner":
        # The crawl it was trained on (Airflow passes its registered version): the reuse policy reads it.
        record["input"] = input_fingerprint(io.input, os.environ.get("TLDR_INPUT_VERSION"))
    storage.write_text_atomic(storage.join(spec.output_dir(io), PARAMS_RECORD),
                              json.dumps(record, indent=1, sort_keys=True, default=str))


def load_stage_module(name: str):
    """Import the stage module lazily: its heavy imports load only when it runs."""
    import importlib

    return importlib.import_module(f"tldr_tasks.stages.{get_stage(name).module}")


@stage_threads()
def execute_stage(cfg: Config, io: StageIO, name: str, **kwargs) -> tuple[StageResult, float, str | None]:
    """Run one stage: preflight, params record, the stage inside its MLflow stage run, and (for
    train-captioner) the captioner's registration. Returns (result, seconds, parent run id).

    Under the DeepSpeed launcher every rank calls this; only rank 0 checks, records and tracks.
    """
    first_rank = int(os.environ.get("RANK", "0")) == 0
    if first_rank:  # before the stage's heavy imports (torch): a refused run ends in well under a second
        preflight.check(cfg, io, stage=name, with_eval=name == "evaluate")
    module = load_stage_module(name)
    if not first_rank:
        started = time.time()
        return module.run(cfg, io, **kwargs), time.time() - started, None
    check_stage_params(cfg, io, name)
    started = time.time()
    with tracking.stage_run(cfg, io, name, kwargs) as parent:
        result = module.run(cfg, io, **kwargs)
        tracking.log_stage_result(name, result, time.time() - started)
    if not result.skipped:  # a skipped stage's near-zero time would hide what the work took
        record_timing(io, name, kwargs, time.time() - started)
    if name == "train-captioner":
        # Once per trained weights, on every path (a retry or a run reusing it registers nothing new).
        tracking.register_captioner(parent, io.captioner_dir,
                                    description=f"trained on {tracking.redact(io.input)}")
    return result, time.time() - started, parent


def record_timing(io: StageIO, name: str, kwargs: dict, seconds: float) -> None:
    """`out/timings/{stage}[-i-of-n].json`: the seconds a stage part took, in the run folder, so the
    report and `compare` read per-stage timings from the folder alone; one file per part, since
    parts run in parallel processes or pods."""
    part = name
    if kwargs.get("num_shards", 1) > 1:
        part = f"{name}-{kwargs['shard_index']}-of-{kwargs['num_shards']}"
    storage.write_text_atomic(storage.join(io.out, TIMINGS_DIR, f"{part}.json"),
                              json.dumps({"stage": name, "seconds": round(seconds, 3)}))


def record_run(parent: str, out: str) -> dict[str, float]:
    """End-of-compression record on the parent MLflow run, the same on every path: summary metrics
    (runs.summary_metrics, the names `tldr-vlp compare` shows for a run folder), the manifest,
    report.html and plot tables as artifacts, the lineage. Writes `out/report/`. Returns the metrics."""
    run = load_run(out)
    metrics = summary_metrics(run)
    manifest = run["manifest"]
    # the ratio curve's plot, when the run scored one (curve.py)
    tracking.log_to_parent(parent, metrics, artifacts=[storage.join(out, "shards", "manifest.json"),
                                                       storage.join(out, "sample", "curve.png")])
    try:
        tracking.log_to_parent(parent, {}, artifacts=write_report(out), artifact_path="report")
    except Exception as err:  # noqa: BLE001 - the shards are done and recorded; a page that failed to
        # render must not turn a finished compression into a failed one
        print(f"report not written: {err!r}", file=sys.stderr)
        tracking.log_to_parent(parent, {}, tags={"tldr.report_error": repr(err)[:500]})
    tracking.log_lineage(parent, manifest.get("input", ""), manifest.get("input_version"),
                         storage.join(out, "shards"), manifest.get("output_version"),
                         captioner=manifest.get("captioner_version"))
    if "clusters" in metrics:  # the number used: the tag said 0 where the size rule was to choose it
        tracking.log_to_parent(parent, {}, tags={"clusters": str(int(metrics["clusters"]))})
    return metrics


def run_stage(cfg: Config, io: StageIO, name: str, **kwargs) -> tuple[StageResult, float]:
    """`execute_stage` without the parent id: (result, seconds)."""
    result, seconds, _ = execute_stage(cfg, io, name, **kwargs)
    return result, seconds


def result_summary(name: str, io: StageIO, result: StageResult, parent: str | None) -> dict:
    """The stage's result as one JSON-able dict: what `tldr-vlp run` prints last and writes to
    --result-json (the BashOperator's and the pod's XCom)."""
    return {"stage": name, "metrics": result.metrics, "outputs": [tracking.redact(u) for u in result.outputs[:20]],
            "skipped": result.skipped, "out": tracking.redact(io.out), "mlflow_run_id": parent}


CAPTIONER_CHOICE = "captioner_choice.json"  # in a run folder: the captioner a requested retrain trains


def retrain_choice(io: StageIO, retrain: bool) -> tuple[StageIO, dict | None]:
    """`io` with the captioner a requested retrain trains, and the choice ({"url", "reason"}; None when
    the run trains or reuses as usual).

    A retrain trains, with the run's parameters, in a folder that holds no finished captioner, and is
    registered as a new `tldr-captioner` version: beside the `--captioner` it would have reused, in the first
    free `DIR-r2`, `DIR-r3`, ... (the folders Airflow's runners use: captioners.choose), or, without
    --captioner, in the run's own `out/captioner`, which must not be finished yet (the later stages in that
    run folder were made with it). The choice is recorded in the run folder on first use: a rerun of that
    folder (after a kill) continues with that captioner, with or without the flag, never trains another."""
    from tldr_tasks import captioners

    record = storage.join(io.out, CAPTIONER_CHOICE)
    if storage.exists(record):
        choice = json.loads(storage.read_text(record))
    elif not retrain:
        return io, None
    elif io.captioner:
        choice = {"url": captioners.unfinished(io.captioner), "reason": "retrain requested"}
    elif get_stage("train-captioner").is_done(io):
        raise ConfigError(f"--retrain-captioner: {tracking.redact(io.out)} already holds a trained captioner and the "
                          "stages made with it; a retrain there would mix two captioners in one run folder (use a new "
                          f"--out, or --captioner {tracking.redact(io.captioner_dir)} to train a new one beside it)")
    else:
        choice = {"url": io.captioner_dir, "reason": "retrain requested"}
    if not storage.exists(record):
        storage.write_text_atomic(record, json.dumps(choice))
    if choice["url"] == io.captioner_dir:
        return io, choice
    return replace(io, captioner=choice["url"]), choice


@stage_threads()
def compress(cfg: Config, io: StageIO, with_eval: bool = False, retrain_captioner: bool = False,
             label: str = "") -> dict:
    """Run every stage (and the evaluation when asked) and return a summary dict:
    {"results": {stage: metrics}, "seconds": {stage: s}, "mlflow_run_id", "manifest"}.

    Args:
        retrain_captioner: train a new captioner even where `--captioner` names a finished one (retrain_choice).
        label: a word or two for the MLflow parent run's name beside ratio, strategy and time (the demo's crawl).
    """
    preflight.check(cfg, io, with_eval=with_eval)
    check_run_config(cfg, io)
    io, choice = retrain_choice(io, retrain_captioner)
    # compress owns its parent run: one RUNNING under this key is a killed earlier compress's.
    tracking.end_stale_runs(tracking.key_filter(tracking.run_key(io)),
                            "a later compress with the same run key found it RUNNING")
    tags = ({"tldr.captioner": tracking.redact(choice["url"]), "tldr.captioner_choice": choice["reason"]}
            if choice else {})
    parent = tracking.parent_run_id(cfg, io, tags=tags, new=True, label=label)
    stages = [s for s in STAGES if with_eval or not s.optional]
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    try:
        for number, spec in enumerate(stages, 1):
            print(f"[{number}/{len(stages)}] {spec.name} ...", file=sys.stderr, flush=True)
            result, took = run_stage(cfg, io, spec.name)
            results[spec.name], seconds[spec.name] = result.metrics, round(took, 1)
            state = "already done, skipped" if result.skipped else f"done in {took:.1f} s"
            print(f"[{number}/{len(stages)}] {spec.name}: {state}", file=sys.stderr, flush=True)
        manifest = json.loads(storage.read_text(storage.join(io.shards_dir, "manifest.json")))
        record_run(parent, io.out)
    except BaseException:
        tracking.finish_parent(parent, "FAILED")
        raise
    tracking.finish_parent(parent)
    return {"results": results, "seconds": seconds, "mlflow_run_id": parent, "manifest": manifest}
