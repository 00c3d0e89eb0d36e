"""`tldr-vlp demo`: the embedded default, end to end, with no cluster, GPU or network.

Makes a synthetic web crawl with ground truth, versions it with DVC (local remote), compresses it
with every stage, evaluates full vs TL;DR vs random subsets, tracks everything in a local MLflow
store, versions the compressed set, prints a results table and writes `DIR/report.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tldr_tasks import storage, tracking
from tldr_tasks.benchmark import PROFILE as BENCHMARK_PROFILE
from tldr_tasks.config import Config, _merge, from_dict, load_config, parse_overrides
from tldr_tasks.contract import StageIO
from tldr_tasks.protocol import PROFILE as PROTOCOL_PROFILE
from tldr_tasks.runner import compress
from tldr_tasks.versioning import dvc, tracked_md5

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
# A first run's size: the benchmark's (6,000 pairs, one 4-epoch captioner, the `towers-locked` evaluation) under
# the compute-matched budget only, clustering on the feature the protocol evaluated (tldr_tasks.protocol.PROFILE);
# its time is benchmarks/results/demo_time.json. A params file replaces it (`--params params.yaml`: the
# full-size defaults).
PROFILE = _merge(BENCHMARK_PROFILE, {"embed": PROTOCOL_PROFILE["embed"], "evaluate": {"budgets": ["compute"]}})


def demo_config(params_path: str | None, overrides: list[str]) -> Config:
    """The demo's config: a params file if given, else PROFILE over the defaults; overrides last."""
    base = load_config(params_path).to_dict() if params_path else from_dict(PROFILE).to_dict()
    return from_dict(_merge(base, parse_overrides(overrides))).validate()


def version_with_dvc(root: Path, folders: list[str]) -> dict[str, str]:
    """Track `folders` (relative to root) in a DVC repo at root with a local remote and push them.
    Returns {folder: md5 of its DVC-tracked version}."""
    if not (root / ".dvc").exists():
        dvc(root, "init", "--no-scm", "-q")
        dvc(root, "remote", "add", "-d", "-f", "local", str((root / "dvc-remote").resolve()))
        dvc(root, "config", "core.autostage", "false")
    dvc(root, "add", "-q", *folders)
    dvc(root, "push", "-q")
    return {folder: tracked_md5(root, folder) for folder in folders}


def demo(out_dir: str, cfg: Config) -> dict:
    """Run the whole demo in `out_dir` and return the report (also written to out_dir/report.json)."""
    from tldr_tasks.data.synthetic import make_crawl

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    crawl = root / "crawl"
    crawl_marker = crawl / "crawl.json"
    if not crawl_marker.exists():
        print(f"making a synthetic crawl of {cfg.crawl.samples} samples in {crawl} ...", file=sys.stderr)
        make_crawl(str(crawl), cfg.crawl, cfg.seed)
    io = StageIO(input=str(crawl / "train"), out=str(root / "run"), eval_input=str(crawl / "eval"))
    summary = compress(cfg, io, with_eval=True, label=f"demo noise={cfg.crawl.noise} seed={cfg.seed}")
    versions = version_with_dvc(root, ["crawl", "run/shards"])
    evaluation = json.loads(storage.read_text(storage.join(io.evaluate_dir, "report.json")))
    manifest = summary["manifest"]
    report = {
        "input_samples": manifest["input_samples"],
        "output_samples": manifest["kept"],
        "rejected_samples": manifest["rejected"],
        "ratio": manifest["ratio"],
        "captions": manifest["captions"],
        "collapse_check": manifest["collapse_check"],
        **{k: evaluation[k] for k in evaluation if k not in ("input_samples", "output_samples")},
        "seconds": summary["seconds"],
        "mlflow_run_id": summary["mlflow_run_id"],
        "dvc_versions": {"crawl": versions["crawl"], "compressed": versions["run/shards"]},
        "config_hash": cfg.hash(),
    }
    (root / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    # The parameters that made this crawl (it may predate this run's config): the one run that knows them.
    tracking.log_params(summary["mlflow_run_id"], {"crawl": json.loads(crawl_marker.read_text())["params"]})
    tracking.log_to_parent(summary["mlflow_run_id"], {}, artifacts=[str(root / "report.json"),
                           str(Path(io.evaluate_dir) / "retrieval.png")],
                           tags={"tldr.dvc.crawl": versions["crawl"],
                                 "tldr.dvc.compressed": versions["run/shards"]})
    return report


def results_table(report: dict) -> str:
    """The headline numbers as a plain-text table (test split; the validation split chose the defaults)."""
    captions = report.get("captions", {})
    lines = [f"input {report['input_samples']} samples -> output {report['output_samples']} "
             f"(ratio {report['ratio']:.3f}), rejected {report.get('rejected_samples', 0)}"]
    if report.get("noise_rate_input") is not None:
        lines.append(f"noisy captions: input {100 * report['noise_rate_input']:.1f}% -> shipped "
                     f"{100 * report['noise_rate_output']:.1f}%; generated captions exactly right on held-out "
                     f"images {100 * report['caption_accuracy']:.1f}% "
                     f"(head {100 * report['caption_accuracy_head']:.1f}%, "
                     f"tail {100 * report['caption_accuracy_tail']:.1f}%)")
    lines.append("captions shipped: " + ", ".join(f"{k} {v}" for k, v in captions.items() if v)
                 + (" (COLLAPSED: originals shipped)" if report.get("collapse_check", {}).get("collapsed") else ""))
    lines += ["", f"test split, {report['steps']} steps per arm".ljust(34)
              + "".join(f"{k:>9}" for k in (*RETRIEVAL_KEYS, "mean_r1")) + "   time-to-acc"]
    for arm, result in report["arms"].items():
        metrics = result["test"]
        tta = report.get("time_to_accuracy", {}).get(arm)
        lines.append(f"  {arm:<32}" + "".join(f"{metrics[k]:>9.1f}" for k in (*RETRIEVAL_KEYS, "mean_r1"))
                     + (f"{tta:>14.2f}" if tta is not None else f"{'never':>14}"))
    lines.append("")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    lines.append(f"MLflow run: {report['mlflow_run_id']}")
    return "\n".join(lines)
