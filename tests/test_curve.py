"""The ratio curve and `sample.ratio: auto` (curve.py, the sample stage): the carved validation split is never
selected from at any ratio of the curve, the same inputs choose the same ratio, the counts add up with carving,
report.html shows the plot, and a run that cannot carve a usable split is refused before any work."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_report import CHECK_IMAGES, _parse, chromium

from tldr_tasks import cli, curve, storage
from tldr_tasks.config import MIN_HOLDOUT, ConfigError, load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, iter_shard
from tldr_tasks.models import towers_clip
from tldr_tasks.report import render_report
from tldr_tasks.runner import check_stage_params
from tldr_tasks.stages import kmeans, materialize, sample

torch.set_num_threads(1)

# The tiny crawl's 200 samples: half carved (MIN_HOLDOUT pairs), three ratios, two seeds: seconds on a CPU.
AUTO = ["sample.ratio=auto", "sample.strategy=uniform", "sample.holdout_share=0.5", "sample.curve_ratios=0.1,0.5,1.0",
        "sample.curve_seeds=2", "captioner.folds=1"]


def _assignments(tiny_crawl: str, out: Path) -> list[dict]:
    """cluster/assignments.parquet for the tiny crawl's samples: 5 clusters and losses drawn at random (seed 0)."""
    rng = np.random.default_rng(0)
    rows = [{"key": s.key, "shard": storage.shard_stem(url), "cluster": int(rng.integers(5)),
             "distance": float(rng.random()), "loss": float(rng.random())}
            for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url) if isinstance(s, Sample)]
    (out / "cluster").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "cluster" / "assignments.parquet")
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                             "reason": pa.array([], pa.string())}), out / "cluster" / "rejects.parquet")
    return rows


def _auto_run(tiny_crawl: str, root: Path, cache: Path) -> tuple[StageIO, dict[float, set[str]]]:
    """The sample stage with ratio auto in `root`; returns its io and the keys each selection kept, by ratio."""
    _assignments(tiny_crawl, root)
    io = StageIO(input=f"{tiny_crawl}/train", out=str(root), embed_cache=str(cache))
    chosen: dict[float, set[str]] = {}
    real = sample.keep_mask

    def recording(cfg, ev, ratio):
        keep, repair = real(cfg, ev, ratio)
        chosen[ratio] = set(ev.table["key"].to_numpy(zero_copy_only=False)[keep].astype(str))
        return keep, repair

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "keep_mask", recording)
        sample.run(load_config(None, AUTO), io)
    return io, chosen


@pytest.fixture(scope="module")
def auto_runs(tiny_crawl, tmp_path_factory):
    """Two runs of the same inputs in two folders, sharing the tower-feature cache: the first computes it, the second
    reads it with the per-process memos empty, as a rerun in a new process does."""
    root = tmp_path_factory.mktemp("auto")
    runs = []
    for i in range(2):
        towers_clip._MEMO.clear()
        towers_clip._BY_DIGEST.clear()
        runs.append(_auto_run(tiny_crawl, root / f"run{i}", root / "cache"))
    return runs


def _keys(url: str) -> set[str]:
    return set(pq.read_table(url, columns=["key"])["key"].to_pylist())


def test_the_carved_split_is_disjoint_from_every_selection(auto_runs):
    io, chosen = auto_runs[0]
    carved = _keys(f"{io.sample_dir}/holdout.parquet")
    assert len(carved) == MIN_HOLDOUT
    assert sorted(chosen) == [0.1, 0.5, 1.0]  # every curve ratio (the chosen one is one of them)
    for ratio, kept in chosen.items():
        assert kept and not kept & carved, ratio
    # nothing carved is scored for selection or shipped either
    assert not _keys(f"{io.sample_dir}/alignment.parquet") & carved
    assert not _keys(f"{io.sample_dir}/selected.parquet") & carved
    # the split is the keys' own: the same keys from the keys in any order
    keys = np.array(sorted(_keys(f"{io.cluster_dir}/assignments.parquet")))
    cfg = load_config(None, AUTO)
    assert set(keys[curve.carve(keys, cfg.sample)]) == carved == set(keys[::-1][curve.carve(keys[::-1], cfg.sample)])


def test_the_same_inputs_choose_the_same_ratio(auto_runs):
    (first, _), (second, _) = auto_runs
    curves = [json.loads(Path(io.sample_dir, "curve.json").read_text()) for io in (first, second)]
    assert curves[0] == curves[1]
    assert Path(first.sample_dir, "curve.png").read_bytes() == Path(second.sample_dir, "curve.png").read_bytes()
    result = curves[0]
    stats = json.loads(Path(first.sample_dir, "stats.json").read_text())
    # the stage kept the ratio the curve chose, by the rule, at that ratio's exact count
    assert stats["ratio"] == "auto" and stats["ratio_chosen"] == result["chosen_ratio"]
    assert result["chosen_ratio"] == curve.choose_ratio(result["points"], result["tolerance"])
    assert stats["kept"] == sample.target_count(result["chosen_ratio"], stats["input"] - stats["carved"])
    assert _keys(f"{first.sample_dir}/selected.parquet") == _keys(f"{second.sample_dir}/selected.parquet")
    for point in result["points"]:
        assert len(point["scores"]) == 2 and point["low"] <= point["mean"] <= point["high"]


