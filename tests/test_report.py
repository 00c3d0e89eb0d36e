"""report.html: a self-contained page of a run (charts, kept and dropped samples with their captions), the
metrics and plot tables DVC reads, and the page rendered in headless Chromium with every image loaded."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tldr_tasks import cli
from tldr_tasks.data.shards import ShardWriter, encode_json, write_tar
from tldr_tasks.report import render_report

# compress on the tiny crawl in a minute or two (tests/test_end_to_end.py's settings)
TINY = ["--set", "captioner.epochs=1", "--set", "captioner.image_size=32", "--set", "captioner.batch_size=32",
        "--set", "caption.num_beams=1", "--set", "caption.max_new_tokens=12", "--set", "materialize.shard_size=20",
        "--clusters", "4", "--ratio", "0.3"]
N = 12  # samples k00..k11 in two input shards; cluster i % 3; even i kept


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (20 * i, 255 - 20 * i, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _table(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _arm(r1: float) -> dict:
    test = {"i2t_r1": r1, "i2t_r5": r1 + 10, "i2t_r10": r1 + 20, "t2i_r1": r1, "t2i_r5": r1 + 9, "t2i_r10": r1 + 19,
            "mean_r1": r1}
    return {"test": test, "validation": test, "train_seconds": 1.5, "steps": 8,
            "curve": {"test": [[2, r1 / 4], [4, r1 / 2], [8, r1]], "validation": [[8, r1]]}}


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A finished, evaluated run folder in the formats the stages write, made by hand (no models)."""
    crawl, run = tmp_path / "crawl", tmp_path / "run"
    with ShardWriter(str(crawl), shard_size=6) as writer:
        for i in range(N):
            writer.write(f"k{i:02d}", {"png": _png(i), "txt": f"original {i}".encode()})
    rows = [{"key": f"k{i:02d}", "shard": f"{i // 6:05d}", "cluster": i % 3, "distance": 0.1, "loss": 2.0}
            for i in range(N)]
    kept = [r for i, r in enumerate(rows) if i % 2 == 0]
    _table(run / "cluster" / "assignments.parquet", rows)
    _table(run / "sample" / "selected.parquet", [{k: r[k] for k in ("key", "shard", "cluster")} for r in kept])
    _table(run / "sample" / "alignment.parquet",
           [{"key": r["key"], "alignment": i / 10, "kept": i % 2 == 0} for i, r in enumerate(rows)])
    write_tar(str(run / "shards" / "00000.tar"), [(r["key"], {"png": _png(int(r["key"][1:])), "txt": b"shipped",
                                                               "json": encode_json({
        "original_caption": f"original {int(r['key'][1:])}", "generated_caption": f"generated {int(r['key'][1:])}",
        "confidence": -0.25, "alignment": int(r["key"][1:]) / 10, "caption_reason": "replaced",
        "cluster": r["cluster"]})}) for r in kept])
    manifest = {"input": str(crawl), "input_version": "v1", "config_hash": "abc", "input_samples": N, "kept": 6,
                "dropped": 6, "rejected": 0, "ratio": 0.5, "metrics": {"caption_confidence_mean": -0.25},
                "config": {"seed": 0, "sample": {"ratio": 0.5, "strategy": "uniform"}, "cluster": {"clusters": 3}}}
    (run / "shards" / "manifest.json").write_text(json.dumps(manifest))
    (run / "embed" / "status").mkdir(parents=True)
    for stem, status in (("00000", "reused"), ("00001", "replaced")):
        (run / "embed" / "status" / f"{stem}.json").write_text(json.dumps(
            {"shard": stem, "digest": "0" * 32, "status": status, "replaced_digests": []}))
    (run / "evaluate").mkdir()
    (run / "evaluate" / "report.json").write_text(json.dumps({"arms": {"full": _arm(20.0), "tldr": _arm(16.0)}}))
    return run


