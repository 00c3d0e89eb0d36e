"""MLflow tracking: one parent run per compression, one nested run per stage (and shard group),
the resolved config as params, stage metrics and durations, the report and plots as artifacts, and
the captioner as a registered model version, so runs compare side by side in the MLflow UI.

The store is MLFLOW_TRACKING_URI, or a local SQLite file `mlflow.db` in the working directory
(`mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it). All stages of one compression find
their parent run by the tag `tldr.run_key` (env TLDR_RUN_KEY, default the output URL), so stages run
as separate processes or pods still land in one run. Airflow's context (AIRFLOW_CTX_* env) is
recorded as tags.

The parent run's life belongs to whoever orchestrates: `compress` opens and ends it; in Airflow
`plan` opens it, `publish` ends it FINISHED and a task's failure callback ends it FAILED; a lone
`tldr-vlp run` opens it when missing and leaves it running. A run killed mid-way (SIGKILL, a run
marked failed) cannot end its own MLflow runs: the next run that finds them RUNNING ends them FAILED
(`end_stale_runs`): `compress` on the same --out, Airflow's next `plan` of the same DAG, a retried
stage task under the same parent.

The MLflow 3.17 UI opens an experiment on its GenAI overview unless the page's URL (or the browser's
last choice) says `workflowType=machine_learning`; `ui_url` gives the runs table's address.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tldr_tasks import storage
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO, StageResult

EXPERIMENT = "tldr-vlp"
STALE_TAG = "tldr.ended_by"
CAPTIONER_MODEL_NAME = "tldr-captioner"
AIRFLOW_CONTEXT = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    "AIRFLOW_CTX_MAP_INDEX": "airflow.map_index",
}


def redact(text: str) -> str:
    """Drop credentials from URLs (`s3://key:secret@host/...` -> `s3://***@host/...`) before logging."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))


def _mlflow():
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("TLDR_MLFLOW_EXPERIMENT", EXPERIMENT)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        # Artifacts (the registered captioners) beside the SQLite file, not in ./mlruns of whatever
        # folder the stage process happens to run in.
        folder = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlruns")
        try:
            mlflow.create_experiment(name, artifact_location=Path(folder).as_uri())
        except mlflow.exceptions.MlflowException:  # another stage process created it first
            pass
    mlflow.set_experiment(name)
    return mlflow


def ui_url(server: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment. The 3.17 UI takes an experiment's kind from the
    URL's `workflowType` (else the browser's last choice, else GenAI: the traces overview); the
    `mlflow.experimentKind` tag is not read while its workflow switch is on (mlflow/server/js)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_key(io: StageIO) -> str:
    return os.environ.get("TLDR_RUN_KEY") or redact(io.out)


def _airflow_tags() -> dict[str, str]:
    return {tag: os.environ[env] for env, tag in AIRFLOW_CONTEXT.items() if os.environ.get(env)}


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def key_filter(key: str) -> str:
    """The MLflow search filter of the parent runs of run key `key`."""
    return f"tags.`tldr.run_key` = '{_quote(key)}'"


