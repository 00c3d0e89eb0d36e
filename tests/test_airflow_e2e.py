"""tldr_compress end to end in Airflow (slow: minutes each).

- `airflow dags test tldr_compress` twice with the local runner on a tiny crawl, with other
  `captioner.*` values: compressed shards, the publish XCom, two captioners trained and registered
  as two model versions, both MLflow parent runs FINISHED with their nested stage runs, all tagged
  with the Airflow run id. A run failing at run time ends its parent run FAILED.
- The real services (scripts/airflow-local.sh) on a free port: the api-server's socket on
  127.0.0.1 is the only one they listen on (and, while a run's tasks train the captioner, nothing listens
  outside 127.0.0.1); trigger through the REST API with a conf, wait for
  success; a ratio of 1.5 is refused with 400.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
BIN = Path(sys.executable).parent
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)

# declared in the airflow extra: a missing provider fails here, it is never skipped
import airflow.providers.cncf.kubernetes  # noqa: E402, F401

# Small enough for a 2-core CPU: one captioner epoch, 4 clusters, short greedy captions.
TINY_CONF = {"clusters": 4, "shard_groups": 2, "run_evaluation": False,
             "overrides": ["captioner.epochs=1", "captioner.image_size=32", "caption.num_beams=1",
                           "caption.min_new_tokens=2", "caption.max_new_tokens=8"]}


def airflow_env(data_root: Path, **extra) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TLDR_DATA_ROOT": str(data_root),
            "MLFLOW_TRACKING_URI": f"sqlite:///{data_root}/mlflow.db", "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            **extra}


@pytest.fixture(scope="session")
def migrated_db():
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env={**os.environ}, check=True, capture_output=True,
                   timeout=600)
    return os.environ["AIRFLOW_HOME"]


def dags_test(dag_id: str, conf: dict, env: dict, state: str = "success") -> str:
    """Run `airflow dags test`, assert the run's final state, and return its log."""
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert f"state={state}" in log, log[-5000:]
    if state == "success":
        assert proc.returncode == 0, log[-5000:]
    return log


def latest(dag_id: str, task_id: str) -> tuple[str, object]:
    """(run_id, XCom return value of task_id) of the newest run of dag_id, read from the metadata DB."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        row = (session.query(XComModel)
               .filter_by(dag_id=dag_id, run_id=run.run_id, task_id=task_id, key="return_value").first())
        return run.run_id, (XComModel.deserialize_value(row) if row is not None else None)


def mlflow_runs_for(tracking_uri: str, airflow_run_id: str):
    """The runs of one Airflow run, read with a client of that store (no process-wide tracking URI:
    later tests read the store their own MLFLOW_TRACKING_URI names)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`airflow.run_id` = '{airflow_run_id}'")


def shard_count(url: str) -> int:
    return len(list(Path(url).glob("*.tar")))


def stage_runs(client, parent) -> dict[str, object]:
    """The parent's nested runs by stage name (sharded stages: one per shard group)."""
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {c.info.run_name: c for c in children}


