"""`report.html`: one self-contained page per run to look at what was kept and why.

    tldr-vlp report runs/r1                      -> runs/r1/report/{report.html,metrics.json,*.csv}
    tldr-vlp report data/run --out data/report   (the dvc.yaml `report` stage)

The page (every image inlined as a data URI, so it opens anywhere and can be an MLflow artifact):
the run's parameters and summary metrics; each shard's embed outcome (embedded, reused, replaced);
the cluster-size histogram; the alignment distribution of the input and of the kept set; retrieval
bars and learning curves when the run was evaluated; and a grid of sample images for a spread of
clusters, kept and dropped marked, with original and generated captions, caption confidence,
alignment score and why the shipped caption was chosen.

It reads only what a run folder holds (shards/manifest.json, cluster/assignments.parquet,
sample/selected.parquet, sample/alignment.parquet, embed/status/, evaluate/report.json, the output
shards and, for dropped samples, the input shards the manifest names) and tolerates missing parts:
a run that was not evaluated has no retrieval section.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io as _io
import json
from collections import Counter

import numpy as np

from tldr_tasks import storage

CLUSTERS_SHOWN = 8
PER_CLUSTER = 3  # kept and dropped samples shown per cluster, each
THUMB_PX = 112
# The key parameters: the report's headline and `compare`'s rows.
PARAMS = ("seed", "embed.feature", "cluster.clusters", "sample.ratio", "sample.strategy", "sample.alignment",
          "caption.fusion", "captioner.preset", "captioner.epochs", "evaluate.epochs")


def _read_json(url: str) -> dict | None:
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def _read_parquet(url: str) -> list[dict]:
    import pyarrow.parquet as pq

    if not storage.exists(url):
        return []
    return pq.read_table(_io.BytesIO(storage.read_bytes(url))).to_pylist()


def _get(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def load_run(run_dir: str) -> dict:
    """Everything the report and `compare` read from a run folder; absent parts are empty."""
    from tldr_tasks.contract import StageIO
    from tldr_tasks.stages import embed

    manifest = _read_json(storage.join(run_dir, "shards", "manifest.json")) or {}
    recorded = _read_json(storage.join(run_dir, "config.json")) or {}
    config = recorded.get("config") or manifest.get("config") or {}
    return {"run_dir": run_dir, "manifest": manifest, "config": config,
            "assignments": _read_parquet(storage.join(run_dir, "cluster", "assignments.parquet")),
            "selected": {r["key"] for r in _read_parquet(storage.join(run_dir, "sample", "selected.parquet"))},
            "alignment": {r["key"]: r.get("alignment")
                          for r in _read_parquet(storage.join(run_dir, "sample", "alignment.parquet"))},
            "embed_status": embed.shard_status(StageIO(input="", out=run_dir)),
            "evaluation": _read_json(storage.join(run_dir, "evaluate", "report.json")),
            "timings": _timings(run_dir)}


def _timings(run_dir: str) -> dict[str, float]:
    """{stage: seconds} from the runner's `timings/` records, summed over a stage's parallel parts
    (the work it took, not the wall time)."""
    from tldr_tasks.contract import TIMINGS_DIR

    seconds: dict[str, float] = {}
    for url in storage.listdir(storage.join(run_dir, TIMINGS_DIR), ".json"):
        record = json.loads(storage.read_text(url))
        seconds[record["stage"]] = seconds.get(record["stage"], 0.0) + float(record["seconds"])
    return seconds


def params_of(run: dict) -> dict:
    return {name: _get(run["config"], name) for name in PARAMS if _get(run["config"], name) is not None}


def _finite(values) -> np.ndarray:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return array[np.isfinite(array)]


def summary_metrics(run: dict) -> dict[str, float]:
    """Flat numeric metrics of a run: counts, cluster spread, alignment before/after, caption counts per
    reason, collapse flag and confidence, embed outcomes, per-stage seconds and samples/s and, when
    evaluated, the evaluation's own metrics (prefixed `eval.`). The parent MLflow run of every path
    carries exactly these names (runner.record_run), so `compare` lines up folders and run ids."""
    manifest = run["manifest"]
    metrics: dict[str, float] = {}
    for name in ("input_samples", "kept", "dropped", "rejected", "ratio"):
        if isinstance(manifest.get(name), (int, float)):
            metrics[name] = float(manifest[name])
    for name, value in (manifest.get("metrics") or {}).items():
        if name.startswith("caption") and isinstance(value, (int, float)):
            metrics[name] = float(value)
    # The same caption counts from the manifest's own sections (they are what a reader of the manifest sees).
    for reason, count in (manifest.get("captions") or {}).items():
        metrics[f"captions_{reason.replace(':', '_')}"] = float(count)
    if "collapsed" in (manifest.get("collapse_check") or {}):
        metrics["caption_collapsed"] = float(manifest["collapse_check"]["collapsed"])
    # The sample stage's alignment distribution before (input) and after (kept) selection.
    for name, value in (manifest.get("alignment") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    sizes = np.array(sorted(Counter(r["cluster"] for r in run["assignments"]).values()), dtype=np.float64)
    if len(sizes):
        metrics.update({"clusters": float(len(sizes)), "cluster_size_min": float(sizes.min()),
                        "cluster_size_median": float(np.median(sizes)), "cluster_size_max": float(sizes.max())})
    # A folder without the manifest's alignment section: the same means from the sample stage's scores.
    before = _finite(run["alignment"].values())
    after = _finite(v for k, v in run["alignment"].items() if k in run["selected"])
    if len(before) and len(after):
        metrics.setdefault("alignment_input_mean", float(before.mean()))
        metrics.setdefault("alignment_kept_mean", float(after.mean()))
    for status in ("embedded", "reused", "replaced"):
        counted = [s for s in run["embed_status"].values() if s["status"] == status]
        if run["embed_status"]:
            metrics[f"shards_{status}"] = float(len(counted))
    # Per-stage seconds and throughput: the caption and materialize stages handle the kept samples,
    # the others the whole input.
    for stage, seconds in run.get("timings", {}).items():
        metrics[f"seconds.{stage}"] = seconds
        samples = manifest.get("kept" if stage in ("caption", "materialize") else "input_samples")
        if isinstance(samples, (int, float)) and seconds > 0 and stage != "evaluate":
            metrics[f"samples_per_second.{stage}"] = samples / seconds
    if run["evaluation"]:
        from tldr_tasks.stages.evaluate import flatten

        metrics.update({f"eval.{k}": v for k, v in flatten(run["evaluation"]).items()})
    # NaN (no confidence when no caption was scored) is left out: MLflow's parent run drops it, and
    # metrics.json must stay strict JSON for `dvc metrics show`.
    return {k: round(v, 4) for k, v in sorted(metrics.items()) if np.isfinite(v)}


# ---- charts (matplotlib -> PNG data URIs) ----

def _figure(width: float = 5.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cluster_sizes_chart(run: dict) -> str | None:
    sizes = Counter(r["cluster"] for r in run["assignments"])
    if not sizes:
        return None
    kept = Counter(r["cluster"] for r in run["assignments"] if r["key"] in run["selected"])
    fig, ax = _figure()
    bins = np.histogram_bin_edges(list(sizes.values()), bins=min(30, len(sizes)))
    ax.hist(list(sizes.values()), bins=bins, label="input", color="C0", alpha=0.7)
    ax.hist([kept.get(c, 0) for c in sizes], bins=bins, label="kept", color="C2", alpha=0.7)
    ax.set_xlabel("samples per cluster")
    ax.set_ylabel("clusters")
    ax.set_title(f"{len(sizes)} clusters")
    ax.legend()
    return _data_uri(fig)


def alignment_chart(run: dict) -> str | None:
    before = _finite(run["alignment"].values())
    after = _finite(v for k, v in run["alignment"].items() if k in run["selected"])
    if not len(before):
        return None
    fig, ax = _figure()
    bins = np.histogram_bin_edges(before, bins=30)
    ax.hist(before, bins=bins, density=True, alpha=0.6, label=f"input ({len(before)})")
    ax.hist(after, bins=bins, density=True, alpha=0.6, label=f"kept ({len(after)})")
    ax.set_xlabel("alignment score (higher: caption fits the image better)")
    ax.set_ylabel("density")
    ax.legend()
    return _data_uri(fig)


def _arms(run: dict) -> dict:
    return (run["evaluation"] or {}).get("arms") or {}


def retrieval_chart(run: dict) -> str | None:
    arms = {name: arm.get("test") or {} for name, arm in _arms(run).items()}
    names = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    if not arms:
        return None
    fig, ax = _figure(6.5, 3.2)
    width = 0.8 / len(arms)
    for i, (arm, values) in enumerate(arms.items()):
        xs = np.arange(len(names)) + (i - (len(arms) - 1) / 2) * width
        ax.bar(xs, [values.get(n) or 0.0 for n in names], width, label=arm)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("recall (%), test split")
    ax.legend(fontsize=8)
    return _data_uri(fig)


def learning_curves(run: dict) -> dict[str, list[list[float]]]:
    return {name: arm["curve"]["test"] for name, arm in _arms(run).items() if (arm.get("curve") or {}).get("test")}


def learning_chart(run: dict) -> str | None:
    curves = learning_curves(run)
    if not curves:
        return None
    fig, ax = _figure()
    for name, points in curves.items():
        steps, r1 = zip(*points)
        ax.plot(steps, r1, marker="o", label=name)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("mean R@1 (%), test split")
    ax.legend(fontsize=8)
    return _data_uri(fig)


# ---- the sample grid ----

def _thumbnail(image) -> str:
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    if max(thumb.size) < THUMB_PX:  # tiny crawl images: scale up so they can be seen
        scale = THUMB_PX / max(thumb.size)
        thumb = thumb.resize((round(thumb.width * scale), round(thumb.height * scale)), resample=0)
    buffer = _io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chosen_samples(run: dict) -> dict[int, list[dict]]:
    """A spread of clusters (largest to smallest, evenly spaced) and, in each, the first PER_CLUSTER kept and
    PER_CLUSTER dropped samples by key: {cluster: [assignment rows]}."""
    by_cluster: dict[int, list[dict]] = {}
    for row in sorted(run["assignments"], key=lambda r: r["key"]):
        by_cluster.setdefault(int(row["cluster"]), []).append(row)
    order = sorted(by_cluster, key=lambda c: (-len(by_cluster[c]), c))
    picks = sorted({order[round(i)] for i in np.linspace(0, len(order) - 1, min(CLUSTERS_SHOWN, len(order)))},
                   key=order.index) if order else []
    chosen = {}
    for c in picks:
        rows = by_cluster[c]
        chosen[c] = ([r for r in rows if r["key"] in run["selected"]][:PER_CLUSTER]
                     + [r for r in rows if r["key"] not in run["selected"]][:PER_CLUSTER])
    return chosen


def _load_samples(urls: list[str], wanted: set[str]) -> dict:
    """{key: Sample} of the wanted keys of these shards, decoding nothing else."""
    from tldr_tasks.data.shards import RawSample, Sample, iter_raw_shard

    found: dict = {}
    for url in urls:
        if len(found) == len(wanted):
            break
        for item in iter_raw_shard(url):
            if isinstance(item, RawSample) and item.key in wanted and item.key not in found:
                sample = item.decode()
                if isinstance(sample, Sample):
                    found[item.key] = sample
    return found


def _input_shards(run: dict) -> list[str]:
    from tldr_tasks.config import ConfigError

    try:
        return storage.expand_shards(run["manifest"].get("input", ""))
    except (ConfigError, OSError):  # moved, redacted (s3://***@...) or gone: only kept samples get images
        return []


def sample_cards(run: dict) -> list[tuple[int, int, int, list[dict]]]:
    """[(cluster, size, kept, [card])]: card = image, kept, captions, confidence, alignment, reason."""
    chosen = chosen_samples(run)
    wanted = {r["key"] for rows in chosen.values() for r in rows}
    kept_wanted = wanted & run["selected"]
    samples = _load_samples(storage.listdir(storage.join(run["run_dir"], "shards"), ".tar"), kept_wanted)
    samples.update(_load_samples(_input_shards(run), wanted - set(samples)))
    sizes = Counter(r["cluster"] for r in run["assignments"])
    kept = Counter(r["cluster"] for r in run["assignments"] if r["key"] in run["selected"])
    grid = []
    for cluster, rows in chosen.items():
        cards = []
        for row in rows:
            sample = samples.get(row["key"])
            meta = getattr(sample, "meta", {}) if row["key"] in run["selected"] else {}
            original = meta.get("original_caption", getattr(sample, "caption", None))
            cards.append({"key": row["key"], "kept": row["key"] in run["selected"],
                          "image": _thumbnail(sample.image) if sample is not None else None,
                          "original": original, "generated": meta.get("generated_caption"),
                          "confidence": meta.get("confidence"), "reason": meta.get("caption_reason"),
                          "alignment": run["alignment"].get(row["key"])})
        grid.append((cluster, sizes[cluster], kept[cluster], cards))
    return grid


# ---- the page ----

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.charts img{margin:4px;border:1px solid #eee;width:420px}.grid{display:flex;flex-wrap:wrap;gap:8px}
.card{width:190px;border:3px solid #ccc;border-radius:6px;padding:6px;font-size:12px}
.card.kept{border-color:#2a9d4b}.card.dropped{border-color:#bbb;opacity:.75}
.badge{font-weight:bold}.kept .badge{color:#2a9d4b}.dropped .badge{color:#777}
.card img{display:block;width:112px;height:112px;image-rendering:pixelated;margin-bottom:4px}
.gen{color:#1d4e89}.muted{color:#777}
"""


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return html.escape(str(value))


