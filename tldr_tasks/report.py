"""`report.html`: one self-contained page per run to look at what was kept and why.

    tldr-vlp report runs/r1                      -> runs/r1/report/{report.html,metrics.json,*.csv}
    tldr-vlp report data/run --out data/report   (the dvc.yaml `report` stage)

The page (every image inlined as a data URI, so it opens anywhere and can be an MLflow artifact):
the run's parameters and summary metrics; the ratio curve (curve.py) and auto's choice when the run
scored one; a banner when the generated captions collapsed; the trust summary (trust.py: input vs kept
vs a random subset of the same size, and a verdict); the shipped
captions per reason and, for a crawl with ground truth, how many of them and of their originals the
strict judge finds noisy; each shard's embed outcome (embedded, reused, replaced); the cluster-size
histogram; the caption loss of the input, the kept set and the random subset; retrieval bars and
learning curves when the run was evaluated; and a grid of sample
images for a spread of clusters, kept and dropped marked, with original and generated captions,
caption confidence, alignment score and why the shipped caption was chosen.

The run comes from `runs.load_run` (what a run folder holds; missing parts are empty, so a run that
was not evaluated has no retrieval section); the sample images from the output shards and, for
dropped samples, the input shards the manifest names. The page is `templates/report.html.j2`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io as _io
import json

import jinja2
import numpy as np

from tldr_tasks import storage
from tldr_tasks.curve import summary as curve_summary
from tldr_tasks.runs import (
    alignment_scores,
    caption_losses,
    cluster_counts,
    evaluation_arms,
    learning_curves,
    load_run,
    params_of,
    summary_metrics,
)

CLUSTERS_SHOWN = 8
PER_CLUSTER = 3  # kept and dropped samples shown per cluster, each
THUMB_PX = 112


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


def ratio_curve_chart(run: dict) -> str | None:
    """The ratio curve's plot as the sample stage drew it (sample/curve.png; curve.py), when the run scored one."""
    url = storage.join(run["run_dir"], "sample", "curve.png")
    if not storage.exists(url):
        return None
    return "data:image/png;base64," + base64.b64encode(storage.read_bytes(url)).decode()


def cluster_sizes_chart(run: dict) -> str | None:
    sizes, kept = cluster_counts(run)
    if not sizes:
        return None
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
    """The caption loss (nats per token) of the input, the kept set and the random reference, on an axis
    spanning the input's 1st to 99th percentile (the few values beyond it are counted in the edge bars),
    as each set's share of its samples. A folder without losses: the within-cluster z-scores, likewise."""
    losses = caption_losses(run)
    if losses and len(losses["input"]):
        label = "caption loss, nats per token (lower: the caption fits its image better)"
    else:
        before, after = alignment_scores(run)
        if not len(before):
            return None
        losses = {"input": before, "kept": after}
        label = "alignment score, robust z within its cluster (higher: fits better)"
    low, high = np.percentile(losses["input"], [1, 99])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 31)
    fig, ax = _figure(5.6, 3.2)
    for name, colour in (("input", "C0"), ("kept", "C2"), ("random", "C7")):
        values = losses.get(name)
        if values is None or not len(values):
            continue
        weights = np.full(len(values), 100.0 / len(values))
        ax.hist(np.clip(values, low, high), bins=bins, weights=weights, histtype="step" if name == "random" else "bar",
                alpha=1.0 if name == "random" else 0.55, color=colour, linewidth=1.5,
                label=f"{name} ({len(values)})" if name != "random" else f"random subset, same size ({len(values)})")
    ax.set_xlabel(label, fontsize=9)
    ax.set_ylabel("% of the set's samples")
    ax.legend(fontsize=8)
    return _data_uri(fig)


def retrieval_chart(run: dict) -> str | None:
    arms = {name: arm.get("test") or {} for name, arm in evaluation_arms(run).items()}
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
    sizes, kept = cluster_counts(run)
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


# ---- the shipped captions ----

def shipped_caption_rows(manifest: dict) -> list[dict]:
    """One row per reason a caption shipped for (whatever reasons the manifest counts): the count, its
    share of the kept samples and the noisy shipped captions and noisy originals (counted only with ground
    truth: the page shows them only then)."""
    counts = manifest.get("captions") or {}
    by_reason = (manifest.get("caption_noise") or {}).get("by_reason") or {}
    total = sum(counts.values())
    return [{"reason": reason, "count": count, "share": count / total if total else None,
             "noisy": by_reason.get(reason, {}).get("noisy", 0),
             "original_noisy": by_reason.get(reason, {}).get("original_noisy", 0)}
            for reason, count in counts.items()]


