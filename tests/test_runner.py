"""The stage executor: params records (refuse other parameters, skip with the same), the captioner
reuse policy, and the CPU count torch is given."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tldr_tasks import captioners
from tldr_tasks.config import ConfigError, load_config
from tldr_tasks.contract import StageIO, _cgroup_quota
from tldr_tasks.pipeline import stage_params, upstream
from tldr_tasks.runner import PARAMS_RECORD, check_stage_params, input_fingerprint

TLDR_VLP = str(Path(sys.executable).with_name("tldr-vlp"))


def fake_cluster_output(out: Path, crawl: str, captioner: str) -> None:
    """What `train-captioner` and `cluster` leave for `sample`: a captioner (`captioner`, copied), an assignment per
    input sample (4 clusters), and its done marker."""
    shutil.copytree(captioner, out / "captioner")
    keys = [f"{i:07d}" for i in range(200)]
    rng = np.random.default_rng(0)
    (out / "cluster").mkdir(parents=True)
    pq.write_table(pa.table({"key": keys, "shard": ["00000"] * 100 + ["00001"] * 100,
                             "cluster": rng.integers(0, 4, 200), "distance": rng.random(200).astype(np.float32),
                             "loss": rng.random(200).astype(np.float32)}), out / "cluster" / "assignments.parquet")
    (out / "cluster" / "stats.json").write_text("{}")


def run_cli(stage: str, crawl: str, out: Path, mlflow_store: Path, *extra: str) -> subprocess.CompletedProcess:
    # fake_cluster_output leaves no embed parts: a strategy that reads only the assignments, and no filter
    extra = ("--set", "sample.strategy=balanced", "--set", "sample.filter=none", *extra) if stage == "sample" else extra
    env = {"PATH": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_store}/mlflow.db",
           "TLDR_MLFLOW_EXPERIMENT": "tests", "OMP_NUM_THREADS": "1", "HOME": str(mlflow_store),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}  # a checkout on PYTHONPATH is the code under test
    return subprocess.run([TLDR_VLP, "run", stage, "--input", f"{crawl}/train", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_run_with_changed_params_on_an_existing_output_is_refused(tiny_crawl, mlflow_store, random_captioner):
    out = mlflow_store / "run"
    fake_cluster_output(out, tiny_crawl, random_captioner)
    first = run_cli("sample", tiny_crawl, out, mlflow_store)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.splitlines()[-1])["skipped"] is False
    record = json.loads((out / "sample" / PARAMS_RECORD).read_text())
    assert record["params"]["sample.ratio"] == 0.25 and "cluster.niter" in record["params"]  # upstream too
    selected = (out / "sample" / "selected.parquet").stat().st_mtime_ns

    same = run_cli("sample", tiny_crawl, out, mlflow_store, "--set", "sample.ratio=0.25")
    assert same.returncode == 0 and json.loads(same.stdout.splitlines()[-1])["skipped"] is True

    changed = run_cli("sample", tiny_crawl, out, mlflow_store, "--set", "sample.ratio=0.3", "--set", "seed=1")
    assert changed.returncode == 2
    assert "sample.ratio: 0.25 -> 0.3" in changed.stderr and "seed: 0 -> 1" in changed.stderr
    assert "sample.strategy" not in changed.stderr  # only what changed is named
    assert (out / "sample" / "selected.parquet").stat().st_mtime_ns == selected  # nothing was rewritten


def test_upstream_params_are_part_of_a_stage_record(tmp_path):
    assert upstream("materialize") == ["train-captioner", "embed", "kmeans", "assign", "cluster", "sample", "caption",
                                      "materialize"]
    params = stage_params(load_config(None, []), "sample")
    assert {"seed", "captioner.epochs", "embed.feature", "cluster.clusters", "sample.ratio"} <= set(params)
    assert not any(k.startswith(("materialize.", "evaluate.")) for k in params)
    # the filter's repair captions in the sample stage: how captions are made, not how they ship
    assert {k for k in params if k.startswith("caption.")} == {"caption.num_beams", "caption.min_new_tokens",
                                                              "caption.max_new_tokens", "caption.batch_size"}
    io = StageIO(input="unused", out=str(tmp_path))
    check_stage_params(load_config(None, []), io, "sample")  # first use: recorded
    # a new captioner upstream makes the sample stale too
    with pytest.raises(ConfigError, match=r"captioner.epochs: 6 -> 2"):
        check_stage_params(load_config(None, ["captioner.epochs=2"]), io, "sample")
    check_stage_params(load_config(None, ["evaluate.epochs=1"]), io, "sample")  # not upstream: accepted


def test_embed_and_a_reused_captioner_need_no_record(tmp_path):
    io = StageIO(input="unused", out=str(tmp_path / "out"), captioner=str(tmp_path / "theirs"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "COMPLETE").write_text('{"version": "v"}')
    check_stage_params(load_config(None, ["captioner.epochs=1"]), io, "train-captioner")
    check_stage_params(load_config(None, ["captioner.epochs=3"]), io, "train-captioner")  # reused as it is
    check_stage_params(load_config(None, ["embed.batch_size=8"]), io, "embed")
    assert not (tmp_path / "theirs" / PARAMS_RECORD).exists() and not (tmp_path / "out").exists()


def fake_captioner(root: Path, cfg, shards: int, version: str, complete: bool = True, suffix: str = "") -> str:
    url = captioners.folder(str(root), cfg, version) + suffix
    Path(url).mkdir(parents=True)
    (Path(url) / PARAMS_RECORD).write_text(json.dumps({"stage": "train-captioner",
                                                       "params": stage_params(cfg, "train-captioner"),
                                                       "input": {"version": version, "shards": shards}}))
    if complete:
        (Path(url) / "COMPLETE").write_text('{"version": "w"}')
    return url


def test_captioner_policy(tmp_path):
    cfg, other = load_config(None, []), load_config(None, ["captioner.epochs=2"])
    assert captioners.params_key(cfg) != captioners.params_key(other)
    assert captioners.params_key(cfg) == captioners.params_key(load_config(None, ["sample.ratio=0.5"]))
    first = captioners.choose(str(tmp_path), cfg, "v10", 10)
    assert first["url"] == captioners.folder(str(tmp_path), cfg, "v10") and "no captioner" in first["reason"]

    old = fake_captioner(tmp_path, cfg, 10, "v10")
    fake_captioner(tmp_path, cfg, 40, "v40", complete=False)  # a training still running: not a candidate
    assert captioners.choose(str(tmp_path), cfg, "v15", 15)["url"] == old  # grew 50%: reused
    grown = captioners.choose(str(tmp_path), cfg, "v16", 16)
    assert grown["url"] == captioners.folder(str(tmp_path), cfg, "v16") and "grew from 10 to 16" in grown["reason"]
    assert captioners.choose(str(tmp_path), cfg, "v16", 16, max_growth=1.0)["url"] == old
    assert captioners.choose(str(tmp_path), cfg, "v11", 11, retrain=True)["url"].endswith("-v11")
    # a retrain on a crawl whose captioner is finished trains a new one beside it, and that one is the newest
    again = captioners.choose(str(tmp_path), cfg, "v10", 10, retrain=True)
    assert again["url"] == f"{old}-r2" and again["reason"] == "retrain requested"
    retrained = fake_captioner(tmp_path, cfg, 10, "v10", suffix="-r2")
    assert retrained == again["url"] and captioners.choose(str(tmp_path), cfg, "v15", 15)["url"] == retrained
    assert captioners.choose(str(tmp_path), cfg, "v10", 10, retrain=True)["url"] == f"{old}-r3"
    # other captioner parameters never reuse it
    assert captioners.choose(str(tmp_path), other, "v10", 10)["url"] == captioners.folder(str(tmp_path), other, "v10")
    newer = fake_captioner(tmp_path, cfg, 16, "v16")
    assert captioners.choose(str(tmp_path), cfg, "v17", 17)["url"] == newer  # the newest compatible one


def test_input_fingerprint_is_path_independent(tiny_crawl, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(Path(tiny_crawl) / "train", copy)
    here = input_fingerprint(f"{tiny_crawl}/train")
    assert here == input_fingerprint(str(copy)) and here["shards"] == 2
    assert input_fingerprint(str(copy), "dvc-md5")["version"] == "dvc-md5"


def test_cpu_quota_from_cgroups(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    (tmp_path / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    assert _cgroup_quota(str(tmp_path), str(proc)) is None  # no cpu.max anywhere: unlimited
    (tmp_path / "kubepods" / "pod1" / "ctr" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs on the pod
    assert _cgroup_quota(str(tmp_path), str(proc)) == 2
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cgroup_quota(str(v1), str(tmp_path / "missing")) == 3
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert _cgroup_quota(str(v1), str(tmp_path / "missing")) is None


def test_torch_threads_follow_the_cpu_limit(monkeypatch):
    from tldr_tasks import contract
    from tldr_tasks.models import clip

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(contract, "_cgroup_quota", lambda: 1)
    assert clip.available_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert clip.available_cpus() == 3


@pytest.mark.parametrize("mode, policy", [(None, "PASSIVE"), ("owned", None), ("shared", "PASSIVE")])
def test_openmp_waits_passively_only_where_stages_share_the_cores(monkeypatch, mode, policy):
    from tldr_tasks import runner

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if mode:
        monkeypatch.setenv("TLDR_CPUS", mode)
    else:
        monkeypatch.delenv("TLDR_CPUS", raising=False)
    runner.thread_defaults()
    assert os.environ.get("OMP_WAIT_POLICY") == policy  # None: OpenMP's own short spin
    assert os.environ["OMP_NUM_THREADS"] == str(runner.cpu_limit())
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runner.thread_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # a caller's choice wins
    monkeypatch.setenv("TLDR_CPUS", "mine")
    with pytest.raises(ConfigError, match="TLDR_CPUS='mine' is not one of owned, shared"):
        runner.thread_defaults()


@pytest.mark.parametrize("entry", ["execute_stage", "compress"])
def test_a_run_in_this_process_gives_the_callers_thread_settings_back(tiny_crawl, tmp_path, monkeypatch, entry):
    """Its stages run under OpenMP's defaults; the process that goes on (a later evaluation sizes torch's threads
    from OMP_NUM_THREADS) keeps its own, a refused run's too."""
    from tldr_tasks import preflight, runner

    for name in runner.THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TLDR_CPUS", raising=False)
    seen = {}

    def refuse(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in runner.THREAD_VARS})
        raise ConfigError("refused")

    monkeypatch.setattr(preflight, "check", refuse)
    io = StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="refused"):
        getattr(runner, entry)(load_config(), io, *(["sample"] if entry == "execute_stage" else []))
    assert seen == {"OMP_NUM_THREADS": str(runner.cpu_limit()), "OMP_WAIT_POLICY": "PASSIVE"}
    assert [name for name in runner.THREAD_VARS if name in os.environ] == []