def _card(card: dict) -> str:
    state = "kept" if card["kept"] else "dropped"
    image = f'<img src="{card["image"]}" alt="{html.escape(card["key"])}">' if card["image"] else \
        '<div class="muted">(image not readable here)</div>'
    lines = [f'<span class="badge">{state.upper()}</span> <span class="muted">{html.escape(card["key"])}</span>',
             f'original: {_fmt(card["original"])}']
    if card["kept"]:
        lines.append(f'<span class="gen">generated: {_fmt(card["generated"])}</span>')
        lines.append(f'confidence {_fmt(card["confidence"])}, shipped: {_fmt(card["reason"])}')
    lines.append(f'alignment {_fmt(card["alignment"])}')
    return f'<div class="card {state}">{image}' + "<br>".join(lines) + "</div>"


def _rows(items) -> str:
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in items)


def render_report(run_dir: str) -> str:
    """The report page of the run in `run_dir`, as one self-contained HTML string: what was kept first
    (charts, the sample grid), the full tables after."""
    run = load_run(run_dir)
    manifest = run["manifest"]
    metrics = summary_metrics(run)
    params = params_of(run)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tldr-vlp report: {html.escape(run_dir)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>tldr-vlp run {html.escape(run_dir)}</h1>",
             f"<p>kept <b>{_fmt(manifest.get('kept'))}</b> of {_fmt(manifest.get('input_samples'))} samples "
             f"({_fmt(manifest.get('dropped'))} dropped, {_fmt(manifest.get('rejected'))} rejected); "
             + ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in params.items())
             + f"<br><span class='muted'>input {_fmt(manifest.get('input'))} (version "
             f"{_fmt(manifest.get('input_version'))}), config {_fmt(manifest.get('config_hash'))}</span></p>"]
    charts = [("cluster sizes", cluster_sizes_chart(run)), ("alignment, input vs kept", alignment_chart(run)),
              ("retrieval", retrieval_chart(run)), ("learning curves", learning_chart(run))]
    parts.append('<div class="charts">')
    parts += [f'<img src="{uri}" alt="{title}" title="{title}">' for title, uri in charts if uri]
    parts.append("</div><h2>Samples by cluster</h2>")
    for cluster, size, kept, cards in sample_cards(run):
        parts.append(f"<h3>cluster {cluster}: {size} samples, {kept} kept</h3><div class='grid'>")
        parts += [_card(c) for c in cards]
        parts.append("</div>")
    parts += ["<h2>Metrics</h2><table>", _rows((k, v) for k, v in metrics.items() if not k.startswith("eval.")),
              "</table>"]
    if run["embed_status"]:
        parts += ["<h2>Input shards</h2><table><tr><th>shard</th><th>embed</th><th>content md5</th></tr>",
                  *(f"<tr><td>{html.escape(s)}</td><td>{html.escape(r['status'])}</td><td>{html.escape(r['digest'])}"
                    f"</td></tr>" for s, r in sorted(run["embed_status"].items())), "</table>"]
    if run["evaluation"]:
        parts += ["<h2>Evaluation</h2><table>",
                  _rows((k.removeprefix("eval."), v) for k, v in metrics.items() if k.startswith("eval.")), "</table>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str, out: str | None = None) -> list[str]:
    """Into `out` (default `run_dir/report`): report.html and what `dvc metrics show` and `dvc plots show`
    read: metrics.json, cluster_sizes.csv, alignment.csv and, for an evaluated run, learning_curves.csv
    (step, one column per arm)."""
    run = load_run(run_dir)
    out = out or storage.join(run_dir, "report")
    written = [storage.join(out, "report.html"), storage.join(out, "metrics.json")]
    storage.write_text_atomic(written[0], render_report(run_dir))
    storage.write_text_atomic(written[1], json.dumps(summary_metrics(run), indent=1, sort_keys=True))
    sizes = Counter(r["cluster"] for r in run["assignments"])
    kept = Counter(r["cluster"] for r in run["assignments"] if r["key"] in run["selected"])
    tables = {"cluster_sizes.csv": [["cluster", "size", "kept"]] + [[c, sizes[c], kept[c]] for c in sorted(sizes)]}
    before = _finite(run["alignment"].values())
    if len(before):
        after = _finite(v for k, v in run["alignment"].items() if k in run["selected"])
        edges = np.histogram_bin_edges(before, bins=30)
        centres = (edges[:-1] + edges[1:]) / 2
        tables["alignment.csv"] = [["alignment", "input", "kept"]] + [
            [round(float(c), 4), int(i), int(k)] for c, i, k in
            zip(centres, np.histogram(before, edges)[0], np.histogram(after, edges)[0])]
    curves = learning_curves(run)
    if curves:  # an evaluated run only
        steps = sorted({int(s) for points in curves.values() for s, _ in points})
        lookup = {arm: {int(s): r1 for s, r1 in points} for arm, points in curves.items()}
        tables["learning_curves.csv"] = [["step", *curves]] + [[s, *(lookup[a].get(s, "") for a in curves)]
                                                               for s in steps]
    for name, rows in tables.items():
        buffer = _io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        storage.write_text_atomic(storage.join(out, name), buffer.getvalue())
        written.append(storage.join(out, name))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tldr-vlp report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (the --out of compress, or data/run under dvc)")
    parser.add_argument("--out", help="folder for report.html, metrics.json and the plot tables "
                                      "(default RUN_DIR/report)")
    args = parser.parse_args(argv)
    if not storage.exists(storage.join(args.run_dir, "shards", "manifest.json")):
        parser.error(f"{args.run_dir} holds no finished run (no shards/manifest.json)")
    for url in write_report(args.run_dir, args.out):
        print(url)
    return 0