# ---- the trust summary ----

TRUST_ROWS = (  # (fact, what it is, how the page shows it)
    ("samples", "samples", "int"),
    ("caption_loss_median", "caption loss, median (nats per token; lower fits better)", "num"),
    ("caption_loss_percentile", "that median among the input's losses (percentile)", "num"),
    ("misaligned_share", "likely misaligned: caption loss > {z:g} robust SD above its cluster's median, or empty",
     "pct"),
    ("exact_duplicate_share", "exact duplicates: image bytes identical to another sample of the set", "pct"),
    ("near_duplicate_share", "near duplicates: codebook feature cosine >= {cosine:g} with another sample "
                             "of its cluster in the set", "pct"),
    ("clusters_covered", "clusters covered", "int"),
    ("noise", "noisy original captions, strict judge (ground truth)", "pct"),
)


def trust_rows(summary: dict | None) -> list[dict]:
    """The trust summary as table rows: {"label", "input", "kept", "random"} (values formatted for the page);
    the noise row only with ground truth."""
    if not summary:
        return []
    sets, t = summary["sets"], summary["thresholds"]
    show = {"int": lambda v: "–" if v is None else f"{int(v):,}", "num": _fmt, "pct": _pct}
    return [{"label": label.format(z=t["misaligned_z"], cosine=t["near_duplicate_cosine"]),
             **{name: show[kind](sets[name].get(fact)) for name in ("input", "kept", "random")}}
            for fact, label, kind in TRUST_ROWS if any(fact in sets[name] for name in sets)]


# ---- the page ----

def _fmt(value) -> str:
    """A value as the page shows it (the template's `fmt`): "–" for none, a float to 3 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _pct(value) -> str:
    """A share as the page shows it (the template's `pct`): "–" for none, else a percentage."""
    return "–" if value is None else f"{100 * value:.1f}%"


_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("tldr_tasks"), autoescape=True, trim_blocks=True,
                                lstrip_blocks=True, undefined=jinja2.StrictUndefined)
_TEMPLATES.filters["fmt"] = _fmt
_TEMPLATES.filters["pct"] = _pct


def render_report(run_dir: str) -> str:
    """The report page of the run in `run_dir`, as one self-contained HTML string: what was kept first
    (charts, the sample grid), the full tables after."""
    return _render(load_run(run_dir))


def _render(run: dict) -> str:
    metrics = summary_metrics(run)
    charts = [("ratio curve", ratio_curve_chart(run)), ("cluster sizes", cluster_sizes_chart(run)),
              ("alignment, input vs kept", alignment_chart(run)), ("retrieval", retrieval_chart(run)),
              ("learning curves", learning_chart(run))]
    evaluation = [(k.removeprefix("eval."), v) for k, v in metrics.items() if k.startswith("eval.")]
    return _TEMPLATES.get_template("report.html.j2").render(
        run_dir=run["run_dir"], manifest=run["manifest"], params=params_of(run),
        trust=run["manifest"].get("trust"), trust_rows=trust_rows(run["manifest"].get("trust")),
        collapse=(run["manifest"].get("collapse_check") or {}),
        charts=[(title, uri) for title, uri in charts if uri], grid=sample_cards(run),
        curve=run["manifest"].get("curve"), curve_line=curve_summary(run["manifest"]["curve"]) if run["manifest"].get(
            "curve") else "",
        shipped=shipped_caption_rows(run["manifest"]), caption_noise=run["manifest"].get("caption_noise"),
        metrics=[(k, v) for k, v in metrics.items() if not k.startswith("eval.")],
        embed_status=sorted(run["embed_status"].items()), evaluation=evaluation if run["evaluation"] else None)


def write_report(run_dir: str, out: str | None = None) -> list[str]:
    """Into `out` (default `run_dir/report`): report.html and what `dvc metrics show` and `dvc plots show`
    read: metrics.json, cluster_sizes.csv, alignment.csv and, for an evaluated run, learning_curves.csv
    (step, one column per arm)."""
    run = load_run(run_dir)
    out = out or storage.join(run_dir, "report")
    written = [storage.join(out, "report.html"), storage.join(out, "metrics.json")]
    storage.write_text_atomic(written[0], _render(run))
    storage.write_text_atomic(written[1], json.dumps(summary_metrics(run), indent=1, sort_keys=True))
    sizes, kept = cluster_counts(run)
    tables = {"cluster_sizes.csv": [["cluster", "size", "kept"]] + [[c, sizes[c], kept[c]] for c in sorted(sizes)]}
    before, after = alignment_scores(run)
    if len(before):
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