def test_auto_keeps_the_smallest_ratio_whose_lower_bound_holds():
    def point(ratio, mean, low):
        return {"ratio": ratio, "mean": mean, "low": low, "high": 2 * mean - low}

    points = [point(1.0, 50.0, 49.0), point(0.1, 46.0, 44.0), point(0.3, 49.0, 47.6), point(0.5, 49.5, 48.0)]
    # 0.1's mean is within 10% of 50, but its lower bound (44) is not above 45: the bound decides
    assert curve.choose_ratio(points, 0.10) == 0.3
    assert curve.choose_ratio(points, 0.05) == 0.3  # 47.6 >= 47.5
    assert curve.choose_ratio(points, 0.01) == 1.0  # nothing holds 49.5, not even the whole crawl's bound: 1.0
    assert curve.interval([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    mean, low, high = curve.interval([1.0, 2.0, 3.0])
    assert (mean, round(low, 3), round(high, 3)) == (2.0, -0.484, 4.484)  # 2 -+ t(0.975, 2) * 1 / sqrt(3)


def test_the_counts_add_up_with_carving(auto_runs):
    io, _ = auto_runs[0]
    stats = json.loads(Path(io.sample_dir, "stats.json").read_text())
    assert stats["input"] == 200 and stats["carved"] == MIN_HOLDOUT
    assert stats["input"] == stats["kept"] + stats["dropped"] + stats["carved"]
    selected = pq.read_table(f"{io.sample_dir}/selected.parquet", columns=["key", "shard"])
    carved = pq.read_table(f"{io.sample_dir}/holdout.parquet")
    assignments = pq.read_table(f"{io.cluster_dir}/assignments.parquet", columns=["key", "shard"])
    rejects = [{"key": "gone", "shard": "00000", "reason": "decode: broken"}]
    accounting = materialize.account(assignments.to_batches(max_chunksize=37), rejects, selected, carved)
    assert (accounting["kept"], accounting["dropped"], accounting["carved"]) == (
        stats["kept"], stats["dropped"], stats["carved"])
    for counts in accounting["per_shard"].values():
        assert counts["input"] == counts["kept"] + counts["dropped"] + counts["carved"] + counts["rejected"]
    assert accounting["input_samples"] == 201


def test_report_shows_the_ratio_curve_in_headless_chromium(auto_runs, tmp_path):
    io, _ = auto_runs[0]
    result = json.loads(Path(io.sample_dir, "curve.json").read_text())
    Path(io.shards_dir).mkdir(exist_ok=True)
    Path(io.shards_dir, "manifest.json").write_text(json.dumps({"kept": 1, "carved": MIN_HOLDOUT, "curve": result}))
    page = render_report(io.out)
    plots = [i for i in _parse(page).images if i["alt"] == "ratio curve"]
    png = Path(io.sample_dir, "curve.png").read_bytes()
    assert [i["src"] for i in plots] == ["data:image/png;base64," + base64.b64encode(png).decode()]
    assert f"ratio auto chose {result['chosen_ratio']:g}" in page and "carved for the ratio curve" in page
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK_IMAGES))
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", checked.as_uri()).stdout
    assert [i.get("data-loaded") for i in _parse(dom).images if i["alt"] == "ratio curve"] == ["true"]


def test_auto_clusters_by_the_papers_ratio_and_a_changed_ratio_is_never_reused(tmp_path):
    assert kmeans.cluster_count(load_config(None, ["sample.ratio=auto"]), 10_000) == round(8 * np.sqrt(2500))
    io = StageIO(input="crawl", out=str(tmp_path))
    check_stage_params(load_config(None, ["sample.ratio=0.25"]), io, "sample")
    with pytest.raises(ConfigError, match="sample.ratio: 0.25 -> 'auto'"):
        check_stage_params(load_config(None, ["sample.ratio=auto"]), io, "sample")


@pytest.mark.parametrize("args, message", [
    (["--ratio", "auto"], f"sample.ratio=auto needs a validation split of at least {MIN_HOLDOUT} pairs, and "
                          "sample.holdout_share=0.05 of 200 samples carves 10 (raise sample.holdout_share to 0.5"),
    (["--ratio", "auto", "--set", "sample.holdout_max=50"], "(raise sample.holdout_max to 100"),
    (["--set", "sample.curve=true"], "sample.curve=true needs a validation split of at least 100 pairs"),
    (["--ratio", "auto", "--set", "sample.auto_tolerance=0"], "sample.auto_tolerance=0.0 is out of range"),
    (["--ratio", "auto", "--set", "sample.auto_tolerance=1.5"], "sample.auto_tolerance=1.5 is out of range"),
    (["--set", "sample.curve=true", "--set", "sample.curve_ratios=0.1,0.5"],
     "sample.curve_ratios=[0.1, 0.5] is not a curve"),
    (["--ratio", "auto", "--set", "sample.curve_ratios=0,1"], "sample.curve_ratios=[0.0, 1.0] is not a curve"),
    (["--ratio", "auto", "--set", "sample.curve_ratios=0.5,0.5,1"], "is not a curve"),
    (["--ratio", "auto", "--set", "sample.curve_seeds=1"], "sample.curve_seeds=1 gives none (use 2 or more"),
    (["--ratio", "most"], "sample.ratio='most' is not valid (give a share in (0, 1], e.g. 0.25, or auto)"),
    (["--ratio", "auto", "--set", "sample.holdout_share=0.5", "--set", "sample.curve_ratios=0.001,1"],
     "sample.curve_ratios: 0.001 keeps no sample of the 100 outside the validation split"),
])
def test_bad_auto_input_is_refused_before_any_work(tiny_crawl, mlflow_store, tmp_path, capsys, args, message):
    where = tmp_path / "nothing"
    where.mkdir()
    argv = ["compress", "--input", f"{tiny_crawl}/train", "--out", str(where / "out"), "--embed-cache",
            str(where / "cache"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert list(where.iterdir()) == []