class _Page(HTMLParser):
    """The page's <img> sources and alts and the classes of its sample cards."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.cards: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self.cards.append(attrs["class"])


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def test_report_shows_kept_and_dropped_samples_with_captions_and_charts(run_dir):
    page = render_report(str(run_dir))
    parsed = _parse(page)
    # self-contained: every image is inlined, nothing is fetched
    assert parsed.images and all(i["src"].startswith("data:image/png;base64,") for i in parsed.images)
    charts = {i["alt"] for i in parsed.images if not i["alt"].startswith("k")}
    assert charts == {"cluster sizes", "alignment, input vs kept", "retrieval", "learning curves"}
    # three clusters of 4 samples: 2 kept, 2 dropped each, every one with its image
    assert sorted(parsed.cards) == ["card dropped"] * 6 + ["card kept"] * 6
    assert sorted(i["alt"] for i in parsed.images if i["alt"].startswith("k")) == [f"k{i:02d}" for i in range(N)]
    assert "generated 4" in page and "original 3" in page  # kept: both captions; dropped: its original
    assert "generated 3" not in page  # a dropped sample was never captioned
    assert "replaced" in page and "reused" in page  # the embed outcome of each input shard
    # not evaluated: no retrieval bars or learning curves, the rest unchanged
    (run_dir / "evaluate" / "report.json").unlink()
    charts = {i["alt"] for i in _parse(render_report(str(run_dir))).images if not i["alt"].startswith("k")}
    assert charts == {"cluster sizes", "alignment, input vs kept"}


def test_report_escapes_what_the_run_folder_holds(run_dir):
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    manifest["input"] = "<script>alert(1)</script>"  # and unreadable: the dropped samples have no image
    (run_dir / "shards" / "manifest.json").write_text(json.dumps(manifest))
    page = render_report(str(run_dir))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("(image not readable here)") == 6 and "original: original 3" not in page


def test_shipped_captions_table_lists_every_reason_the_manifest_counts(run_dir):
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    # a reason this page was not written for, and one that must be escaped
    manifest["captions"] = {"replaced": 4, "repaired": 1, "<i>odd</i>": 1}
    by_reason = {"replaced": (4, 1, 4), "repaired": (1, 1, 1), "<i>odd</i>": (1, 1, 1)}
    manifest["caption_noise"] = {"judge": "strict", "samples": 6, "shipped": 0.5, "original": 1.0, "by_reason": {
        reason: dict(zip(("shipped", "noisy", "original_noisy"), counts)) for reason, counts in by_reason.items()}}
    (run_dir / "shards" / "manifest.json").write_text(json.dumps(manifest))
    page = render_report(str(run_dir))
    assert "shipped captions\n<b>50.0%</b>, their original captions 100.0%" in page
    assert "<tr><td>replaced</td><td>4</td><td>66.7%</td><td>1</td><td>4</td></tr>" in page
    assert "<tr><td>repaired</td><td>1</td><td>16.7%</td><td>1</td><td>1</td></tr>" in page
    assert "<i>odd</i>" not in page and "&lt;i&gt;odd&lt;/i&gt;" in page
    # no ground truth: counts and shares only, and why
    manifest.update(caption_noise=None, caption_noise_note="6 of 6 kept samples have no ground truth")
    (run_dir / "shards" / "manifest.json").write_text(json.dumps(manifest))
    page = render_report(str(run_dir))
    assert "<tr><td>repaired</td><td>1</td><td>16.7%</td></tr>" in page and "noisy shipped" not in page
    assert "6 of 6 kept samples have no ground truth" in page


def test_report_command_writes_metrics_and_plot_tables(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", str(run_dir), "--out", str(out)]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["kept"], metrics["dropped"], metrics["clusters"]) == (6, 6, 3)
    assert metrics["alignment_input_mean"] == pytest.approx(np.mean(np.arange(N) / 10), abs=1e-4)
    assert metrics["alignment_kept_mean"] == pytest.approx(np.mean(np.arange(0, N, 2) / 10), abs=1e-4)
    assert not any(name.startswith("alignment_mean") for name in metrics)  # one name per number
    assert (metrics["shards_reused"], metrics["shards_replaced"], metrics["shards_embedded"]) == (1, 1, 0)
    assert metrics["eval.test.tldr.mean_r1"] == 16.0
    curves = list(csv.DictReader((out / "learning_curves.csv").open()))
    assert [(r["step"], r["full"], r["tldr"]) for r in curves] == [("2", "5.0", "4.0"), ("4", "10.0", "8.0"),
                                                                  ("8", "20.0", "16.0")]
    sizes = list(csv.DictReader((out / "cluster_sizes.csv").open()))
    assert [(r["size"], r["kept"]) for r in sizes] == [("4", "2")] * 3
    alignment = list(csv.DictReader((out / "alignment.csv").open()))
    assert sum(int(r["input"]) for r in alignment) == N and sum(int(r["kept"]) for r in alignment) == 6
    # not evaluated: no learning curves table
    (run_dir / "evaluate" / "report.json").unlink()
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "unevaluated")]) == 0
    assert sorted(p.name for p in (tmp_path / "unevaluated").iterdir()) == [
        "alignment.csv", "cluster_sizes.csv", "metrics.json", "report.html"]
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "nothing-here")])


CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) img.setAttribute("data-loaded", String(img.complete && img.naturalWidth > 0));
  document.body.setAttribute("data-checked", String(document.images.length));
});
</script></body>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Debian's chromium, headless, with the flags a machine without network and without a display needs."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed (`make test` installs it: apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=5000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium_with_every_image_loaded(run_dir, tmp_path):
    page = render_report(str(run_dir))
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK_IMAGES))
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    dom = chromium(profile, "--dump-dom", checked.as_uri()).stdout
    loaded = [i.get("data-loaded") for i in _parse(dom).images]
    assert f'data-checked="{len(_parse(page).images)}"' in dom  # the check ran, over every image
    assert len(loaded) == 16 and set(loaded) == {"true"}
    shot = tmp_path / "report.png"
    chromium(profile, f"--screenshot={shot}", "--window-size=1200,900", checked.as_uri())
    assert Image.open(shot).size == (1200, 900)


class _Table(HTMLParser):
    """The rows (cell texts) of the table with the id given, and the text of the elements with the ids given."""

    def __init__(self, table_id: str, text_ids: tuple[str, ...] = ()):
        super().__init__()
        self.table_id, self.text_ids = table_id, text_ids
        self.rows: list[list[str]] = []
        self.texts: dict[str, str] = {}
        self._in_table = False
        self._open: list[str] = []  # ids of the text elements being read

    def handle_starttag(self, tag, attrs):
        element_id = dict(attrs).get("id")
        if tag == "table" and element_id == self.table_id:
            self._in_table = True
        if self._in_table and tag == "tr":
            self.rows.append([])
        if self._in_table and tag in ("td", "th"):
            self.rows[-1].append("")
        if element_id in self.text_ids:
            self._open.append(element_id)
            self.texts[element_id] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        if tag in ("p", "div") and self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._in_table and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data
        for element_id in self._open:
            self.texts[element_id] += data


def _pct_of(value: float) -> str:
    return f"{100 * value:.1f}%"


@pytest.mark.slow
def test_a_noisy_crawls_report_opens_with_the_trust_summary_in_headless_chromium(tiny_crawl, tmp_path, mlflow_store,
                                                                                 capsys):
    """Acceptance (issue 26): report.html of a compression of a crawl with 30% caption noise starts with the input
    and kept figures beside a random subset of the same size, the strict judge's noise in and out, and the
    verdict; the manifest, MLflow and `compare` carry the same facts."""
    import mlflow

    from tldr_tasks.data.shards import Sample, iter_shard
    from tldr_tasks.data.truth import describes_exactly

    out = tmp_path / "run"
    assert cli.main(["compress", "--input", f"{tiny_crawl}/train", "--out", str(out), *TINY]) == 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    summary = manifest["trust"]
    sets = summary["sets"]
    assert sets["input"]["samples"] == manifest["input_samples"] - manifest["rejected"]
    assert sets["kept"]["samples"] == sets["random"]["samples"] == manifest["kept"]
    # the noise going in, by the strict judge, is the crawl's own (every sample carries its truth)
    crawl = [s for url in sorted(Path(tiny_crawl, "train").glob("*.tar")) for s in iter_shard(str(url))
             if isinstance(s, Sample)]
    assigned = set(pq.read_table(out / "cluster" / "assignments.parquet")["key"].to_pylist())
    noisy = {s.key: not describes_exactly(s.caption, s.meta["truth"]) for s in crawl if s.key in assigned}
    assert len(noisy) == len(assigned)
    assert summary["ground_truth"] and sets["input"]["noise"] == pytest.approx(np.mean(list(noisy.values())))
    assert 0 < sets["input"]["noise"] < 1  # a noisy crawl
    checked = tmp_path / "checked.html"
    checked.write_text((out / "report" / "report.html").read_text())
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", checked.as_uri()).stdout
    page = _Table("trust-summary", ("trust-verdict", "collapse-banner"))
    page.feed(dom)
    header, *rows = page.rows
    assert [cell.strip() for cell in header[1:]] == ["input", "kept", "random subset, same size"]
    by_label = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows}
    noise_row = next(cells for label, cells in by_label.items() if label.startswith("noisy original captions"))
    assert noise_row == [_pct_of(sets[name]["noise"]) for name in ("input", "kept", "random")]
    misaligned = next(cells for label, cells in by_label.items() if label.startswith("likely misaligned"))
    assert misaligned == [_pct_of(sets[name]["misaligned_share"]) for name in ("input", "kept", "random")]
    assert by_label["samples"] == [f"{sets[name]['samples']:,}" for name in ("input", "kept", "random")]
    assert any(label.startswith("exact duplicates") for label in by_label)
    assert any(label.startswith("near duplicates") for label in by_label)
    assert page.texts["trust-verdict"].strip() == summary["verdict"]["text"]
    assert ("collapse-banner" in page.texts) == manifest["collapse_check"]["collapsed"]
    # the summary comes before anything else on the page: the first table
    assert dom.index('id="trust-summary"') < dom.index("<img")
    # MLflow: one metric per fact on the parent run, as `compare` shows it by default
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parent = next(r for r in runs if "tldr.run_key" in r.data.tags)
    for name in ("input", "kept", "random"):
        assert parent.data.metrics[f"trust.{name}.noise"] == pytest.approx(sets[name]["noise"], abs=1e-4)
        assert parent.data.metrics[f"trust.{name}.misaligned_share"] == pytest.approx(sets[name]["misaligned_share"],
                                                                                     abs=1e-4)
    assert parent.data.metrics["trust.kept_no_better_than_random"] == summary["verdict"]["no_better_than_random"]
    capsys.readouterr()
    assert cli.main(["compare", str(out), parent.info.run_id]) == 0
    shown = capsys.readouterr().out
    assert "trust.kept.noise" in shown and "trust.random.noise" in shown and "shipped_noise" in shown


def test_collapsed_captions_show_a_banner_in_headless_chromium(run_dir, tmp_path):
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    for collapsed in (True, False):
        manifest["collapse_check"] = {"collapsed": collapsed, "distinct_generated": 2, "samples": 6,
                                      "entropy_ratio": 0.1}
        (run_dir / "shards" / "manifest.json").write_text(json.dumps(manifest))
        checked = tmp_path / f"collapsed-{collapsed}.html"
        checked.write_text(render_report(str(run_dir)))
        dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", checked.as_uri()).stdout
        page = _Table("trust-summary", ("collapse-banner",))
        page.feed(dom)
        if collapsed:
            assert "The generated captions collapsed: 2 distinct captions for 6 kept images" in " ".join(
                page.texts["collapse-banner"].split())
        else:
            assert "collapse-banner" not in page.texts


def test_the_header_shows_only_what_the_run_used(run_dir):
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    manifest["config"].update(evaluate={"epochs": 5}, cluster={"clusters": 0})
    (run_dir / "shards" / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "evaluate" / "report.json").unlink()  # not evaluated: no evaluate.* in the header
    page = render_report(str(run_dir))
    header = page[page.index("<p>kept"):page.index("</p>")]
    assert "evaluate.epochs" not in header
    assert "cluster.clusters 0 (size rule: 3 used)" in header
