"""Loopback only (issue 26): while train-captioner runs on one machine (as `compress`, `tldr-vlp run` and
Airflow's local tasks run it), the process and its children listen on 127.0.0.1 and nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TLDR_VLP = str(Path(sys.executable).with_name("tldr-vlp"))


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process `pid` or a descendant listens on; empty once it ended."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_train_captioner_listens_on_loopback_only(tiny_crawl, tmp_path, mlflow_store):
    out = tmp_path / "run"
    command = [TLDR_VLP, "run", "train-captioner", "--input", f"{tiny_crawl}/train", "--out", str(out),
               "--set", "captioner.epochs=2", "--set", "captioner.image_size=32", "--set", "captioner.batch_size=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int]] = set()
    try:
        while proc.poll() is None:  # sampled for as long as the stage runs
            seen |= listening(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert seen, "no listening socket was ever seen: the distributed backend's was expected (sampling missed it)"
    assert {address for address, _ in seen} == {"127.0.0.1"}, seen