@pytest.mark.slow
def test_dags_test_local_runner_honours_captioner_params(tiny_crawl, migrated_db, tmp_path, monkeypatch, capsys):
    import mlflow

    env = airflow_env(tmp_path)
    out = tmp_path / "compressed"
    runs = []
    for extra in ([], ["captioner.lr=0.001"]):  # the second run asks for another captioner
        conf = {**TINY_CONF, "input_url": f"{tiny_crawl}/train", "output_url": str(out), "runner": "local",
                "overrides": TINY_CONF["overrides"] + extra}
        dags_test("tldr_compress", conf, env)
        runs.append(latest("tldr_compress", "publish"))

    run_id, summary = runs[0]
    assert summary["runner"] == "local" and summary["out"].startswith(str(out / "runs"))
    assert shard_count(summary["shards_url"]) >= 1
    assert summary["metrics"]["kept"] == pytest.approx(200 * 0.25, abs=4)
    assert (summary["embed"]["shards_embedded"], summary["embed"]["shards_reused"]) == (2, 0)
    assert summary["evaluation"] is None
    # Two captioners, one per set of captioner parameters, each trained, embedded with and registered once.
    trained = sorted(str(p.parent) for p in (out / "captioners").glob("*/COMPLETE"))
    assert sorted(s["captioner"] for _, s in runs) == trained and len(trained) == 2
    assert runs[1][1]["embed"]["shards_embedded"] == 2  # embeddings are keyed by captioner version

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions("name = 'tldr-captioner'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {v.run_id for v in versions} == {s["mlflow_run_id"] for _, s in runs}
    for run_id, summary in runs:
        parent = client.get_run(summary["mlflow_run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["tldr.run_key"] == f"tldr_compress/{run_id}"
        assert parent.data.tags["airflow.run_id"] == run_id and parent.data.tags["airflow.dag_id"] == "tldr_compress"
        assert parent.data.metrics["kept"] == summary["metrics"]["kept"]  # compare's run-folder names
        assert "seconds.embed" in parent.data.metrics and "alignment_kept_mean" in parent.data.metrics
        assert "report/report.html" in {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
        manifest = json.loads((Path(summary["out"]) / "shards" / "manifest.json").read_text())
        assert {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs} == {
            "crawl": manifest["input_version"], "compressed": manifest["output_version"]}
        assert parent.data.tags["tldr.captioner_weights"] == manifest["captioner_version"]
        children = stage_runs(client, parent)
        assert set(children) == {"train-captioner", "embed[0/2]", "embed[1/2]", "kmeans", "assign[0/2]",
                                 "assign[1/2]", "cluster", "sample", "caption[0/2]", "caption[1/2]", "materialize"}
        for child in children.values():
            assert child.info.status == "FINISHED"
            assert child.data.tags["airflow.run_id"] == run_id
            assert child.data.tags["airflow.task_id"].startswith("local.")
        assert children["train-captioner"].data.tags["tldr.skipped"] == "false"
    # the two recompressions side by side: the changed parameter is marked, both runs' metrics shown
    from tldr_tasks import compare

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    capsys.readouterr()
    assert compare.main(["--all", *(summary["mlflow_run_id"] for _, summary in runs)]) == 0
    printed = capsys.readouterr().out
    assert any(line.startswith("* captioner.lr") for line in printed.splitlines())
    kept_row = next(line for line in printed.splitlines() if line[2:].startswith("kept "))
    assert len(kept_row.split()) == 3  # the name and one value per run


@pytest.mark.slow
def test_a_run_failing_at_run_time_ends_its_parent_failed(tiny_crawl, migrated_db, tmp_path):
    import mlflow

    env = airflow_env(tmp_path, TLDR_RETRY_DELAY_S="1")  # retries as configured, without the 30 s waits
    # The plan accepts it; train-captioner fails when it finds fewer samples (200) than one batch.
    conf = {**TINY_CONF, "overrides": [*TINY_CONF["overrides"], "captioner.batch_size=256"],
            "input_url": f"{tiny_crawl}/train", "output_url": str(tmp_path / "out"), "runner": "local"}
    dags_test("tldr_compress", conf, env, state="failed")
    run_id, summary = latest("tldr_compress", "publish")
    assert summary is None
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents = [r for r in mlflow_runs_for(env["MLFLOW_TRACKING_URI"], run_id) if "tldr.run_key" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    attempts = stage_runs(client, parents[0])
    assert set(attempts) == {"train-captioner"} and attempts["train-captioner"].info.status == "FAILED"


@pytest.mark.slow
def test_a_bad_parameter_fails_plan_once(tiny_crawl, migrated_db, tmp_path):
    """A deterministic user error is not retried (plan raises AirflowFailException): one try, its
    reason in the task log, no MLflow run, nothing under the output root."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    env = airflow_env(tmp_path, TLDR_RETRY_DELAY_S="1")
    conf = {**TINY_CONF, "overrides": ["embed.batch_size=0"], "input_url": f"{tiny_crawl}/train",
            "output_url": str(tmp_path / "out"), "runner": "local"}
    log = dags_test("tldr_compress", conf, env, state="failed")
    assert "error: embed.batch_size=0 is out of range (use a value >= 1)" in log
    run_id, _ = latest("tldr_compress", "plan")
    with create_session() as session:
        plan = session.query(TaskInstance).filter_by(dag_id="tldr_compress", run_id=run_id, task_id="plan").one()
        assert (plan.state, plan.try_number, plan.max_tries) == ("failed", 1, 2)
    assert not mlflow_runs_for(env["MLFLOW_TRACKING_URI"], run_id)
    assert not (tmp_path / "out").exists()


class Api:
    def __init__(self, base: str, home: Path):
        self.base = base
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        status, body = self.call("POST", "/auth/token", {"username": "admin", "password": password}, auth=False)
        assert status in (200, 201), body
        self.token = body["access_token"]

    def call(self, method: str, path: str, body=None, auth: bool = True):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()


def free_port() -> int:
    """A port nothing on loopback listens on now (other worktrees' tests run Airflow too)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def airflow_services(tmp_path):
    """scripts/airflow-local.sh as docs/airflow.md starts it (AIRFLOW_PORT: a free port) with its own
    AIRFLOW_HOME; yields (Api, env, the script's process); stopped by SIGTERM. The scheduler's and the
    triggerer's log servers would listen on 8793 and 8794 on every address: the socket test finds them."""
    home, port = tmp_path / "airflow_home", free_port()
    env = airflow_env(tmp_path / "data", AIRFLOW_HOME=str(home), AIRFLOW_PORT=str(port), VENV_BIN=str(BIN))
    log = open(tmp_path / "airflow-local.log", "w")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "airflow-local.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while "Airflow is up" not in (tmp_path / "airflow-local.log").read_text():
            assert proc.poll() is None, (tmp_path / "airflow-local.log").read_text()
            assert time.time() < deadline, "Airflow did not start in 300 s"
            time.sleep(2)
        yield Api(f"http://127.0.0.1:{port}", home), env, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
        assert "stopped." in (tmp_path / "airflow-local.log").read_text()


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket a process or any of its descendants listens on."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.NoSuchProcess:  # a short-lived child (a task, a parse) that ended meanwhile
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


@pytest.mark.slow
def test_local_services_listen_on_loopback_only(airflow_services):
    api, _, proc = airflow_services
    deadline = time.time() + 180
    # Every service up (each would have opened its sockets by then): their heartbeats reach the API.
    while True:
        health = api.call("GET", "/api/v2/monitor/health")[1]
        if all((health.get(name) or {}).get("status") == "healthy" for name in ("scheduler", "triggerer",
                                                                                 "dag_processor")):
            break
        assert time.time() < deadline, health
        time.sleep(2)
    assert listening_sockets(proc.pid) == {("127.0.0.1", int(api.base.rsplit(":", 1)[1]))}


@pytest.mark.slow
def test_rest_trigger_on_real_services(tiny_crawl, airflow_services, tmp_path):
    api, env, proc = airflow_services
    deadline = time.time() + 180
    while api.call("GET", "/api/v2/dags/tldr_compress")[0] != 200:  # the dag-processor's first parse
        assert time.time() < deadline, "tldr_compress never appeared in the API"
        time.sleep(2)
    assert api.call("PATCH", "/api/v2/dags/tldr_compress", {"is_paused": False})[0] == 200
    bad = api.call("POST", "/api/v2/dags/tldr_compress/dagRuns", {"logical_date": None, "conf": {"ratio": 1.5}})
    assert bad[0] == 400 and "ratio" in bad[1]
    conf = {**TINY_CONF, "input_url": f"{tiny_crawl}/train", "output_url": str(tmp_path / "out")}
    status, run = api.call("POST", "/api/v2/dags/tldr_compress/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run
    run_id = run["dag_run_id"]
    deadline = time.time() + 1500
    seen: set[tuple[str, int]] = set()  # what the services and their tasks (train-captioner too) listen on
    while True:
        seen |= listening_sockets(proc.pid)
        state = api.call("GET", f"/api/v2/dags/tldr_compress/dagRuns/{run_id}")[1]["state"]
        if state in ("success", "failed"):
            break
        assert time.time() < deadline, "the run did not finish in 25 minutes"
        time.sleep(0.5)
    assert state == "success"
    assert {address for address, _ in seen} == {"127.0.0.1"}, seen
    status, xcom = api.call("GET", f"/api/v2/dags/tldr_compress/dagRuns/{run_id}/taskInstances/publish/xcomEntries/"
                                   "return_value")
    assert status == 200, xcom
    summary = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    assert summary["out"].endswith(run_id.replace(":", "-").replace("+", "-"))
    assert summary["mlflow_run_id"] and shard_count(summary["shards_url"]) >= 1
    assert mlflow_runs_for(env["MLFLOW_TRACKING_URI"], run_id)
