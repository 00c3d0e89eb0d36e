"""A command stopped with SIGTERM (a deleted pod, a task marked failed in Airflow) unwinds: its MLflow
runs end FAILED instead of staying RUNNING until a later run finds them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow

TLDR_VLP = str(Path(sys.executable).with_name("tldr-vlp"))
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_sigterm_ends_the_stage_and_parent_runs_failed(tiny_crawl, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "TLDR_RUN_KEY"}
    env.update(MLFLOW_TRACKING_URI=store, TLDR_MLFLOW_EXPERIMENT="sigterm", OMP_NUM_THREADS="1")
    # a captioner that trains for minutes: the signal lands inside its training loop
    command = [TLDR_VLP, "compress", "--input", f"{tiny_crawl}/train", "--out", str(tmp_path / "run"),
               "--set", "captioner.epochs=500", "--set", "captioner.image_size=32"]
    log = tmp_path / "compress.log"
    client = mlflow.MlflowClient(tracking_uri=store)
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            # the first fold's captioner (captioner/fold1 with two folds) writes its tokenizer when training starts
            while not any((tmp_path / "run" / "captioner").glob("**/checkpoints/tokenizer.json")):
                assert process.poll() is None, f"compress exited early:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, f"compress never started training:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        finally:
            process.kill()
    experiment = client.get_experiment_by_name("sigterm")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    stage = runs["train-captioner"]
    parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert stage.info.status == "FAILED" and parent.info.status == "FAILED"
    assert not [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"]
