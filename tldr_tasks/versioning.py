"""DVC, which versions the demo's crawl and output (tldr_tasks.demo) and the crawl registry behind
tldr_ingest (dags/tldr_dagkit/crawl_registry.py). Light imports: the DAGs import it at parse time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def dvc(repo: str | Path, *args: str) -> str:
    """Run the venv's dvc (beside this interpreter, never whatever PATH holds) in `repo`; returns its
    output, and a failure raises with dvc's own message."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=repo, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo} (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-2000:]}")
    return proc.stdout


def tracked_md5(repo: str | Path, path: str) -> str:
    """The md5 DVC recorded for `path` (relative to `repo`) in `<path>.dvc`: a folder's ends in `.dir`."""
    return yaml.safe_load((Path(repo) / f"{path}.dvc").read_text())["outs"][0]["md5"]