def find_parent(key: str) -> str | None:
    """The id of the newest parent run tagged `tldr.run_key = key`, or None (nothing is created).
    Newest: a rerun of `compress` on the same --out opens a parent of its own after the old one."""
    found = _mlflow().search_runs(filter_string=key_filter(key),
                                  order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return found[0].info.run_id if found else None


def end_stale_runs(filter_string: str, reason: str) -> list[str]:
    """End FAILED every RUNNING run matching `filter_string` (MLflow search syntax) and every RUNNING
    child of those; tags each with `tldr.ended_by = reason`. Returns the ended run ids.

    Only a caller that knows no live process owns those runs may call this: a killed process left
    them RUNNING and nothing else would ever end them."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    ended: list[str] = []
    for run in mlflow.search_runs(filter_string=f"{filter_string} and attributes.status = 'RUNNING'",
                                  output_format="list"):
        children = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                                    "attributes.status = 'RUNNING'", output_format="list")
        for stale in [*children, run]:
            client.set_tag(stale.info.run_id, STALE_TAG, reason)
            client.set_terminated(stale.info.run_id, "FAILED")
            ended.append(stale.info.run_id)
    if ended:
        print(f"MLflow: ended {len(ended)} orphaned RUNNING run(s) FAILED ({reason})", file=sys.stderr)
    return ended


def log_params(run_id: str, params: dict) -> None:
    """A nested dict as dotted params (`sample.ratio`) on a run."""
    from mlflow.entities import Param

    flat = _flatten(params)
    _mlflow().MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in sorted(flat.items())])


def run_name(cfg: Config, label: str = "", when: float | None = None) -> str:
    """A parent run's name, for what tells runs apart in the MLflow runs table: the ratio, the sampling
    strategy, an optional `label` (the demo's crawl) and the local time it started, to the minute:
    "r0.25 clip_score+balanced 2026-12-06 16:38"."""
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
    ratio = cfg.sample.ratio if isinstance(cfg.sample.ratio, str) else f"{cfg.sample.ratio:.2f}"  # `auto`
    return " ".join(part for part in (f"r{ratio}", selection_name(cfg), label, stamp) if part)


def selection_name(cfg: Config) -> str:
    """The strategy, behind its filter when there is one: `clip_score+balanced`."""
    s = cfg.sample
    return s.strategy if s.filter == "none" else f"{s.filter}+{s.strategy}"


def key_tags(cfg: Config, io: StageIO) -> dict[str, str]:
    """The key parameters as plain tags (the runs table lists tags beside the name; params need a column
    chosen): ratio, strategy, filter, alignment, fusion, captioner preset, clusters (the configured number; 0 =
    the size rule, replaced by the number used once the run is recorded: record_run) and the input."""
    return {"ratio": str(cfg.sample.ratio), "strategy": cfg.sample.strategy, "filter": cfg.sample.filter,
            "alignment": cfg.sample.alignment,
            "fusion": cfg.caption.fusion, "captioner_preset": cfg.captioner.preset,
            "clusters": str(cfg.cluster.clusters), "input": redact(io.input)}


def parent_run_id(cfg: Config, io: StageIO, tags: dict[str, str] | None = None, key: str | None = None,
                  new: bool = False, label: str = "") -> str:
    """The id of this compression's parent run (tag `tldr.run_key` = `key`, default `run_key(io)`),
    created on first use, or always when `new`: named by `run_name` (`$TLDR_RUN_NAME` wins), with the
    config as params, the key parameters as tags (`key_tags`) and `tags`."""
    mlflow = _mlflow()
    key = key or run_key(io)
    found = None if new else find_parent(key)
    if found:
        return found
    tags = {"tldr.run_key": key, "tldr.input": redact(io.input), "tldr.out": redact(io.out),
            "tldr.config_hash": cfg.hash(), **key_tags(cfg, io), **_airflow_tags(), **(tags or {})}
    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name(
        os.environ.get("TLDR_MLFLOW_EXPERIMENT", EXPERIMENT)).experiment_id, tags=tags,
        run_name=os.environ.get("TLDR_RUN_NAME") or run_name(cfg, label))
    # Only what describes the run: not the `crawl` section (the synthetic crawl generator's: a run on
    # another crawl would record settings that never made its input; the demo logs its crawl's own),
    # nor `evaluate` before an evaluation runs (stage_run adds it then).
    log_params(run.info.run_id, {k: v for k, v in cfg.to_dict().items() if k not in ("crawl", "evaluate")})
    client.set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


@contextmanager
def stage_run(cfg: Config, io: StageIO, stage: str, kwargs: dict) -> Iterator[str]:
    """Run a stage inside a nested MLflow run under the compression's parent; yields the parent id."""
    mlflow = _mlflow()
    parent = parent_run_id(cfg, io)
    name = stage
    if kwargs.get("num_shards", 1) > 1:
        name = f"{stage}[{kwargs['shard_index']}/{kwargs['num_shards']}]"
    tags = {"mlflow.parentRunId": parent, "tldr.stage": stage, **_airflow_tags()}
    # An earlier attempt of this very task (an Airflow retry after a kill) left its run RUNNING; no
    # two attempts of one stage part run at once, so it is orphaned.
    end_stale_runs(f"tags.`mlflow.parentRunId` = '{parent}' and attributes.run_name = '{_quote(name)}'",
                   "a retry of the same stage part found it RUNNING")
    if stage == "evaluate":  # the same values again on a retry: MLflow accepts them
        log_params(parent, {"evaluate": cfg.to_dict()["evaluate"]})
    with mlflow.start_run(run_name=name, tags=tags, nested=mlflow.active_run() is not None):
        mlflow.log_params({k: str(v) for k, v in kwargs.items()})
        yield parent
    if os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        mlflow.MlflowClient().set_tag(parent, "airflow.run_id", os.environ["AIRFLOW_CTX_DAG_RUN_ID"])


def log_stage_result(stage: str, result: StageResult, seconds: float) -> None:
    """Metrics of the active stage run, plus the stage's duration."""
    mlflow = _mlflow()
    numbers = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    numbers["seconds"] = seconds
    mlflow.log_metrics({_metric_name(k): v for k, v in numbers.items()})
    mlflow.set_tag("tldr.skipped", str(result.skipped).lower())


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_to_parent(parent: str, metrics: dict[str, float], artifacts: list[str] = (),
                  tags: dict[str, str] | None = None, artifact_path: str | None = None) -> None:
    """Summary numbers and files (report, plots, manifest; local paths or fsspec URLs) on the
    compression's parent run; files under `artifact_path` when given."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v]
    for start in range(0, len(items), 500):
        client.log_batch(parent, metrics=items[start:start + 500])
    for path in artifacts:
        if storage.exists(path):
            with _local(path) as local:
                client.log_artifact(parent, local, artifact_path)
    for key, value in (tags or {}).items():
        client.set_tag(parent, key, redact(value))


@contextmanager
def _local(url: str) -> Iterator[str]:
    """`url` as a local path for MLflow's uploads: itself, or a temporary copy of a remote (s3://) file
    or folder under the same name."""
    if "://" not in url:
        yield url
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
        fs, path = storage.filesystem(url)
        fs.get(path.rstrip("/"), local, recursive=True)
        yield local


def _dataset_source(url: str):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
            warnings.simplefilter("ignore")
            return resolve_dataset_source(url)
    except Exception:  # noqa: BLE001 - a scheme MLflow has no source type for: keep the URL as it is
        return HTTPDatasetSource(url)


def log_lineage(parent: str, input_url: str, input_digest: str, output_url: str, output_digest: str | None,
                captioner: str | None = None) -> None:
    """The compression's lineage on its parent run: the input crawl and the compressed output as
    MLflow datasets (source = URL, digest = the crawl's DVC/content version and the output's content
    digest; context "training" and "output", shown in the run's Datasets column), the same digests
    and the captioner's weights hash as tags."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = _mlflow().MlflowClient()
    inputs = []
    for name, url, digest, context in (("crawl", input_url, input_digest, "training"),
                                       ("compressed", output_url, output_digest, "output")):
        if digest:
            dataset = MetaDataset(_dataset_source(redact(url)), name=name, digest=str(digest))
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    # MLflow has no dataset outputs for runs (log_outputs takes models): the output goes in as an
    # input whose context says "output", as mlflow.log_input(dataset, context="output") would log it.
    client.log_inputs(parent, datasets=inputs)
    tags = {"tldr.input_version": input_digest, "tldr.output_version": output_digest,
            "tldr.captioner_weights": captioner}
    for key, value in tags.items():
        if value:
            client.set_tag(parent, key, str(value))


def finish_parent(parent: str, status: str = "FINISHED") -> None:
    _mlflow().MlflowClient().set_terminated(parent, status)


def finish_parent_by_key(key: str, status: str) -> str | None:
    """End the parent run tagged `tldr.run_key = key` with `status` (FINISHED or FAILED) when it
    exists; returns its id. An orchestrator's last step or failure callback calls this."""
    parent = find_parent(key)
    if parent:
        finish_parent(parent, status)
    return parent


def register_captioner(parent: str, captioner_dir: str, description: str = "") -> str:
    """Register the captioner in `captioner_dir` as a version of the `tldr-captioner` model, once per
    training: a captioner already registered (by its weights hash, the tag `captioner_version`, and its
    folder, the tag `captioner_folder`) keeps its version, so retries and runs reusing it add none; a
    retrain (a new folder, captioners.choose) adds one even where deterministic training gave the same
    weights. Otherwise the folder (safetensors + config + tokenizer) is logged on the parent run and
    registered.
    Returns the model version number, also set as the parent's tag `tldr.captioner_version`."""
    from tldr_tasks.models.captioner import captioner_version

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    weights = captioner_version(captioner_dir)
    try:
        client.get_registered_model(CAPTIONER_MODEL_NAME)
    except mlflow.exceptions.MlflowException:  # RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(CAPTIONER_MODEL_NAME,
                                       description="TL;DR codebook captioner (ViT -> VQ codebook -> decoder)")
    where = redact(captioner_dir.rstrip("/"))
    known = [v for v in client.search_model_versions(f"name = '{CAPTIONER_MODEL_NAME}' and "
                                                     f"tags.captioner_version = '{weights}'")
             if v.tags.get("captioner_folder") == where]
    if known:
        version = str(min(int(v.version) for v in known))
    else:
        with _local(captioner_dir) as local:
            client.log_artifacts(parent, local, artifact_path="captioner")
        source = f"{client.get_run(parent).info.artifact_uri}/captioner"
        version = str(client.create_model_version(CAPTIONER_MODEL_NAME, source=source, run_id=parent,
                                                  tags={"captioner_version": weights, "captioner_folder": where},
                                                  description=description).version)
    client.set_tag(parent, "tldr.captioner_version", version)
    client.set_tag(parent, "tldr.captioner_weights", weights)
    return version
