"""The DAG files: they import cleanly and fast, follow the house rules, and refuse bad params."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import airflow.providers.cncf.kubernetes  # noqa: F401 - declared in the airflow extra: missing fails, never skips
import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"


from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from airflow.sdk.exceptions import ParamValidationError  # noqa: E402
from test_report import run_dir  # noqa: E402, F401  (fixture: a finished, evaluated run folder)
from tldr_dagkit import settings  # noqa: E402
from tldr_dagkit.compress import CRAWL_ASSET  # noqa: E402
from tldr_dagkit.plan import build_plan, run_folder_name  # noqa: E402

from tldr_tasks.config import Config, ConfigError  # noqa: E402
from tldr_tasks.pipeline import STAGES  # noqa: E402

BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def dagbag():
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def compress(dagbag):
    return dagbag.dags["tldr_compress"]


def airflow_env() -> dict:
    return {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "PATH": f"{BIN}:{os.environ['PATH']}"}


def test_dagbag_imports_clean(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == {"tldr_compress", "tldr_ingest"}
    for dag in dagbag.dags.values():
        assert dag.tags and "tldr-vlp" in dag.tags
        assert dag.doc_md and dag.dag_id in dag.doc_md  # doc_md=__doc__, dag_id from the file name
        for task in dag.tasks:
            assert task.retries >= 2, f"{dag.dag_id}.{task.task_id} has retries={task.retries}"


def test_list_import_errors_local_exits_zero():
    env = airflow_env()
    subprocess.run([f"{BIN}/airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([f"{BIN}/airflow", "dags", "list-import-errors", "--local"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No data found" in proc.stdout


def test_parsing_imports_nothing_heavy():
    code = ("import sys; from airflow.dag_processing.dagbag import DagBag; "
            f"b = DagBag(dag_folder={str(DAGS)!r}); assert not b.import_errors, b.import_errors; "
            "print(sorted(m for m in ('torch', 'faiss', 'deepspeed', 'transformers', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=airflow_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_both_runners_have_every_stage(compress):
    ids = set(compress.task_dict)
    for spec in STAGES:
        tid = spec.name.replace("-", "_")
        for group in ("local", "kubernetes"):
            task = compress.task_dict[f"{group}.{tid}"]
            assert task.is_mapped == spec.sharded
            for dep in spec.deps:
                assert f"{group}.{dep.replace('-', '_')}" in task.upstream_task_ids
    assert type(compress.task_dict["local.cluster"]).__name__ == "BashOperator"
    assert compress.task_dict["kubernetes.cluster"].__class__.__name__ == "KubernetesPodOperator"
    assert {"plan", "shard_groups", "choose_runner", "evaluation_requested", "publish"} <= ids


def test_runner_branch_and_evaluation_gate(compress):
    choose = compress.task_dict["choose_runner"]
    assert choose.python_callable("local") == "local.train_captioner"
    assert choose.python_callable("kubernetes") == "kubernetes.train_captioner"
    assert choose.downstream_task_ids == {"local.train_captioner", "kubernetes.train_captioner"}
    gate = compress.task_dict["evaluation_requested"]
    assert gate.downstream_task_ids == {"local.evaluate", "kubernetes.evaluate"}
    assert gate.python_callable(params={"run_evaluation": False}) is False
    assert gate.python_callable(params={"run_evaluation": True}) is True
    publish = compress.task_dict["publish"]
    assert publish.trigger_rule == "none_failed_min_one_success"
    assert {"local.materialize", "kubernetes.materialize", "local.evaluate", "kubernetes.evaluate"} \
        <= publish.upstream_task_ids


def test_schedule_on_the_crawl_asset_alone(dagbag, compress):
    """Started by tldr_ingest's Asset or by a person: no clock, so unpausing creates no run (whose default
    input would not exist before tldr_ingest registered a crawl)."""
    assert type(compress.timetable).__name__ == "AssetTriggeredTimetable"  # no AssetOrTimeSchedule, no cron
    assert compress.timetable.asset_condition == CRAWL_ASSET
    assert compress.max_active_runs == 1
    ingest = dagbag.dags["tldr_ingest"]
    assert CRAWL_ASSET in ingest.task_dict["register_version"].outlets


def validated(dag, conf: dict) -> dict:
    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params.validate()


@pytest.mark.parametrize("conf", [
    {"ratio": 1.5}, {"ratio": 0}, {"ratio": -0.1}, {"ratio": "half"}, {"clusters": -1}, {"clusters": 2.5},
    {"feature": "pixels"}, {"strategy": "best"}, {"fusion": "merge"}, {"captioner_preset": "huge"},
    {"runner": "slurm"}, {"shard_groups": 0}, {"run_evaluation": "yes"}, {"input_url": ""},
    {"overrides": ["not an override"]},
])
def test_invalid_params_refused(compress, conf):
    with pytest.raises(ParamValidationError):
        validated(compress, conf)


def test_form_requires_only_what_a_run_needs(compress):
    """Airflow's trigger form marks a field required unless its schema type allows null."""
    optional = {name for name in compress.params
                if "null" in compress.params.get_param(name).schema["type"]}
    assert optional == {"retrain_captioner", "captioner_max_growth", "run_evaluation", "eval_input_url", "overrides"}
    emptied = validated(compress, {name: None for name in optional})
    assert all(emptied[name] is None for name in optional)