def test_parquet_helpers_round_trip_atomically(tmp_path):
    from tldr_tasks import storage

    table = pa.table({"key": ["b", "a"], "cluster": [1, 0]})
    storage.write_parquet(str(tmp_path / "x" / "t.parquet"), table)
    storage.write_parquet(str(tmp_path / "y.parquet"), table)
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["t.parquet"]  # no temporary file left
    assert storage.read_parquet(str(tmp_path / "x" / "t.parquet")).equals(table)
    assert storage.read_parquet(str(tmp_path / "x" / "t.parquet"), columns=["key"]).column_names == ["key"]
    assert (tmp_path / "x" / "t.parquet").read_bytes() == (tmp_path / "y.parquet").read_bytes()


def test_a_rerun_on_other_input_content_is_refused(tmp_path):
    from tldr_tasks.runner import check_run_config

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for stem in ("00000", "00001"):
        (crawl / f"{stem}.tar").write_bytes(stem.encode() * 100)
    cfg, io = load_config(), StageIO(input=str(crawl), out=str(tmp_path / "out"))
    check_run_config(cfg, io)
    check_run_config(cfg, io)  # same parameters, same content: a resume
    # a new crawl re-lands 00000.tar: same name and size, other bytes
    (crawl / "00000.tar").write_bytes(b"X" * 500)
    with pytest.raises(ConfigError, match="other input content") as refused:
        check_run_config(cfg, io)
    assert "use a new --out" in str(refused.value) and "00000-" in str(refused.value)


