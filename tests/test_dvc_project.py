"""The repository is a DVC project as its users use it: in a fresh clone, `dvc repro`, `dvc push` to the
default remote, `dvc metrics show`, `dvc plots show`, `dvc exp run -S ...` and `dvc exp show` on a tiny crawl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's dvc and tldr-vlp
# A crawl and models small enough for a test; the same keys a user sets with `dvc exp run -S`.
TINY = {"crawl": {"samples": 200, "eval_samples": 60, "image_size": 32, "prototypes": 40, "shard_size": 100},
        "captioner": {"image_size": 32, "epochs": 1}, "caption": {"num_beams": 1, "max_new_tokens": 12},
        "cluster": {"clusters": 4}, "materialize": {"shard_size": 20}, "evaluate": {"epochs": 1}}


def test_dvc_config_is_committed_with_a_local_default_remote():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = storage" in config and "url = ../dvc-storage" in config
    ignored = subprocess.run(["git", "check-ignore", "dvc-storage/x", "data/x"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == ["dvc-storage/x", "data/x"]  # the remote and the data stay out of git
    for name in (".dvc/config", ".dvc/.gitignore", ".dvcignore"):  # in git (committed, or staged for it)
        listed = subprocess.run(["git", "ls-files", "--error-unmatch", name], cwd=ROOT, capture_output=True)
        assert listed.returncode == 0, name


def fresh_clone(target: Path) -> Path:
    """What a clone of the current tree holds: every file git would commit (tracked, or new and not
    ignored), in a new git repo with one commit."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, names):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    git(target, "init", "-q")
    git(target, "add", "-A")
    git(target, "commit", "-q", "-m", "clone")
    return target


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent}/mlflow.db"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_repro_metrics_plots_and_experiments_in_a_fresh_clone(tmp_path):
    repo = fresh_clone(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    dvc(repo, "repro")
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    report = metrics[""]["data"]["report/metrics.json"]["data"]
    assert report["input_samples"] == 200 and report["kept"] == round(0.25 * (200 - report["rejected"]))
    assert report["clusters"] == 4 and "eval.test.tldr.mean_r1" in report

    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in ("cluster sizes", "alignment, input vs kept", "learning curves (mean R@1, test split)"):
        assert title in page, title
    plots = json.loads(dvc(repo, "plots", "show", "--json", "--split"))["data"]
    points = plots["learning curves (mean R@1, test split)"][0]["anchor_definitions"]["<DVC_METRIC_DATA>"]
    arms = {row["field"] for row in points}
    assert arms == {"full", "tldr", "random"} and len(points) >= 2 * len(arms)  # a curve per arm, 2+ points each
    sizes = plots["cluster sizes"][0]["anchor_definitions"]["<DVC_METRIC_DATA>"]
    assert sum(int(row["size"]) for row in sizes) == report["input_samples"] - report["rejected"]

    dvc(repo, "push")  # the default remote works with no setup
    assert any(p.is_file() for p in (repo / "dvc-storage").rglob("*"))

    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny crawl")
    dvc(repo, "exp", "run", "-S", "sample.ratio=0.1")
    experiments = json.loads(dvc(repo, "exp", "show", "--json"))
    ratios = {}
    for commit in experiments:
        for exp in [commit, *[e for run in commit.get("experiments") or [] for e in run["revs"]]]:
            data = exp.get("data") or {}
            ratio = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("sample", {}).get("ratio")
            kept = data.get("metrics", {}).get("report/metrics.json", {}).get("data", {}).get("kept")
            if ratio is not None and kept is not None:
                ratios[ratio] = kept
    assert ratios[0.25] == report["kept"] and ratios[0.1] == round(0.1 * (200 - report["rejected"]))
