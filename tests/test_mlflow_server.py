"""The MLflow server as users and the chart run it, on 127.0.0.1: the UI opens an experiment on its
runs table (headless Chromium), and the chart's basic-auth server refuses anonymous requests while
the pipeline's client, given the Secret's credentials, tracks through it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest
from test_helm import by_kind, helm, template  # noqa: F401  (helm: fixture)
from test_report import chromium

from tldr_tasks import tracking
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO

BIN = Path(sys.executable).parent
# The values of the chart's Secrets, by key.
SECRET = {"MLFLOW_TRACKING_USERNAME": "tldr", "MLFLOW_TRACKING_PASSWORD": "s3cret-for-tests",
          "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key-for-tests"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, host: str | None = None, user: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET."""
    request = urllib.request.Request(url)
    if host:
        request.add_header("Host", host)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # a busy 2-core machine is slow
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@contextlib.contextmanager
def serving(command: list[str], env: dict, port: int, log: Path):
    """Run a server in its own process group until /health answers; stop the group afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                if get(f"http://127.0.0.1:{port}/health") == 200:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"MLflow did not answer on port {port}: {log.read_text()[-3000:]}")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited by itself
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.grids = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.grids += attrs.get("role") == "grid"
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


@pytest.mark.slow
def test_the_ui_opens_the_experiment_on_the_parent_runs_table(mlflow_store, tmp_path):
    parents = {}
    for out in ("runs/scheduled", "runs/ratio-0.5"):
        io = StageIO(input="crawl", out=out)
        parents[out] = tracking.parent_run_id(Config(), io)
        with tracking.stage_run(Config(), io, "embed", {}):
            pass
        tracking.finish_parent(parents[out])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tests").experiment_id
    nested = {r.info.run_id for r in client.search_runs([experiment], "tags.`tldr.stage` = 'embed'")}
    assert len(nested) == 2

    port = free_port()
    command = [str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"]]
    with serving(command, {**os.environ}, port, tmp_path / "mlflow.log"):
        dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
                       tracking.ui_url(f"http://127.0.0.1:{port}", experiment)).stdout
    page = _Links()
    page.feed(dom)
    assert page.grids == 1  # the runs table
    shown = {m.group(1) for link in page.links if (m := re.fullmatch(rf"#/experiments/{experiment}/runs/(\w+)", link))}
    assert shown == set(parents.values())  # both parent runs; their stage runs collapsed beneath them


@pytest.fixture()
def chart_mlflow(helm, tmp_path):  # noqa: F811
    """(command, env, port, host) of the chart's MLflow container, run here: its mounts become folders
    under tmp_path (the auth ConfigMap's files written into its own), its Secret references take
    SECRET's values, and it listens on 127.0.0.1 on a free port instead of 0.0.0.0:5000. `host`: the
    Host header stage pods send (their MLFLOW_TRACKING_URI, from the chart's pod config)."""
    kinds = by_kind(template(helm))
    spec = kinds["Deployment"][0]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmaps = {c["metadata"]["name"]: c["data"] for c in kinds["ConfigMap"]}
    local = {}
    for mount in container["volumeMounts"]:
        folder = tmp_path / mount["name"]
        folder.mkdir()
        local[mount["mountPath"]] = str(folder)
    paths = re.compile("|".join(re.escape(p) for p in sorted(local, key=len, reverse=True)) + r"(?![\w-])")

    def here(text: str) -> str:
        return paths.sub(lambda m: local[m.group(0)], text)

    for mount in container["volumeMounts"]:
        if "configMap" in volumes[mount["name"]]:
            for name, text in configmaps[volumes[mount["name"]]["configMap"]["name"]].items():
                Path(local[mount["mountPath"]], name).write_text(here(text))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    for item in container["env"]:
        env[item["name"]] = here(item["value"]) if "value" in item else SECRET[item["valueFrom"]["secretKeyRef"]["key"]]
    args = here(container["args"][0]).replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    assert f"--port {port}" in args
    pod_config = json.loads(next(c for c in configmaps.values() if "kubernetes.json" in c)["kubernetes.json"])
    return [*container["command"], args], env, port, urlsplit(pod_config["env"]["MLFLOW_TRACKING_URI"]).netloc


@pytest.mark.slow
def test_the_charts_mlflow_refuses_anonymous_requests(chart_mlflow, tmp_path, monkeypatch):
    command, env, port, stage_host = chart_mlflow
    base = f"http://127.0.0.1:{port}"
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=5"
    user = (SECRET["MLFLOW_TRACKING_USERNAME"], SECRET["MLFLOW_TRACKING_PASSWORD"])
    with serving(command, env, port, tmp_path / "mlflow.log"):
        assert get(search) == 401
        assert get(search, user=(user[0], "wrong")) == 401
        assert get(search, user=user) == 200
        # what a stage pod sends (the Service's name as Host) is answered; a stranger's name is not
        assert get(search, host=stage_host, user=user) == 200
        assert get(search, host="attacker.example:5000", user=user) == 403
        # the pipeline's client with the Secret's keys as env (stage pods: envFrom) tracks through it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        monkeypatch.setenv("TLDR_MLFLOW_EXPERIMENT", "tests")
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, SECRET[key])
        parent = tracking.parent_run_id(Config(), StageIO(input="crawl", out="runs/a"))
        assert mlflow.MlflowClient().get_run(parent).data.tags["tldr.run_key"] == "runs/a"
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(mlflow.exceptions.MlflowException):
            mlflow.MlflowClient().get_run(parent)
