"""`tldr-vlp compare`: the key parameters and metrics of several runs side by side.

    tldr-vlp compare runs/r1 runs/r2                       run folders (config, manifest, evaluation)
    tldr-vlp compare 3f2a...c1 9b07...e4                   MLflow parent runs (tracking_stores: $MLFLOW_TRACKING_URI,
                                                           else ./mlflow.db and Airflow's $AIRFLOW_HOME/mlflow.db)
    tldr-vlp compare runs/r1 runs/r2 --html compare.html   the same table as a page

Rows: the key parameters and metrics (`--all`: every one); a row whose values differ between the
runs is marked `*` (bold in a terminal; highlighted in the page).
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from fnmatch import fnmatch

from tldr_tasks import storage
from tldr_tasks.runs import PARAMS, load_run, summary_metrics

# The rows shown without --all (the trust summary first: input vs kept vs a random subset of the same
# size, and the strict judge's noise on a crawl with ground truth); a pattern matches a run folder's metric
# ("kept") and the stage-prefixed name an MLflow parent run carries ("materialize.kept") alike.
KEY_METRICS = ("trust.*", "*shipped_noise", "*original_noise", "*input_samples", "*kept", "*dropped", "*carved",
               "*rejected", "ratio", "*.ratio", "curve.chosen_ratio", "clusters", "*cluster_size_*",
               "alignment_input_mean", "alignment_kept_mean", "alignment_*_misaligned_share",
               "*confidence_mean", "captions_*", "caption_collapsed", "*shards_embedded", "*shards_reused",
               "*shards_replaced", "*test.*.mean_r1", "*noise_rate_*", "*time_to_accuracy.*", "seconds.*",
               "samples_per_second.*")


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"sample.ratio": "0.25"}: the names and string values MLflow records as params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def load(ref: str) -> dict:
    """{"name", "params": {dotted: value}, "metrics": {name: float}} of a run folder or an MLflow run id."""
    if storage.exists(storage.join(ref, "shards", "manifest.json")) or storage.exists(storage.join(ref, "config.json")):
        run = load_run(ref)
        return {"name": ref, "params": _flatten(run["config"]), "metrics": summary_metrics(run)}
    import mlflow

    stores = tracking_stores()
    for uri in stores:
        if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
            continue  # opening it would create an empty store
        try:
            found = mlflow.MlflowClient(uri).get_run(ref)
        except mlflow.exceptions.MlflowException:
            continue
        return {"name": found.info.run_name or ref, "params": dict(found.data.params),
                "metrics": dict(found.data.metrics)}
    raise ValueError(f"{ref} is neither a run folder (no shards/manifest.json or config.json) nor an MLflow run in "
                     f"{' or '.join(stores)}; point MLFLOW_TRACKING_URI at the store the run logged to (Airflow "
                     "started by scripts/airflow-local.sh: sqlite:///<AIRFLOW_HOME>/mlflow.db)")


def tracking_stores() -> list[str]:
    """Where MLflow run ids are looked up: $MLFLOW_TRACKING_URI alone when set; else the local default
    (./mlflow.db) and the store of Airflow's local services ($AIRFLOW_HOME, default ./airflow_home)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return [os.environ["MLFLOW_TRACKING_URI"]]
    airflow_home = os.environ.get("AIRFLOW_HOME") or "airflow_home"
    return [f"sqlite:///{os.path.abspath(path)}" for path in ("mlflow.db", os.path.join(airflow_home, "mlflow.db"))]


def _same(values: list) -> bool:
    return all(str(v) == str(values[0]) for v in values)


def table(runs: list[dict], show_all: bool = False) -> list[tuple[str, list, bool]]:
    """Rows (name, one value per run, differs): parameters first, then metrics; only the key ones
    (PARAMS, KEY_METRICS) unless `show_all`."""
    rows = []
    for kind in ("params", "metrics"):
        # the trust summary's rows first (trust.input.*, trust.kept.*, trust.random.*, then the verdict)
        for name in sorted({name for run in runs for name in run[kind]}, key=lambda n: (not n.startswith("trust."), n)):
            key = name in PARAMS if kind == "params" else any(fnmatch(name, p) for p in KEY_METRICS)
            if key or show_all:
                values = [run[kind].get(name) for run in runs]
                rows.append((name, values, not _same(values)))
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_text(runs: list[dict], rows: list[tuple[str, list, bool]], color: bool = False) -> str:
    header = ["", *(run["name"] for run in runs)]
    lines = [header] + [[("* " if differs else "  ") + name, *(_cell(v) for v in values)]
                        for name, values, differs in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line, row in zip(lines, [None, *rows]):
        text = "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
        out.append(f"\033[1m{text}\033[0m" if color and row is not None and row[2] else text)
    return "\n".join(out)


def format_html(runs: list[dict], rows: list[tuple[str, list, bool]]) -> str:
    head = "".join(f"<th>{html.escape(run['name'])}</th>" for run in runs)
    body = "\n".join(f"<tr class='{'diff' if differs else 'same'}'><th>{html.escape(name)}</th>"
                     + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in values) + "</tr>"
                     for name, values, differs in rows)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>tldr-vlp compare</title><style>"
            "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}tr.diff{background:#fff3c4;font-weight:bold}"
            f"</style></head><body><h1>tldr-vlp compare</h1><p>highlighted: differs between the runs</p>"
            f"<table><tr><th></th>{head}</tr>\n{body}</table></body></html>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tldr-vlp compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_ID_OR_FOLDER")
    parser.add_argument("--html", metavar="FILE", help="also write the table as an HTML page")
    parser.add_argument("--all", action="store_true", help="every parameter and metric, not only the key ones")
    args = parser.parse_args(argv)
    try:
        runs = [load(ref) for ref in args.runs]
    except ValueError as err:
        parser.error(str(err))
    rows = table(runs, show_all=args.all)
    print(format_text(runs, rows, color=sys.stdout.isatty()))
    if args.html:
        storage.write_text_atomic(args.html, format_html(runs, rows))
        print(f"written: {args.html}")
    return 0
