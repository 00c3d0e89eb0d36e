"""The local runner: every stage in order, in this process, resumable, tracked in MLflow.

`compress` is the main job on a user's crawl (`tldr-vlp compress --input URL --out URL`). A rerun
with the same --out skips every finished part; a rerun with different parameters is refused, so
an output folder never mixes two configurations.
"""

from __future__ import annotations

import json
import sys
import time

from tldr_tasks import storage, tracking
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.pipeline import STAGES, load_stage_module
from tldr_tasks.stages.base import StageIO, StageResult


def check_run_config(cfg: Config, io: StageIO) -> None:
    """Record the resolved config in `out/config.json`; refuse an --out made with other parameters."""
    url = storage.join(io.out, "config.json")
    if storage.exists(url):
        previous = json.loads(storage.read_text(url))
        if previous.get("hash") != cfg.hash():
            changed = sorted(k for k in cfg.to_dict() if cfg.to_dict()[k] != previous.get("config", {}).get(k))
            raise ConfigError(f"{io.out} holds a run made with different parameters (sections changed: "
                              f"{', '.join(changed) or 'unknown'}); use a new --out or delete that folder")
        return
    storage.write_text_atomic(url, json.dumps({"hash": cfg.hash(), "config": cfg.to_dict()}, indent=1))


def count_input_samples(shard_urls: list[str]) -> int | None:
    """Samples in the crawl without decoding it: img2dataset's `NNNNN_stats.json` successes when
    present, else the distinct keys in local tars; None when it cannot be told cheaply."""
    import tarfile

    total = 0
    for url in shard_urls:
        stats_url = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
        if stats_url and storage.exists(stats_url):
            total += int(json.loads(storage.read_text(stats_url)).get("successes", 0))
        elif "://" not in url:
            try:
                with tarfile.open(url) as tar:
                    total += len({m.name.rsplit("/", 1)[-1].split(".")[0] for m in tar.getmembers() if m.isfile()})
            except (tarfile.TarError, OSError):
                continue  # a broken shard is reported by the stages, sample by sample
        else:
            return None
    return total


def preflight(cfg: Config, io: StageIO, with_eval: bool) -> None:
    """Refuse wrong parameters before any work, with a message that says what to change."""
    if with_eval and not io.eval_input:
        raise ConfigError("the evaluation needs clean held-out shards: pass --eval-input")
    shard_urls = io.input_shards()
    samples = count_input_samples(shard_urls)
    if samples is not None and cfg.cluster.clusters > samples:
        raise ConfigError(f"cluster.clusters={cfg.cluster.clusters} is more than the {samples} samples in "
                          f"{io.input}; use --clusters {max(1, samples // 25)} (about 25 samples per cluster)")
    if samples is not None and round(cfg.sample.ratio * samples) < 1:
        raise ConfigError(f"sample.ratio={cfg.sample.ratio} keeps no sample of {samples}; raise --ratio")


def run_stage(cfg: Config, io: StageIO, name: str, **kwargs) -> tuple[StageResult, float]:
    """One stage in this process inside its MLflow stage run; returns the result and seconds taken."""
    module = load_stage_module(name)
    started = time.time()
    with tracking.stage_run(cfg, io, name, kwargs):
        result = module.run(cfg, io, **kwargs)
        tracking.log_stage_result(name, result, time.time() - started)
    return result, time.time() - started


def compress(cfg: Config, io: StageIO, with_eval: bool = False) -> dict:
    """Run every stage (and the evaluation when asked) and return a summary dict:
    {"results": {stage: metrics}, "seconds": {stage: s}, "mlflow_run_id", "manifest"}."""
    preflight(cfg, io, with_eval)
    check_run_config(cfg, io)
    parent = tracking.parent_run_id(cfg, io)
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
            if spec.name == "train-captioner" and not result.skipped:
                version = tracking.register_captioner(parent, io.captioner_dir,
                                                      description=f"trained on {tracking.redact(io.input)}")
                tracking.log_to_parent(parent, {}, tags={"tldr.captioner_version": str(version)})
    except BaseException:
        tracking.finish_parent(parent, "FAILED")
        raise
    manifest = json.loads(storage.read_text(storage.join(io.shards_dir, "manifest.json")))
    summary = {f"{stage}.{k}": v for stage, metrics in results.items() for k, v in metrics.items()}
    summary.update({f"seconds.{stage}": s for stage, s in seconds.items()})
    tracking.log_to_parent(parent, summary)
    tracking.finish_parent(parent)
    return {"results": results, "seconds": seconds, "mlflow_run_id": parent, "manifest": manifest}