def test_valid_params_accepted(compress):
    defaults = validated(compress, {})
    assert defaults["ratio"] == 0.25 and defaults["runner"] == "local" and defaults["run_evaluation"] is False
    assert defaults["input_url"] == settings.crawl_url()
    conf = {"ratio": 1, "clusters": 3000, "feature": "code_index_pca", "strategy": "far_centroid",
            "fusion": "generated", "captioner_preset": "base", "runner": "kubernetes", "run_evaluation": True,
            "eval_input_url": "s3://b/eval", "overrides": ["captioner.epochs=1", "seed=2"]}
    assert {k: validated(compress, conf)[k] for k in conf} == conf
    assert validated(compress, {"ratio": "auto"})["ratio"] == "auto"  # the ratio curve's choice (curve.py)
    # The form's defaults are the pipeline's defaults.
    cfg = Config()
    form = ("feature", "strategy", "filter", "fusion", "clusters")
    assert tuple(defaults[k] for k in form) == (
        cfg.embed.feature, cfg.sample.strategy, cfg.sample.filter, cfg.caption.fusion, cfg.cluster.clusters)


def test_local_commands_use_the_venv(compress):
    params = validated(compress, {"input_url": "/data/crawl/{00000..00003}.tar", "shard_groups": 3})
    plan = build_plan(params, "manual__2026-01-01T00:00:00+00:00", executable=settings.tldr_executable(),
                      result_json=settings.POD_RESULT_PATH)
    command = plan["local__cluster"]
    assert f"{BIN}/tldr-vlp run cluster" in command
    assert "'/data/crawl/{00000..00003}.tar'" in command  # quoted: bash must not brace-expand it
    assert len(plan["groups"]) == 3
    for i, group in enumerate(plan["groups"]):
        words = shlex.split(group["local__embed"])
        assert words[words.index("--shard-index") + 1] == str(i) and words[words.index("--num-shards") + 1] == "3"
    # The command is valid bash and ends by printing the stage's result as the last line.
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    assert command.endswith('cat "$result"; echo')
    task = compress.task_dict["local.cluster"]
    assert task.append_env and task.env["TLDR_RUN_KEY"] == "{{ dag.dag_id }}/{{ run_id }}"
    assert task.env["TLDR_CPUS"] == "shared"  # a local worker runs several stages at once


def test_plan_refuses_bad_runs_before_work(compress):
    params = validated(compress, {})
    kwargs = {"executable": "tldr-vlp", "result_json": "/r.json"}
    with pytest.raises(ValueError, match="eval_input_url"):
        build_plan({**params, "run_evaluation": True}, "r", **kwargs)
    with pytest.raises(ConfigError, match="captioner.nope"):
        build_plan({**params, "overrides": ["captioner.nope=1"]}, "r", **kwargs)
    with pytest.raises(ConfigError, match="sample.ratio"):
        build_plan({**params, "overrides": ["sample.ratio=2"]}, "r", **kwargs)


