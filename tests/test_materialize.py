"""materialize: compressed shards hold exactly the selected samples with fused captions, and the
manifest accounts for every input sample."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tldr_tasks import storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, ShardWriter, encode_json, iter_shard
from tldr_tasks.stages import caption, materialize


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture()
def selection(tmp_path):
    """Two input shards of 5 samples; 1 rejected, 4 selected, 5 dropped."""
    crawl = tmp_path / "crawl"
    with ShardWriter(str(crawl), shard_size=5) as writer:
        for i in range(10):
            writer.write(f"{i:04d}", {"png": _png((i * 20, 0, 0)), "txt": f"caption {i}".encode(),
                                      "json": encode_json({"truth": {"scene": i}})})
    out = tmp_path / "run"
    assignments = [{"key": f"{i:04d}", "shard": f"{i // 5:05d}", "cluster": i % 3, "distance": 0.1, "loss": 1.0}
                   for i in range(10) if i != 7]
    _write_parquet(out / "cluster" / "assignments.parquet", assignments)
    _write_parquet(out / "cluster" / "rejects.parquet",
                   [{"key": "0007", "shard": "00001", "reason": "undecodable image: broken"}])
    selected = [{"key": k, "shard": f"{int(k) // 5:05d}", "cluster": int(k) % 3, "alignment": 0.5}
                for k in ("0001", "0003", "0006", "0009")]
    _write_parquet(out / "sample" / "selected.parquet", selected)
    (out / "sample" / "stats.json").write_text(json.dumps({"kept": 4, "alignment_kept_mean": 0.5}))
    run_io = StageIO(input=str(crawl), out=str(out))
    for shard in ("00000", "00001"):
        rows = [{"key": r["key"], "original": f"caption {int(r['key'])}", "generated": f"generated {r['key']}",
                 "confidence": -0.3, "grounding": 2.0} for r in selected if r["shard"] == shard]
        _write_parquet(Path(caption.output_url(run_io, shard)), rows)
    return run_io


def _rewrite_captions(run_io, **columns):
    """Overwrite the caption parts' columns, e.g. grounding=[...] in key order."""
    for shard in ("00000", "00001"):
        path = Path(caption.output_url(run_io, shard))
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            index = ("0001", "0003", "0006", "0009").index(row["key"])
            row.update({name: values[index] for name, values in columns.items()})
        _write_parquet(path, rows)


def test_materialize_writes_selected_samples_with_fused_captions(selection):
    cfg = Config()
    cfg.caption.fusion = "concat"
    cfg.materialize.shard_size = 3
    result = materialize.run(cfg, selection)
    shards = sorted(p for p in result.outputs if p.endswith(".tar"))
    assert len(shards) == 2  # 4 samples, 3 per shard
    samples = [s for url in shards for s in iter_shard(url)]
    assert [s.key for s in samples] == ["0001", "0003", "0006", "0009"]
    assert all(isinstance(s, Sample) for s in samples)
    assert samples[0].caption == "caption 1; generated 0001"
    assert samples[2].meta["source_shard"] == "00001"
    assert samples[2].meta["generated_caption"] == "generated 0006"
    assert samples[2].meta["truth"] == {"scene": 6}
    assert samples[3].image.getpixel((0, 0)) == (180, 0, 0)


def test_manifest_accounts_for_every_sample(selection):
    materialize.run(Config(), selection)
    manifest = json.loads(open(f"{selection.out}/shards/manifest.json").read())
    assert manifest["input_samples"] == 10
    assert (manifest["kept"], manifest["dropped"], manifest["rejected"]) == (4, 5, 1)
    assert manifest["rejected_by_reason"] == {"undecodable image": 1}
    for counts in manifest["per_shard"].values():
        assert counts["input"] == counts["kept"] + counts["dropped"] + counts["rejected"] == 5
    rejects = open(f"{selection.out}/shards/rejects.jsonl").read().splitlines()
    assert json.loads(rejects[0])["key"] == "0007"


def test_rerun_is_skipped_and_shards_are_deterministic(selection, tmp_path):
    first = materialize.run(Config(), selection)
    data = open(first.outputs[0], "rb").read()
    assert materialize.run(Config(), selection).skipped
    # a fresh run into another folder gives byte-identical shards
    other = tmp_path / "again"
    shutil.copytree(selection.out, other, ignore=shutil.ignore_patterns("shards"))
    again = materialize.run(Config(), StageIO(input=selection.input, out=str(other)))
    assert open(again.outputs[0], "rb").read() == data
    with tarfile.open(again.outputs[0]) as tar:
        assert tar.getnames()[:3] == ["0001.json", "0001.png", "0001.txt"]