def test_stage_timings_reach_the_summary_metrics(tmp_path):
    from tldr_tasks.runner import record_timing
    from tldr_tasks.runs import load_run, summary_metrics

    io = StageIO(input="in", out=str(tmp_path / "run"))
    (tmp_path / "run" / "shards").mkdir(parents=True)
    manifest = {"input_samples": 200, "kept": 50, "dropped": 150, "rejected": 0, "ratio": 0.25,
                "captions": {"replaced": 10, "original:low_confidence": 40},
                "collapse_check": {"collapsed": False}, "alignment": {"alignment_input_mean": 0.1,
                                                                       "alignment_kept_mean": 0.4}}
    (tmp_path / "run" / "shards" / "manifest.json").write_text(json.dumps(manifest))
    record_timing(io, "embed", {"shard_index": 0, "num_shards": 2}, 3.0)  # parallel parts: their work adds up
    record_timing(io, "embed", {"shard_index": 1, "num_shards": 2}, 1.0)
    record_timing(io, "caption", {}, 5.0)
    metrics = summary_metrics(load_run(io.out))
    assert metrics["seconds.embed"] == 4.0 and metrics["samples_per_second.embed"] == 50.0
    assert metrics["seconds.caption"] == 5.0 and metrics["samples_per_second.caption"] == 10.0  # kept samples
    assert metrics["captions_original_low_confidence"] == 40 and metrics["caption_collapsed"] == 0
    assert metrics["alignment_input_mean"] == 0.1 and metrics["alignment_kept_mean"] == 0.4


