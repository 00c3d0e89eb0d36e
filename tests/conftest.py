"""Shared fixtures and the test session's environment.

`tiny_crawl`: a small synthetic crawl (made once per test session); `mlflow_store`: a fresh local
MLflow store per test; every test gives torch's thread count and OpenMP's variables back as they were.
Airflow reads its home at import, so the session gets its own (never the user's ~/airflow) before any
test module imports Airflow, and the DAG helpers under dags/ are importable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["AIRFLOW_HOME"] = os.environ.get("TLDR_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="airflow-home-")
os.environ["TLDR_TEST_AIRFLOW_HOME"] = os.environ["AIRFLOW_HOME"]
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("TLDR_DATA_ROOT", tempfile.mkdtemp(prefix="tldr-data-"))
# Tests download nothing and report to no one, in this process and the tools it starts (the demo's
# dvc, the MLflow and Airflow servers): no usage analytics, and a Hugging Face hub lookup fails
# instead of fetching. MLflow decides at import, before PYTEST_CURRENT_TEST (its own switch) is set.
os.environ.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dags"))

from tldr_tasks.config import CrawlConfig

TINY_CRAWL = CrawlConfig(samples=200, eval_samples=60, image_size=32, noise=0.3, prototypes=40, zipf=1.1,
                         shard_size=100)


def _fail_a_skip(report):
    """Turn a skipped (or xfailed) report into a failure that says what to do."""
    if report.skipped:
        why = (f"xfail: {report.wasxfail}" if hasattr(report, "wasxfail")
               else report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr))
        report.outcome = "failed"
        report.longrepr = ("tests do not skip (declared dependencies are imported; `make test` installs helm and "
                           f"chromium): install what is missing, or fix the test. {why}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped or xfailed test fails: a test that cannot run must say so, not pass quietly."""
    return _fail_a_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A test module that skips itself (pytest.importorskip, a module-level skip) fails to collect."""
    return _fail_a_skip((yield))


@pytest.fixture(autouse=True)
def _thread_settings_restored():
    """torch's thread count and OMP_NUM_THREADS / OMP_WAIT_POLICY are process-wide, and a trained model's bytes
    depend on the thread count: what one test sets (a stage run in-process) must not reach the next."""
    from tldr_tasks.runner import THREAD_VARS

    environment = {name: os.environ.get(name) for name in THREAD_VARS}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if threads is not None:
        torch.set_num_threads(threads)
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_crawl(tmp_path_factory) -> str:
    """Folder of a synthetic crawl: train/{00000,00001}.tar (200 samples, 30% noisy captions),
    eval/00000.tar (60 clean samples), crawl.json; 32x32 px, seed 0. Read-only: do not write into it."""
    from tldr_tasks.data.synthetic import make_crawl

    out = tmp_path_factory.mktemp("tiny_crawl")
    make_crawl(str(out), TINY_CRAWL, seed=0)
    return str(out)


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """MLflow tracking into a store of this test's own (experiment "tests")."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the process-wide URI too: an earlier test's in-process tracking (tracking._mlflow) may have set it
    mlflow.set_tracking_uri(uri)
    # and forget an earlier test's active experiment (mlflow's process-wide one, and the id its in-process
    # run exported): it names nothing in this new store
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("TLDR_MLFLOW_EXPERIMENT", "tests")
    monkeypatch.delenv("TLDR_RUN_KEY", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def random_captioner(tiny_crawl, tmp_path_factory) -> str:
    """Folder of an untrained (random-weight) captioner for the tiny crawl's 32 px images: its captions
    are gibberish but deterministic. Read-only."""
    import torch

    from tldr_tasks.config import CaptionerConfig
    from tldr_tasks.data.shards import Sample, iter_shard
    from tldr_tasks.models import captioner as cap
    from tldr_tasks.models.tokenizer import train_tokenizer
    from tldr_tasks.storage import expand_shards

    captions = [s.caption for url in expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)
                if isinstance(s, Sample)]
    tokenizer = train_tokenizer(captions, 300)
    torch.manual_seed(0)
    model = cap.build_captioner(CaptionerConfig(image_size=32, codebook_size=32, codebook_init="random"), tokenizer)
    url = str(tmp_path_factory.mktemp("random_captioner"))
    cap.save_captioner(model.eval(), tokenizer, {}, url)
    return url


@pytest.fixture()
def fresh_python():
    """`run(code, hash_seed)`: the stdout of `code` run in a new interpreter with PYTHONHASHSEED=hash_seed. What
    must be the same in every process (a key-hash split) is checked there: Python's own `hash()` of a str
    differs between processes, never inside one."""
    def run(code: str, hash_seed: int) -> str:
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip()

    return run
