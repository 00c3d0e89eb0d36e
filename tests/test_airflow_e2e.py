"""tldr_compress end to end in Airflow (slow: minutes each).

- `airflow dags test tldr_compress` with the local runner on a tiny crawl: compressed shards, the
  publish XCom, and the MLflow run tagged with the Airflow run id.
- The real services (scripts/airflow-local.sh) on a free loopback port: trigger through the REST
  API with a conf, wait for success; a ratio of 1.5 is refused with 400.
"""

from __future__ import annotations

import json
import os
import signal
import socket
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

pytest.importorskip("airflow.providers.cncf.kubernetes")

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


def dags_test(dag_id: str, conf: dict, env: dict) -> None:
    proc = subprocess.run([str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)], env=env,
                          capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "state=success" in log, log[-5000:]


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
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`airflow.run_id` = '{airflow_run_id}'")


def shard_count(url: str) -> int:
    return len(list(Path(url).glob("*.tar")))


@pytest.mark.slow
def test_dags_test_local_runner(tiny_crawl, migrated_db, tmp_path):
    env = airflow_env(tmp_path)
    out = tmp_path / "compressed"
    dags_test("tldr_compress", {**TINY_CONF, "input_url": f"{tiny_crawl}/train", "output_url": str(out),
                                "runner": "local"}, env)
    run_id, summary = latest("tldr_compress", "publish")
    assert summary["runner"] == "local" and summary["out"].startswith(str(out / "runs"))
    assert shard_count(summary["shards_url"]) >= 1
    assert summary["metrics"]["kept"] == pytest.approx(200 * 0.25, abs=4)
    assert summary["embed"] == {"shards_embedded": 2, "shards_reused": 0}
    assert summary["evaluation"] is None
    runs = mlflow_runs_for(env["MLFLOW_TRACKING_URI"], run_id)
    assert runs, f"no MLflow run tagged airflow.run_id={run_id}"
    assert summary["mlflow_run_id"] in {r.info.run_id for r in runs}
    parent = next(r for r in runs if r.info.run_id == summary["mlflow_run_id"])
    assert parent.data.tags["tldr.run_key"] == f"tldr_compress/{run_id}"
    stage_tags = {r.data.tags.get("airflow.task_id") for r in runs}
    assert {"local.train_captioner", "local.materialize"} <= stage_tags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def airflow_services(tmp_path):
    """scripts/airflow-local.sh on a free loopback port with its own AIRFLOW_HOME; stopped by SIGTERM."""
    home, port = tmp_path / "airflow_home", free_port()
    env = airflow_env(tmp_path / "data", AIRFLOW_HOME=str(home), AIRFLOW_PORT=str(port))
    log = open(tmp_path / "airflow-local.log", "w")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "airflow-local.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while "Airflow is up" not in (tmp_path / "airflow-local.log").read_text():
            assert proc.poll() is None, (tmp_path / "airflow-local.log").read_text()
            assert time.time() < deadline, "Airflow did not start in 300 s"
            time.sleep(2)
        yield Api(f"http://127.0.0.1:{port}", home), env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
        assert "stopped." in (tmp_path / "airflow-local.log").read_text()


@pytest.mark.slow
def test_rest_trigger_on_real_services(tiny_crawl, airflow_services, tmp_path):
    api, env = airflow_services
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
    while True:
        state = api.call("GET", f"/api/v2/dags/tldr_compress/dagRuns/{run_id}")[1]["state"]
        if state in ("success", "failed"):
            break
        assert time.time() < deadline, "the run did not finish in 25 minutes"
        time.sleep(5)
    assert state == "success"
    status, xcom = api.call("GET", f"/api/v2/dags/tldr_compress/dagRuns/{run_id}/taskInstances/publish/xcomEntries/"
                                   "return_value")
    assert status == 200, xcom
    summary = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    assert summary["out"].endswith(run_id.replace(":", "-").replace("+", "-"))
    assert summary["mlflow_run_id"] and shard_count(summary["shards_url"]) >= 1
    assert mlflow_runs_for(env["MLFLOW_TRACKING_URI"], run_id)
