"""A run folder read into plain data, and its summary metrics: what the report, `compare` and the
executor's end-of-run record (runner.record_run) read.

    run = load_run("runs/r1")
    summary_metrics(run)   # {"kept": 6.0, "clusters": 3.0, "eval.test.tldr.mean_r1": 16.0, ...}

`load_run` reads only what a run folder holds (config.json, shards/manifest.json,
cluster/assignments.parquet, sample/selected.parquet, sample/alignment.parquet, embed/status/,
evaluate/report.json, timings/) and tolerates missing parts: a run that was not evaluated has no
evaluation, a folder without the sample stage's scores no alignment.
"""

from __future__ import annotations

import io as _io
import json
from collections import Counter

import numpy as np

from tldr_tasks import storage
from tldr_tasks.contract import TIMINGS_DIR, StageIO

# The key parameters: the report's headline and `compare`'s rows.
PARAMS = ("seed", "embed.feature", "cluster.clusters", "sample.ratio", "sample.strategy", "sample.filter",
          "sample.alignment", "caption.fusion", "captioner.preset", "captioner.epochs", "evaluate.epochs")


def _read_json(url: str) -> dict | None:
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def _read_parquet(url: str) -> list[dict]:
    import pyarrow.parquet as pq

    if not storage.exists(url):
        return []
    return pq.read_table(_io.BytesIO(storage.read_bytes(url))).to_pylist()


