"""The whole pipeline through the real CLI: compress (and the demo) on a tiny synthetic crawl, with
real DeepSpeed, faiss, MLflow and DVC."""

import json
import os
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import webdataset as wds

from tldr_tasks import cli

TINY = ["--set", "captioner.epochs=1", "--set", "captioner.image_size=32", "--set", "captioner.batch_size=32",
        "--set", "caption.num_beams=1", "--set", "caption.max_new_tokens=12", "--set", "materialize.shard_size=20",
        "--clusters", "4", "--ratio", "0.3"]


@pytest.mark.slow
def test_compress_end_to_end(tiny_crawl, tmp_path, mlflow_store, capsys):
    out = tmp_path / "run"
    # fusion mix: generated captions would ship where the gate trusts them
    argv = ["compress", "--input", str(Path(tiny_crawl) / "train"), "--out", str(out), *TINY, "--fusion", "mix"]
    assert cli.main(argv) == 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["input_samples"] == manifest["kept"] + manifest["dropped"] + manifest["rejected"]
    assert manifest["kept"] == pytest.approx(0.3 * (manifest["input_samples"] - manifest["rejected"]), abs=4)
    # the output is readable by a stock WebDataset pipeline (what open_clip uses)
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png;jpg;webp", "txt", "json"))
    assert len(pairs) == manifest["kept"]
    assert pairs[0][0].size == (32, 32)
    # whichever way the gate decides for this captioner, every KEY.txt follows the decision recorded
    # next to it, and the manifest and the CLI count the same decisions
    gate = manifest["config"]["caption"]
    collapsed = manifest["collapse_check"]["collapsed"]
    for _, text, meta in pairs:
        original, generated = meta["original_caption"].strip(), meta["generated_caption"].strip()
        reason = meta["caption_reason"]
        trusted = (not collapsed and bool(generated) and meta["confidence"] is not None
                   and meta["confidence"] >= gate["min_confidence"] and meta["grounding"] is not None
                   and meta["grounding"] >= gate["min_grounding"])
        if collapsed:
            assert reason == "original:collapse"
        if trusted:  # mix: the generated caption, or the original where the coin says so
            assert (reason, text) in (("replaced", generated), ("original:fusion", original)), meta
        else:
            assert reason.startswith("original:") and reason != "original:fusion" and text == original, meta
    reasons = Counter(meta["caption_reason"] for _, _, meta in pairs)
    assert reasons == {reason: n for reason, n in manifest["captions"].items() if n}
    assert manifest["captions"]["appended"] == 0  # mix never appends
    printed = capsys.readouterr()
    assert f"captions: {manifest['captions']['replaced']} generated shipped" in printed.out
    assert ("COLLAPSED" in printed.out) == collapsed
    # tracked: a parent run with one nested run per stage, and the captioner registered
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parent = next(r for r in runs if "tldr.run_key" in r.data.tags)
    stages = {r.data.tags["tldr.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert stages == {"train-captioner", "embed", "kmeans", "assign", "cluster", "sample", "caption", "materialize"}
    assert parent.info.status == "FINISHED" and parent.data.metrics["kept"] == manifest["kept"]
    versions = client.search_model_versions("name = 'tldr-captioner'")
    assert [v.run_id for v in versions] == [parent.info.run_id]
    # a rerun skips every finished part; other parameters on the same --out are refused
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--ratio", "0.5"]) == 2


@pytest.mark.slow
def test_the_filters_repair_ships_the_captions_it_scored(tiny_crawl, tmp_path, mlflow_store):
    """compress with sample.misaligned=repair behind the default clip_score filter: the pairs it passed with a
    generated caption ship exactly that caption, which the reference scored at least as high as the lowest passing
    original, and the counts add up from the selection to the manifest."""
    import pyarrow.parquet as pq

    out = tmp_path / "run"
    argv = ["compress", "--input", str(Path(tiny_crawl) / "train"), "--out", str(out), *TINY,
            "--set", "sample.misaligned=repair", "--set", "sample.filter_share=0.8", "--ratio", "0.6"]
    assert cli.main(argv) == 0
    stats = json.loads((out / "sample" / "stats.json").read_text())
    scored = pq.read_table(out / "sample" / "alignment.parquet").to_pandas().set_index("key")
    recaptioned = pq.read_table(out / "sample" / "recaptioned.parquet").to_pandas().set_index("key")
    # the tiny crawl has no two identical images: the filter passes the best-scored, every other pair is captioned
    passing = scored["clip_score"].nlargest(stats["filter_passed"] - stats["repaired"])
    assert set(recaptioned.index) == set(scored.index) - set(passing.index) and stats["recaptioned"] > 0
    repaired = recaptioned[recaptioned["clip_score_generated"] >= passing.min()]
    assert stats["repaired"] == len(repaired) > 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "txt", "json"))
    shipped_repaired = {key: text for key, text, meta in pairs if meta["caption_reason"] == "repaired"}
    assert len(shipped_repaired) == stats["repair"] == manifest["captions"]["repaired"] > 0
    assert set(shipped_repaired) <= set(repaired.index)
    assert all(text == recaptioned.loc[key, "generated"].strip() for key, text in shipped_repaired.items())
    assert all(meta["caption_reason"] in ("repaired", "original:fusion") for _, _, meta in pairs)


@pytest.mark.slow
def test_demo_writes_the_report(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo_dir = tmp_path / "demo"
    argv = ["demo", "--out", str(demo_dir), "--samples", "240", "--set", "crawl.eval_samples=60",
            "--set", "crawl.image_size=32", "--set", "crawl.prototypes=40", "--set", "evaluate.epochs=1",
            *TINY]
    assert cli.main(argv) == 0
    report = json.loads((demo_dir / "report.json").read_text())
    for key in ("input_samples", "output_samples", "ratio", "arms", "time_to_accuracy", "captions",
                "caption_accuracy", "noise_rate_input", "noise_rate_output", "seconds", "mlflow_run_id"):
        assert key in report, key
    assert set(report["arms"]) >= {"full", "tldr", "random"}
    assert set(report["arms"]["tldr"]["test"]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert 0.2 < report["noise_rate_input"] < 0.45  # the crawl's 30% noise, measured from ground truth
    assert report["output_samples"] == round(0.3 * report["input_samples"])
    # DVC versions of the raw and the compressed data, pushed to the local remote
    assert len(report["dvc_versions"]["crawl"]) >= 32 and (demo_dir / "crawl.dvc").exists()
    # the parent run records the crawl the demo made (compress alone logs no crawl.* params)
    params = mlflow.MlflowClient().get_run(report["mlflow_run_id"]).data.params
    assert (params["crawl.samples"], params["crawl.image_size"], params["crawl.seed"]) == ("240", "32", "0")
    assert any(os.scandir(demo_dir / "dvc-remote"))
