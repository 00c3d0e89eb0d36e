"""Where the DAGs read and write by default, and the Kubernetes pod settings.

Every default can be changed without editing code:
- TLDR_DATA_ROOT (env): the local data root; landing folder, DVC data repo, outputs live below it.
- TLDR_RUNNER (env): the runner a run uses when the trigger does not choose ("local" | "kubernetes").
- TLDR_RETRY_DELAY_S (env): seconds before a failed task's first retry (default 30, doubling).
- Kubernetes settings: kubernetes.json beside this file <- the JSON file named by env
  TLDR_KUBERNETES_CONFIG (the Helm chart mounts its ConfigMap there) <- the JSON in env
  AIRFLOW_VAR_TLDR_KUBERNETES, key by key.

Everything here is read when the DAG file is parsed, so it reads files and the environment only:
never an Airflow Variable or Connection from the metadata database (every parse would query it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CONFIG_ENV = "AIRFLOW_VAR_TLDR_KUBERNETES"
RUNNERS = ("local", "kubernetes")
POD_RESULT_PATH = "/airflow/xcom/return.json"  # KubernetesPodOperator's XCom sidecar reads this file


def data_root() -> str:
    return os.environ.get("TLDR_DATA_ROOT") or str(Path.home() / "tldr-vlp-data")


def landing_url() -> str:
    """Where a crawler drops new WebDataset shards (img2dataset output folder)."""
    return os.environ.get("TLDR_LANDING_URL") or os.path.join(data_root(), "landing")


def data_repo() -> str:
    """The DVC-initialised folder that versions the crawl (local to the Airflow worker)."""
    return os.environ.get("TLDR_DATA_REPO") or os.path.join(data_root(), "data-repo")


def crawl_url() -> str:
    """The registered crawl: every landed shard, DVC-tracked; tldr_compress reads it by default."""
    return os.path.join(data_repo(), "crawl")


def dvc_remote() -> str:
    return os.environ.get("TLDR_DVC_REMOTE") or os.path.join(data_root(), "dvc-remote")


def output_root() -> str:
    return os.environ.get("TLDR_OUTPUT_ROOT") or os.path.join(data_root(), "compressed")


def default_runner() -> str:
    runner = os.environ.get("TLDR_RUNNER", "local")
    if runner not in RUNNERS:
        raise ValueError(f"TLDR_RUNNER={runner!r} must be one of {', '.join(RUNNERS)}")
    return runner


def venv_bin(program: str) -> str:
    """`program` from the interpreter's own bin folder: the project's venv, never whatever PATH holds."""
    return str(Path(sys.executable).parent / program)


def tldr_executable() -> str:
    return os.environ.get("TLDR_VLP_BIN") or venv_bin("tldr-vlp")


def retry_delay_s() -> float:
    return float(os.environ.get("TLDR_RETRY_DELAY_S", "30"))


def kubernetes_config() -> dict:
    """The pod settings: defaults <- TLDR_KUBERNETES_CONFIG file <- AIRFLOW_VAR_TLDR_KUBERNETES, by key.

    The environment variable is the env form of the Airflow Variable `tldr_kubernetes`, read
    directly: the pod settings shape the DAG, so they are read at parse time, where a metadata
    database lookup must not happen.
    """
    config = json.loads((Path(__file__).parent / "kubernetes.json").read_text())
    path = os.environ.get("TLDR_KUBERNETES_CONFIG")
    if path:
        if not Path(path).exists():
            raise FileNotFoundError(f"TLDR_KUBERNETES_CONFIG={path} does not exist: mount the chart's "
                                    "ConfigMap there or unset the variable")
        config.update(json.loads(Path(path).read_text()))
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if raw:
        override = json.loads(raw)
        if not isinstance(override, dict):
            raise ValueError(f"{CONFIG_ENV} must be a JSON object, got {override!r}")
        config.update(override)
    return config