def test_missing_generated_caption_is_an_error(selection):
    Path(caption.output_url(selection, "00001")).unlink()
    with pytest.raises(ConfigError, match="run the caption stage"):
        materialize.run(Config(), selection)


def test_key_txt_is_the_gated_caption_and_the_manifest_counts_reasons(selection):
    # 0001 trusted, 0003 unsure of itself, 0006 fits any image as well, 0009 has no caption
    _rewrite_captions(selection, confidence=[-0.3, -2.5, -0.3, float("nan")], grounding=[2.0, 2.0, 0.1, float("nan")],
                      generated=["generated 0001", "generated 0003", "generated 0006", ""])
    cfg = Config()
    cfg.caption.fusion = "generated"
    result = materialize.run(cfg, selection)
    samples = {s.key: s for url in result.outputs if url.endswith(".tar") for s in iter_shard(url)}
    assert {k: s.caption for k, s in samples.items()} == {
        "0001": "generated 0001", "0003": "caption 3", "0006": "caption 6", "0009": "caption 9"}
    assert samples["0003"].meta["caption_reason"] == "original:low_confidence"
    assert samples["0006"].meta["grounding"] == 0.1 and samples["0001"].meta["alignment"] == 0.5
    assert samples["0009"].meta["confidence"] is None  # strict JSON, no NaN
    manifest = json.loads(open(f"{selection.out}/shards/manifest.json").read())
    assert manifest["captions"] == {"replaced": 1, "repaired": 0, "appended": 0, "original:fusion": 0,
                                    "original:low_confidence": 1, "original:ungrounded": 1,
                                    "original:collapse": 0, "original:no_generated": 1}
    assert sum(manifest["captions"].values()) == manifest["kept"]
    assert manifest["alignment"] == {"alignment_kept_mean": 0.5}
    assert result.metrics["captions_replaced"] == 1 and result.metrics["caption_collapsed"] == 0


def test_collapsed_captions_fall_back_to_the_originals_and_say_so(selection, caplog):
    _rewrite_captions(selection, generated=["the same"] * 4)
    cfg = Config()
    cfg.caption.fusion = "generated"
    result = materialize.run(cfg, selection)
    samples = [s for url in result.outputs if url.endswith(".tar") for s in iter_shard(url)]
    assert [s.caption for s in samples] == ["caption 1", "caption 3", "caption 6", "caption 9"]
    manifest = json.loads(open(f"{selection.out}/shards/manifest.json").read())
    assert manifest["collapse_check"]["collapsed"] and manifest["captions"]["original:collapse"] == 4
    assert result.metrics["caption_collapsed"] == 1.0
    assert any(r.levelname == "WARNING" and "collapsed" in r.getMessage() for r in caplog.records)


@pytest.fixture()
def crawl_run(tmp_path):
    """4 input shards of 12 samples keyed by hashes (so key order is neither shard order nor write order),
    the shard columns dictionary-encoded as the cluster stage writes them; 2 rejected, 20 selected."""
    import hashlib

    keys = [hashlib.md5(str(i).encode()).hexdigest()[:8] for i in range(48)]
    crawl = tmp_path / "crawl"
    with ShardWriter(str(crawl), shard_size=12) as writer:
        for i, key in enumerate(keys):
            writer.write(key, {"png": _png((i * 5, 0, 0)), "txt": f"caption {i}".encode(), "json": encode_json({})})
    shard = {key: f"{i // 12:05d}" for i, key in enumerate(keys)}
    rejected, chosen = keys[4:7:2], keys[1:20:2] + keys[24:44:2]
    out = tmp_path / "run"

    def table(rows):
        columns = pa.Table.from_pylist(rows)
        return columns.set_column(1, "shard", columns["shard"].dictionary_encode())

    pq.write_table(table([{"key": k, "shard": shard[k], "cluster": i % 3} for i, k in enumerate(keys)
                          if k not in rejected]), tmp_path / "assignments.parquet")
    (out / "cluster").mkdir(parents=True)
    shutil.move(tmp_path / "assignments.parquet", out / "cluster" / "assignments.parquet")
    _write_parquet(out / "cluster" / "rejects.parquet",
                   [{"key": k, "shard": shard[k], "reason": "undecodable image: broken"} for k in rejected])
    selected = table([{"key": k, "shard": shard[k], "cluster": 1, "alignment": 0.5} for k in sorted(chosen)])
    (out / "sample").mkdir()
    pq.write_table(selected, out / "sample" / "selected.parquet")
    run_io = StageIO(input=str(crawl), out=str(out))
    for stem in sorted(set(shard[k] for k in chosen)):
        rows = [{"key": k, "original": f"caption {keys.index(k)}", "generated": f"generated {n % 7}",
                 "confidence": -0.2 if n % 4 else -3.0, "grounding": 1.0}
                for n, k in enumerate(sorted(chosen)) if shard[k] == stem]
        _write_parquet(Path(caption.output_url(run_io, stem)), rows)
    return run_io, sorted(chosen, key=lambda k: (shard[k], k))  # the input order: source shard, then key