@pytest.mark.parametrize("conf, message", [
    ({"ration": 0.3}, "unknown conf key 'ration' (did you mean 'ration' -> 'ratio'?"),
    ({"nosuch": 1, "ratio": 0.3}, "unknown conf key 'nosuch' (the keys are: captioner_max_growth,"),
    ({"overrides": ["captioner.nope=1"]}, "unknown parameter captioner.nope"),
    ({"overrides": ["seed=abc"]}, "seed='abc' is not valid"),
    ({"overrides": ["cluster.clusters=[1"]}, "not valid YAML"),
    ({"overrides": ["captioner.preset=huge"]}, "captioner.preset='huge' is not known"),
    ({"overrides": ["captioner.image_size=33"]}, "captioner.image_size=33 does not fit"),
    ({"overrides": ["embed.batch_size=0"]}, "embed.batch_size=0 is out of range"),
    ({"clusters": 100000}, "is more than the 200 samples"),
    ({"run_evaluation": True}, "eval_input_url is empty"),
    ({"run_evaluation": True, "eval_input_url": "/nonexistent/eval"}, "check --eval-input"),
    ({"input_url": "/nonexistent/crawl"}, "input shard not found"),
    ({"output_url": "{file}/out"}, "is below the file"),
])
def test_a_user_error_fails_plan_without_retry(compress, tiny_crawl, tmp_path, mlflow_store, conf, message):
    """The same parameters fail the same way on every try: plan fails at once (AirflowFailException
    skips the task's retries), with the reason in its log, and opens no MLflow run."""
    from airflow.sdk.exceptions import AirflowFailException

    (tmp_path / "file").write_text("")
    conf = {k: v.format(file=tmp_path / "file") if isinstance(v, str) else v for k, v in conf.items()}
    known = {k: v for k, v in conf.items() if k in compress.params}
    params = validated(compress, {"input_url": f"{tiny_crawl}/train", "output_url": str(tmp_path / "root"), **known})
    with pytest.raises(AirflowFailException, match=re.escape(message)):
        compress.task_dict["plan"].python_callable(params=params, run_id="manual__bad", ti=SimpleNamespace(
            dag_id="tldr_compress"), dag_run=SimpleNamespace(conf=conf))
    assert compress.task_dict["plan"].retries == 2  # retries stay for what may pass on a retry
    assert not (tmp_path / "root").exists()
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_run_folder_names_are_path_safe():
    assert run_folder_name("scheduled__2026-01-01T00:00:00+00:00") == "scheduled__2026-01-01T00-00-00-00-00"
    assert run_folder_name("asset_triggered__a/b c") == "asset_triggered__a-b-c"