RETRAIN_TINY = ["captioner.epochs=1", "captioner.folds=1", "captioner.image_size=32", "captioner.batch_size=32",
                "caption.num_beams=1", "caption.max_new_tokens=8", "materialize.shard_size=20", "cluster.clusters=4",
                "sample.ratio=0.3"]


@pytest.mark.slow
def test_compress_retrain_captioner_trains_and_registers_a_new_version(tiny_crawl, mlflow_store, capsys):
    """Retrain means retrain under `compress` too (issue 26): with the crawl and the parameters unchanged,
    `--retrain-captioner` beside a finished `--captioner` trains a new one in `DIR-r2` and registers a new
    version; a rerun of that run folder continues with it, training nothing; a retrain in a run folder that
    already holds its captioner is refused before any work."""
    import mlflow

    from tldr_tasks import cli, tracking

    def compress(out: str, *flags: str) -> dict:
        args = ["compress", "--input", f"{tiny_crawl}/train", "--out", str(mlflow_store / out)]
        assert cli.main([*args, *flags, *(f for o in RETRAIN_TINY for f in ("--set", o))]) == 0, capsys.readouterr().err
        run_id = re.search(r"MLflow run (\w+)", capsys.readouterr().out).group(1)
        return mlflow.MlflowClient().get_run(run_id)

    first = compress("run1")
    trained = mlflow_store / "run1" / "captioner"
    assert first.data.tags["tldr.captioner_version"] == "1"
    reused = compress("run2", "--captioner", str(trained))
    assert reused.data.tags["tldr.captioner_version"] == "1" and "seconds.train-captioner" not in reused.data.metrics

    retrained = compress("run3", "--captioner", str(trained), "--retrain-captioner")
    assert (mlflow_store / "run1" / "captioner-r2" / "COMPLETE").exists()
    assert retrained.data.tags["tldr.captioner_version"] == "2"
    assert retrained.data.tags["tldr.captioner_choice"] == "retrain requested"
    assert retrained.data.metrics["seconds.train-captioner"] > 0
    version = mlflow.MlflowClient().get_model_version(tracking.CAPTIONER_MODEL_NAME, "2")
    assert version.run_id == retrained.info.run_id
    assert version.tags["captioner_folder"] == str(mlflow_store / "run1" / "captioner-r2")
    manifest = json.loads((mlflow_store / "run3" / "shards" / "manifest.json").read_text())
    assert manifest["captioner_version"] == version.tags["captioner_version"]

    # a rerun of the retrained run folder (say after a kill) keeps its captioner: no third training
    again = compress("run3", "--captioner", str(trained), "--retrain-captioner")
    assert again.data.tags["tldr.captioner_version"] == "2" and not (mlflow_store / "run1" / "captioner-r3").exists()
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{tracking.CAPTIONER_MODEL_NAME}'")) == 2

    args = ["compress", "--input", f"{tiny_crawl}/train", "--out", str(mlflow_store / "run1"), "--retrain-captioner"]
    runs_before = len(mlflow.MlflowClient().search_runs([first.info.experiment_id]))
    assert cli.main([*args, *(f for o in RETRAIN_TINY for f in ("--set", o))]) == 2
    assert "already holds a trained captioner" in capsys.readouterr().err
    assert len(mlflow.MlflowClient().search_runs([first.info.experiment_id])) == runs_before  # refused before any run