def test_output_holds_every_selected_sample_once_in_input_order_with_its_decided_caption(crawl_run):
    from tldr_tasks import fusion

    run_io, input_order = crawl_run
    assert input_order != sorted(input_order)  # selected.parquet's key order is not the output order
    cfg = Config()
    cfg.caption.fusion = "mix"
    cfg.materialize.shard_size = 7  # output shards span source shards
    result = materialize.run(cfg, run_io)
    samples = [s for url in result.outputs if url.endswith(".tar") for s in iter_shard(url)]
    assert [s.key for s in samples] == input_order
    parts = {r["key"]: r for url in Path(run_io.caption_dir).glob("*.parquet") for r in pq.read_table(url).to_pylist()}
    for s in samples:
        row = parts[s.key]
        text, reason = fusion.ship_caption(s.key, row["original"], row["generated"], row["confidence"],
                                           row["grounding"], mode="mix", min_confidence=cfg.caption.min_confidence,
                                           min_grounding=cfg.caption.min_grounding, seed=cfg.seed, collapsed=False)
        assert (s.caption, s.meta["caption_reason"], s.meta["generated_caption"]) == (text, reason, row["generated"])
    manifest = json.loads(open(f"{run_io.out}/shards/manifest.json").read())
    assert {r for r in manifest["captions"] if manifest["captions"][r]} >= {"replaced", "original:fusion",
                                                                             "original:low_confidence"}
    assert (manifest["input_samples"], manifest["kept"], manifest["dropped"], manifest["rejected"]) == (48, 20, 26, 2)
    assert [manifest["per_shard"][s]["kept"] for s in ("00000", "00001", "00002", "00003")] == [6, 4, 6, 4]
    for counts in manifest["per_shard"].values():
        assert counts["input"] == counts["kept"] + counts["dropped"] + counts["rejected"] == 12


def test_a_restart_rewrites_a_lost_shard_byte_for_byte(crawl_run):
    run_io, _ = crawl_run
    cfg = Config()
    cfg.materialize.shard_size = 7
    outputs = materialize.run(cfg, run_io).outputs
    before = {url: Path(url).read_bytes() for url in outputs}
    Path(outputs[1]).unlink()
    Path(outputs[-1]).unlink()  # the manifest: the run is not complete
    assert materialize.run(cfg, run_io).outputs == outputs
    assert {url: Path(url).read_bytes() for url in outputs} == before


@pytest.mark.parametrize("batch_rows", [1, 5, 1000])
def test_accounting_does_not_depend_on_the_batch_size(crawl_run, batch_rows):
    run_io, _ = crawl_run
    url = f"{run_io.out}/cluster/assignments.parquet"
    rejects = pq.read_table(f"{run_io.out}/cluster/rejects.parquet").to_pylist()
    selected = pq.read_table(f"{run_io.out}/sample/selected.parquet", columns=["key", "shard"])
    counts = materialize.account(storage.iter_parquet(url, ["key", "shard"], batch_rows), rejects, selected)
    assert counts["per_shard"]["00000"] == {"kept": 6, "dropped": 4, "rejected": 2, "input": 12}
    assert (counts["kept"], counts["dropped"], counts["rejected"]) == (20, 26, 2)


def _scene(i: int) -> str:
    """Sample i's one-object scene as a caption that names it exactly."""
    from tldr_tasks.data.synthetic import COLOURS, SHAPES

    return f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]}"