def test_asset_triggered_run_compresses_the_landed_crawl(compress, tiny_crawl, mlflow_store):
    """A run started by tldr_ingest's Asset event reads the crawl URL and version from the event."""
    from datetime import UTC, datetime

    from airflow.sdk.api.datamodels._generated import AssetReferenceAssetEventDagRun
    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    def event(version: str, url: str) -> AssetEventDagRunReferenceResult:
        return AssetEventDagRunReferenceResult(
            asset=AssetReferenceAssetEventDagRun(name=CRAWL_ASSET.name, uri=CRAWL_ASSET.uri, extra={}),
            extra={"version": version, "url": url, "shards": 2}, source_task_id="register_version",
            source_dag_id="tldr_ingest", source_run_id="scheduled__x", source_map_index=-1, source_aliases=[],
            timestamp=datetime.now(UTC))

    old, landed = f"{tiny_crawl}/eval", f"{tiny_crawl}/train"
    events = TriggeringAssetEventsAccessor.build([event("aaa", old), event("bbb", landed)])
    ti = SimpleNamespace(dag_id="tldr_compress")
    params = validated(compress, {"output_url": str(mlflow_store / "out")})
    plan = compress.task_dict["plan"].python_callable(params=params, run_id="asset_triggered__1", ti=ti,
                                                      triggering_asset_events=events)
    assert plan["input"] == landed and plan["input_version"] == "bbb"
    assert f"--input {landed} " in plan["local__cluster"]
    # plan opened the run's MLflow parent run, tagged with the Airflow run and the crawl version
    parent = mlflow.MlflowClient().get_run(plan["mlflow_run_id"])
    assert parent.info.status == "RUNNING" and parent.data.tags["tldr.run_key"] == "tldr_compress/asset_triggered__1"
    assert parent.data.tags["airflow.run_id"] == "asset_triggered__1"
    assert parent.data.tags["tldr.input_version"] == "bbb"
    # named and tagged as a local compress's parent run: ratio, filter and strategy, start time; the key parameters
    assert parent.info.run_name.startswith(f"r{params['ratio']:.2f} {params['filter']}+{params['strategy']} ")
    assert (parent.data.tags["ratio"], parent.data.tags["strategy"], parent.data.tags["filter"],
            parent.data.tags["input"]) == (str(params["ratio"]), params["strategy"], params["filter"], landed)
    manual = compress.task_dict["plan"].python_callable(params={**params, "input_url": old}, run_id="manual__1", ti=ti,
                                                        triggering_asset_events=None)
    assert manual["input"] == old and manual["input_version"] is None


def test_failure_callback_ends_the_parent_run_failed(compress, tiny_crawl, mlflow_store):
    from tldr_dagkit.compress import end_run_failed

    ti = SimpleNamespace(dag_id="tldr_compress")
    params = validated(compress, {"input_url": f"{tiny_crawl}/train", "output_url": str(mlflow_store / "out")})
    plan = compress.task_dict["plan"].python_callable(params=params, run_id="manual__2", ti=ti)
    assert compress.default_args["on_failure_callback"] is end_run_failed
    end_run_failed({"ti": ti, "run_id": "manual__2"})
    assert mlflow.MlflowClient().get_run(plan["mlflow_run_id"]).info.status == "FAILED"
    end_run_failed({"ti": ti, "run_id": "manual__never_planned"})  # no parent yet: nothing to end, no error


def test_plan_ends_the_orphaned_runs_of_an_earlier_run_failed(compress, tiny_crawl, mlflow_store):
    """A run marked failed (or killed) before its failure callback ran leaves its MLflow runs RUNNING;
    with one active run per DAG, the next run's `plan` knows they are orphans."""
    ti = SimpleNamespace(dag_id="tldr_compress")
    params = validated(compress, {"input_url": f"{tiny_crawl}/train", "output_url": str(mlflow_store / "out")})
    old = compress.task_dict["plan"].python_callable(params=params, run_id="manual__old", ti=ti)["mlflow_run_id"]
    client = mlflow.MlflowClient()
    stage = client.create_run(client.get_run(old).info.experiment_id, run_name="embed[0/2]",
                              tags={"mlflow.parentRunId": old}).info.run_id
    new = compress.task_dict["plan"].python_callable(params=params, run_id="manual__new", ti=ti)["mlflow_run_id"]
    assert client.get_run(old).info.status == client.get_run(stage).info.status == "FAILED"
    assert client.get_run(new).info.status == "RUNNING"


def test_publish_records_what_local_compress_records(compress, run_dir, mlflow_store):  # noqa: F811
    """Airflow's last task (both runners) leaves the parent run as `compress` does: FINISHED, with the
    summary metrics `tldr-vlp compare` shows for the folder, the manifest and report, the lineage."""
    from tldr_dagkit.compress import COMPRESSED_ASSET

    from tldr_tasks import tracking
    from tldr_tasks.compare import load
    from tldr_tasks.contract import StageIO

    parent = tracking.parent_run_id(Config(), StageIO(input="crawl", out=str(run_dir)), key="tldr_compress/manual__3")
    plan = {"out": str(run_dir), "input": "crawl", "input_version": "v1", "runner": "kubernetes",
            "captioner": "captioners/x", "mlflow_run_id": parent}
    ti = SimpleNamespace(xcom_pull=lambda task_ids: None)
    events = {COMPRESSED_ASSET: SimpleNamespace(extra=None)}
    compress.task_dict["publish"].python_callable(plan=plan, ti=ti, outlet_events=events)
    run = mlflow.MlflowClient().get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == load(str(run_dir))["metrics"] and run.data.metrics["kept"] == 6
    client = mlflow.MlflowClient()
    assert "manifest.json" in {f.path for f in client.list_artifacts(parent)}
    assert "report/report.html" in {f.path for f in client.list_artifacts(parent, "report")}
    assert {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs} == {"crawl": "v1"}
    assert run.data.tags["clusters"] == str(int(run.data.metrics["clusters"]))  # the number the run used