def _get(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def load_run(run_dir: str) -> dict:
    """Everything the report and `compare` read from a run folder; absent parts are empty."""
    from tldr_tasks.stages import embed

    manifest = _read_json(storage.join(run_dir, "shards", "manifest.json")) or {}
    recorded = _read_json(storage.join(run_dir, "config.json")) or {}
    config = recorded.get("config") or manifest.get("config") or {}
    return {"run_dir": run_dir, "manifest": manifest, "config": config,
            "assignments": _read_parquet(storage.join(run_dir, "cluster", "assignments.parquet")),
            "selected": {r["key"] for r in _read_parquet(storage.join(run_dir, "sample", "selected.parquet"))},
            **_scores(run_dir),
            "embed_status": embed.shard_status(StageIO(input="", out=run_dir)),
            "evaluation": _read_json(storage.join(run_dir, "evaluate", "report.json")),
            "timings": _timings(run_dir)}


def _scores(run_dir: str) -> dict:
    """The sample stage's per-sample scores in key order: {"alignment": {key: within-cluster z}, "loss":
    {key: caption loss, nats per token}} (a folder written before losses were kept there: no losses)."""
    rows = _read_parquet(storage.join(run_dir, "sample", "alignment.parquet"))
    return {"alignment": {r["key"]: r.get("alignment") for r in rows},
            "loss": {r["key"]: r["loss"] for r in rows if r.get("loss") is not None}}


def _timings(run_dir: str) -> dict[str, float]:
    """{stage: seconds} from the runner's `timings/` records, summed over a stage's parallel parts
    (the work it took, not the wall time)."""
    seconds: dict[str, float] = {}
    for url in storage.listdir(storage.join(run_dir, TIMINGS_DIR), ".json"):
        record = json.loads(storage.read_text(url))
        seconds[record["stage"]] = seconds.get(record["stage"], 0.0) + float(record["seconds"])
    return seconds


def params_of(run: dict) -> dict:
    """The key parameters as the report's header shows them: `evaluate.*` only for an evaluated run, and
    the clusters a run used beside a `cluster.clusters` of 0 (the size rule)."""
    params = {name: _get(run["config"], name) for name in PARAMS if _get(run["config"], name) is not None
              and (run["evaluation"] or not name.startswith("evaluate."))}
    used = len(cluster_counts(run)[0])
    if params.get("cluster.clusters") == 0 and used:
        params["cluster.clusters"] = f"0 (size rule: {used} used)"
    return params


def _finite(values) -> np.ndarray:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return array[np.isfinite(array)]


def alignment_scores(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """The sample stage's finite alignment scores of the input and of the kept samples."""
    return (_finite(run["alignment"].values()),
            _finite(v for k, v in run["alignment"].items() if k in run["selected"]))


def caption_losses(run: dict) -> dict[str, np.ndarray]:
    """The finite caption losses (nats per token) of the input, the kept set and the trust summary's random
    subset of the same size (trust.random_subset at the summary's seed); empty when none were kept."""
    from tldr_tasks.trust import random_subset

    keys = list(run["alignment"])
    if not run["loss"] or not keys:
        return {}
    loss = np.asarray([run["loss"].get(k, np.nan) for k in keys], dtype=np.float64)
    kept = np.asarray([k in run["selected"] for k in keys])
    seed = ((run["manifest"].get("trust") or {}).get("thresholds") or {}).get("random_seed",
                                                                           _get(run["config"], "seed") or 0)
    sets = {"input": loss, "kept": loss[kept], "random": loss[random_subset(len(keys), int(kept.sum()), int(seed))]}
    return {name: values[np.isfinite(values)] for name, values in sets.items()}


def cluster_counts(run: dict) -> tuple[Counter, Counter]:
    """Samples per cluster in the input and among the kept samples."""
    return (Counter(r["cluster"] for r in run["assignments"]),
            Counter(r["cluster"] for r in run["assignments"] if r["key"] in run["selected"]))


def evaluation_arms(run: dict) -> dict:
    """{arm: its results} of the evaluation's report.json; empty when the run was not evaluated."""
    return (run["evaluation"] or {}).get("arms") or {}


def learning_curves(run: dict) -> dict[str, list[list[float]]]:
    """{arm: [[optimizer steps, mean R@1 on the test split], ...]} of the arms that recorded a curve."""
    return {name: arm["curve"]["test"] for name, arm in evaluation_arms(run).items()
            if (arm.get("curve") or {}).get("test")}


def summary_metrics(run: dict) -> dict[str, float]:
    """Flat numeric metrics of a run: counts, the ratio curve, cluster spread, alignment before/after, caption
    counts per reason, collapse flag and confidence, the shipped and original captions' noise (ground truth only),
    embed outcomes, per-stage seconds and samples/s and, when evaluated, the evaluation's own metrics
    (prefixed `eval.`). The parent MLflow run of every path carries exactly these names
    (runner.record_run), so `compare` lines up folders and run ids."""
    manifest = run["manifest"]
    metrics: dict[str, float] = {}
    for name in ("input_samples", "kept", "dropped", "carved", "rejected", "ratio"):
        if isinstance(manifest.get(name), (int, float)):
            metrics[name] = float(manifest[name])
    # The ratio curve per ratio and auto's choice (curve.py), when the run scored one.
    from tldr_tasks.curve import metrics as curve_metrics

    metrics.update(curve_metrics(manifest.get("curve")))
    for name, value in (manifest.get("metrics") or {}).items():
        if name.startswith("caption") and isinstance(value, (int, float)):
            metrics[name] = float(value)
    # The same caption counts from the manifest's own sections (they are what a reader of the manifest sees).
    for reason, count in (manifest.get("captions") or {}).items():
        metrics[f"captions_{reason.replace(':', '_')}"] = float(count)
    if "collapsed" in (manifest.get("collapse_check") or {}):
        metrics["caption_collapsed"] = float(manifest["collapse_check"]["collapsed"])
    # The strict judge's noise of the shipped and the original captions, overall and per reason (a crawl
    # with ground truth only: the manifest's caption_noise is null otherwise).
    noise = manifest.get("caption_noise") or {}
    for name in ("shipped", "original"):
        if isinstance(noise.get(name), (int, float)):
            metrics[f"{name}_noise"] = float(noise[name])
    for reason, counts in (noise.get("by_reason") or {}).items():
        metrics[f"shipped_noise_{reason.replace(':', '_')}"] = counts["noisy"] / counts["shipped"]
    # The sample stage's alignment distribution before (input) and after (kept) selection.
    for name, value in (manifest.get("alignment") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    # The trust summary: input vs kept vs a random subset of the same size (trust.py), one metric per fact.
    from tldr_tasks.trust import metrics as trust_metrics

    metrics.update(trust_metrics(manifest.get("trust")))
    sizes = np.array(sorted(cluster_counts(run)[0].values()), dtype=np.float64)
    if len(sizes):
        metrics.update({"clusters": float(len(sizes)), "cluster_size_min": float(sizes.min()),
                        "cluster_size_median": float(np.median(sizes)), "cluster_size_max": float(sizes.max())})
    # A folder without the manifest's alignment section: the same means from the sample stage's scores.
    before, after = alignment_scores(run)
    if len(before) and len(after):
        metrics.setdefault("alignment_input_mean", float(before.mean()))
        metrics.setdefault("alignment_kept_mean", float(after.mean()))
    for status in ("embedded", "reused", "replaced"):
        counted = [s for s in run["embed_status"].values() if s["status"] == status]
        if run["embed_status"]:
            metrics[f"shards_{status}"] = float(len(counted))
    # Per-stage seconds and throughput: the caption and materialize stages handle the kept samples,
    # the others the whole input.
    for stage, seconds in run.get("timings", {}).items():
        metrics[f"seconds.{stage}"] = seconds
        samples = manifest.get("kept" if stage in ("caption", "materialize") else "input_samples")
        if isinstance(samples, (int, float)) and seconds > 0 and stage != "evaluate":
            metrics[f"samples_per_second.{stage}"] = samples / seconds
    if run["evaluation"]:
        from tldr_tasks.stages.evaluate import flatten

        metrics.update({f"eval.{k}": v for k, v in flatten(run["evaluation"]).items()})
    # NaN (no confidence when no caption was scored) is left out: MLflow's parent run drops it, and
    # metrics.json must stay strict JSON for `dvc metrics show`.
    return {k: round(v, 4) for k, v in sorted(metrics.items()) if np.isfinite(v)}
