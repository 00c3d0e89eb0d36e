"""How long a newcomer's first `make demo` takes after the install, stage by stage.

    .venv/bin/python benchmarks/demo_time.py        # a quiet machine; writes results/demo_time.json

Clones the repository's committed HEAD into a temporary folder (a fresh checkout: no run folder, no
caches), runs `tldr-vlp demo` there with this virtual environment (what `make demo` runs once the
install is done), and records the wall time, the seconds of every stage from the demo's report, the
headline numbers it printed (test mean R@1 per arm, the misaligned share of the input and of what ships), and
the machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PYTHONPATH": str(clone)}
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("tldr-vlp")), "demo", "--out", "runs/demo"], cwd=clone,
                       env=env, check=True)
        seconds = time.perf_counter() - start
        report = json.loads((clone / "runs" / "demo" / "report.json").read_text())
    result = {
        "what": "wall time of `tldr-vlp demo` in a fresh clone after the install (`make demo` minus pip)",
        "seconds": round(seconds, 1),
        "stages": report["seconds"],
        "mean_r1_test": {arm: round(r["test"]["mean_r1"], 2) for arm, r in report["arms"].items()},
        "input_samples": report["input_samples"], "output_samples": report["output_samples"],
        "noise_rate": {"input": report.get("noise_rate_input"), "shipped": report.get("noise_rate_output")},
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
    }
    (ROOT / "benchmarks" / "results" / "demo_time.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