def test_parsing_reads_no_variable_or_connection():
    """Parsing runs in the dag-processor on every change: it must not query the metadata database."""
    code = ("import airflow.sdk, airflow.models\n"
            "def refuse(*a, **k): raise AssertionError('read at parse time')\n"
            "for cls in (airflow.sdk.Variable, airflow.sdk.Connection, airflow.models.Variable, "
            "airflow.models.Connection):\n"
            "    for name in ('get', 'get_connection_from_secrets', 'get_variable_from_secrets'):\n"
            "        if hasattr(cls, name): setattr(cls, name, refuse)\n"
            "from airflow.dag_processing.dagbag import DagBag\n"
            f"b = DagBag(dag_folder={str(DAGS)!r})\n"
            "assert not b.import_errors, b.import_errors\n"
            "print(sorted(b.dags))")
    env = {k: v for k, v in airflow_env().items() if not k.startswith("AIRFLOW_VAR_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['tldr_compress', 'tldr_ingest']"


@pytest.mark.slow
def test_retrain_trains_and_registers_a_new_captioner_under_both_runners(compress, tiny_crawl, mlflow_store):
    """Retrain means retrain (issue 26): with the crawl and the parameters unchanged, a run whose form asks to
    retrain gets a captioner folder of its own (the pod runner's command names it too), trains there, and
    registers a new `tldr-captioner` version; a run without the request reuses the newest captioner."""
    tiny = ["captioner.epochs=1", "captioner.image_size=32", "captioner.batch_size=32"]
    ti = SimpleNamespace(dag_id="tldr_compress")
    params = validated(compress, {"input_url": f"{tiny_crawl}/train", "output_url": str(mlflow_store / "root"),
                                  "overrides": tiny})
    client = mlflow.MlflowClient()

    def plan_and_train(run_id: str, retrain: bool) -> dict:
        plan = compress.task_dict["plan"].python_callable(params={**params, "retrain_captioner": retrain},
                                                          run_id=run_id, ti=ti)
        command = plan["local__train_captioner"]
        pod = plan["pod__train_captioner"]
        assert pod[pod.index("--captioner") + 1] == plan["captioner"]  # the pod trains the same folder
        done = subprocess.run(["bash", "-c", command], env={**os.environ, "TLDR_RUN_KEY": f"tldr_compress/{run_id}"},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return plan

    first = plan_and_train("manual__first", retrain=False)
    assert [str(v.version) for v in client.search_model_versions("name = 'tldr-captioner'")] == ["1"]
    reused = plan_and_train("manual__reuse", retrain=False)
    assert reused["captioner"] == first["captioner"] and reused["captioner_reason"].startswith("reusing")
    retrained = plan_and_train("manual__retrain", retrain=True)
    assert retrained["captioner"] != first["captioner"] and retrained["captioner_reason"] == "retrain requested"
    versions = client.search_model_versions("name = 'tldr-captioner'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    newest = next(v for v in versions if str(v.version) == "2")
    assert newest.run_id == retrained["mlflow_run_id"]
    assert client.get_run(retrained["mlflow_run_id"]).data.tags["tldr.captioner_version"] == "2"
    # the next run without the request reuses the retrained captioner
    after = compress.task_dict["plan"].python_callable(params=params, run_id="manual__after", ti=ti)
    assert after["captioner"] == retrained["captioner"]