def _with_ground_truth(run_io):
    """The selection's crawl again, now with synthetic ground truth (sample i: one object, _scene(i)). Of the
    kept samples 0001 has the right original and a wrong generated caption, 0003 and 0006 the reverse,
    0009 a wrong original and none generated."""
    from tldr_tasks.data.synthetic import COLOURS, SHAPES

    # caption parts are named by their shard's content: rewritten crawl shards need parts under new names
    parts = [r for path in Path(run_io.caption_dir).glob("*.parquet") for r in pq.read_table(path).to_pylist()]
    shutil.rmtree(run_io.caption_dir)
    shutil.rmtree(run_io.input)
    with ShardWriter(run_io.input, shard_size=5) as writer:
        for i in range(10):
            truth = {"scene": i, "objects": [{"colour": COLOURS[i % len(COLOURS)], "shape": SHAPES[i % len(SHAPES)]}]}
            writer.write(f"{i:04d}", {"png": _png((i * 20, 0, 0)), "txt": _scene(i if i == 1 else i + 1).encode(),
                                      "json": encode_json({"truth": truth})})
    generated = {"0001": _scene(2), "0003": _scene(3), "0006": _scene(6), "0009": ""}
    for shard in ("00000", "00001"):
        _write_parquet(Path(caption.output_url(run_io, shard)),
                       [{**r, "original": _scene(1 if r["key"] == "0001" else int(r["key"]) + 1),
                         "generated": generated[r["key"]]} for r in parts if int(r["key"]) // 5 == int(shard)])


def _judged_from_shards(urls):
    """{reason: [shipped, noisy, original noisy]} recomputed from the output shards' KEY.txt and KEY.json."""
    from tldr_tasks.data.truth import describes_exactly

    judged: dict[str, list[int]] = {}
    for url in urls:
        for s in iter_shard(url):
            counts = judged.setdefault(s.meta["caption_reason"], [0, 0, 0])
            counts[0] += 1
            counts[1] += not describes_exactly(s.caption, s.meta["truth"])
            counts[2] += not describes_exactly(s.meta["original_caption"], s.meta["truth"])
    return judged


def test_shipped_caption_noise_is_judged_per_reason_in_manifest_metrics_and_report(selection):
    from tldr_tasks.report import render_report
    from tldr_tasks.runs import load_run, summary_metrics

    _with_ground_truth(selection)
    cfg = Config()
    cfg.caption.fusion = "generated"
    cfg.materialize.shard_size = 3
    result = materialize.run(cfg, selection)
    judged = _judged_from_shards([u for u in result.outputs if u.endswith(".tar")])
    manifest = json.loads(open(f"{selection.out}/shards/manifest.json").read())
    noise = manifest["caption_noise"]
    assert {r: [c["shipped"], c["noisy"], c["original_noisy"]] for r, c in noise["by_reason"].items()} == judged
    assert noise["shipped"] == sum(c[1] for c in judged.values()) / 4 == 0.5  # 0001 and 0009 ship noise
    assert noise["original"] == sum(c[2] for c in judged.values()) / 4 == 0.75  # only 0001's original is right
    assert (noise["judge"], noise["samples"]) == ("strict", 4) and "caption_noise_note" not in manifest
    assert (result.metrics["shipped_noise"], result.metrics["original_noise"]) == (0.5, 0.75)
    # what the runner logs to MLflow's parent run
    metrics = summary_metrics(load_run(selection.out))
    assert (metrics["shipped_noise"], metrics["original_noise"]) == (0.5, 0.75)
    assert metrics["shipped_noise_replaced"] == round(1 / 3, 4) and metrics["captions_replaced"] == 3
    page = render_report(selection.out)
    assert "<h2>Shipped captions</h2>" in page and "<b>50.0%</b>, their original captions 75.0%" in page
    assert "<tr><td>replaced</td><td>3</td><td>75.0%</td><td>1</td><td>2</td></tr>" in page
    # a restart that finds every shard written reads the noise back from them
    Path(f"{selection.out}/shards/manifest.json").unlink()
    materialize.run(cfg, selection)
    assert json.loads(open(f"{selection.out}/shards/manifest.json").read())["caption_noise"] == noise


def test_a_crawl_without_ground_truth_has_no_caption_noise(crawl_run):
    from tldr_tasks.runs import load_run, summary_metrics

    run_io, _ = crawl_run
    result = materialize.run(Config(), run_io)
    manifest = json.loads(open(f"{run_io.out}/shards/manifest.json").read())
    assert manifest["caption_noise"] is None and "20 of 20 kept samples have no ground truth" in manifest[
        "caption_noise_note"]
    assert not {"shipped_noise", "original_noise"} & (set(result.metrics) | set(summary_metrics(load_run(run_io.out))))
