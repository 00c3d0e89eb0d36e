"""Crash and resume: every stage is started through the real `tldr-vlp run <stage>` CLI, killed with
SIGKILL mid-run, and rerun (one test parametrised over the stages, plus train-captioner and
evaluate, whose units of work are checkpoints and trained arms). Finished parts must be skipped
(same inode and mtime), no partial file may appear under a final name, the done marker must come
last, and the final outputs must be byte-identical to an uninterrupted run of the same stage in another folder.

The kill has to land between two parts, and a part of the tiny crawl takes ~0.1 s. So the part-writing
stages run with a test hook (`sitecustomize.py` put on PYTHONPATH, active only when
TLDR_TEST_PUBLISH_DELAY is set) that sleeps after every atomically published file: the stage
code is unchanged, it just stops after its first finished part and the SIGKILL arrives there, however
loaded the machine is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.pipeline import STAGES, get_stage
from tldr_tasks.runner import PARAMS_RECORD
from tldr_tasks.stages import embed

# The test_end_to_end tiny config, plus a checkpoint every 2 optimizer steps (12 steps in all) and
# small output shards, so train-captioner and materialize have several parts to be killed between.
OVERRIDES = ["captioner.epochs=2", "captioner.image_size=32", "captioner.batch_size=32",
             "captioner.checkpoint_every=2", "caption.num_beams=1", "caption.max_new_tokens=12",
             "materialize.shard_size=10", "cluster.clusters=4", "sample.ratio=0.3"]
SET_ARGS = [arg for item in OVERRIDES for arg in ("--set", item)]
# Written by an in-process DeepSpeed run into os.environ; a child inheriting them would try to
# rendezvous on this process's port.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DELAY_S = 3600  # sleep after each published file: the stage waits there for its SIGKILL
TLDR_VLP = str(Path(sys.executable).with_name("tldr-vlp"))
STAGE_DIRS = {"train-captioner": "captioner", "embed": "embed", "kmeans": "kmeans", "assign": "assign",
              "cluster": "cluster", "sample": "sample",
              "caption": "caption", "materialize": "shards"}

SITECUSTOMIZE = '''"""Test hook of tests/test_resume.py: sleep after every published output whose file name
matches TLDR_TEST_PUBLISH_MATCH (a glob; default every file)."""
import os

if os.environ.get("TLDR_TEST_PUBLISH_DELAY"):
    import posixpath
    import time
    from contextlib import contextmanager
    from fnmatch import fnmatch

    from tldr_tasks import storage

    _delay = float(os.environ["TLDR_TEST_PUBLISH_DELAY"])
    _match = os.environ.get("TLDR_TEST_PUBLISH_MATCH", "*")
    _write, _staging = storage.write_bytes_atomic, storage.local_staging

    def _pause(url):
        if fnmatch(posixpath.basename(url), _match):
            time.sleep(_delay)

    def write_bytes_atomic(url, data):
        _write(url, data)
        _pause(url)

    @contextmanager
    def local_staging(url, suffix=""):
        with _staging(url, suffix) as local:
            yield local
        _pause(url)

    storage.write_bytes_atomic, storage.local_staging = write_bytes_atomic, local_staging
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Module folder: one MLflow store for every run here, and the sitecustomize hook."""
    root = tmp_path_factory.mktemp("resume")
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return root


@pytest.fixture(scope="module")
def reference(tiny_crawl, workspace) -> Path:
    """An uninterrupted run of every stage (the expected outputs, and the upstream outputs each test copies):
    through the same command, in the same environment, as the killed and resumed runs, so with the same torch
    thread count (a trained captioner's bytes depend on it), whatever this process's is."""
    out = workspace / "reference"
    for spec in STAGES:
        if not spec.optional:
            summary = run_to_end(_command(spec.name, tiny_crawl, out), _env(workspace, delay=False), workspace)
            assert not summary["skipped"]
    return out


def _env(workspace: Path, delay: bool, match: str = "*") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "TLDR_RUN_KEY"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{workspace}/mlflow.db", OMP_NUM_THREADS="1",
               TLDR_MLFLOW_EXPERIMENT="resume-tests")
    if delay:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(workspace / "hook"), env.get("PYTHONPATH")) if p)
        env["TLDR_TEST_PUBLISH_DELAY"] = str(DELAY_S)
        env["TLDR_TEST_PUBLISH_MATCH"] = match
    return env


def _command(stage: str, crawl: str, out: Path, *extra: str) -> list[str]:
    return [TLDR_VLP, "run", stage, "--input", str(Path(crawl) / "train"), "--out", str(out), *SET_ARGS, *extra]


def start_and_kill(command: list[str], env: dict, ready: Callable[[], bool], log: Path, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds; fail if it ended first."""
    with open(log, "w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"{command[2]} exited ({process.returncode}) before it could be killed:\n"
                                + log.read_text()[-3000:])
                if time.monotonic() > deadline:
                    pytest.fail(f"{command[2]} did not reach the kill point in {timeout} s:\n"
                                + log.read_text()[-3000:])
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()  # no-op when already dead; never leave a child behind a failed test
            process.wait()
    assert process.returncode == -signal.SIGKILL


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def run_to_end(command: list[str], env: dict, workdir: Path) -> dict:
    """Run `command` to completion; returns its --result-json summary."""
    result_json = workdir / f"result-{time.monotonic_ns()}.json"
    done = subprocess.run([*command, "--result-json", str(result_json)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(result_json.read_text())


def copy_upstream(reference: Path, out: Path, stage: str) -> None:
    """Copy the reference outputs of every stage before `stage` into a fresh run folder."""
    out.mkdir(parents=True)
    for spec in STAGES:
        if spec.name == stage:
            return
        shutil.copytree(reference / STAGE_DIRS[spec.name], out / STAGE_DIRS[spec.name])


def files(folder: Path) -> dict[str, Path]:
    """Every file below `folder` by relative path."""
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def stamps(paths) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def assert_no_partial_files(folder: Path) -> None:
    leftovers = [name for name in files(folder) if ".tmp-" in name or name.endswith(".tmp")]
    assert not leftovers, f"temporary files left under {folder}: {leftovers}"


def assert_same_bytes(actual: Path, expected: Path, ignore: tuple[str, ...] = ()) -> None:
    """The same files with the same bytes (except `ignore`d names, compared by the caller)."""
    got = {k: v for k, v in files(actual).items() if Path(k).name not in ignore}
    want = {k: v for k, v in files(expected).items() if Path(k).name not in ignore}
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name].read_bytes() != want[name].read_bytes()]
    assert not differ, f"differ from the uninterrupted run: {differ}"


def plant_partial_write(final: Path, reference_file: Path) -> Path:
    """What a worker killed inside a write leaves: half the bytes under a temporary name."""
    data = reference_file.read_bytes()
    leftover = final.with_name(final.name + ".tmp-0123456789abcdef")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(data[: len(data) // 2])
    return leftover


def rerun_in_process_is_skipped(stage: str, out: Path, crawl: str) -> None:
    """A third run over the finished folder does nothing and says so."""
    from tldr_tasks.runner import load_stage_module

    before = stamps(files(out / STAGE_DIRS[stage]).values())
    io = StageIO(input=str(Path(crawl) / "train"), out=str(out))
    assert load_stage_module(stage).run(load_config(None, OVERRIDES), io).skipped
    assert stamps(files(out / STAGE_DIRS[stage]).values()) == before


def fold0_steps(tiny_crawl: str) -> int:
    """Optimizer steps of fold 0's captioner (2 epochs of batch 32 over the captioned samples outside fold 0):
    with two folds it trains after fold 1's, whose export a resumed stage keeps."""
    from tldr_tasks.data import stream

    index, _ = stream.index_shards(StageIO(input=str(Path(tiny_crawl) / "train"), out="").input_shards(), 0, 2, 0)
    return 2 * (index.total // 32)


@pytest.mark.slow
def test_train_captioner_resumes_from_its_last_deepspeed_checkpoint(tiny_crawl, reference, workspace, tmp_path):
    """Killed inside the second fold's training (fold 0, after fold 1's export): the rerun keeps fold 1's export
    and resumes fold 0 from its checkpoint."""
    out = tmp_path / "run"
    ckpt = out / "captioner" / "checkpoints"
    command = _command("train-captioner", tiny_crawl, out)
    # `latest` is created before its tag is written: kill once it names a checkpoint, not while it is empty
    start_and_kill(command, _env(workspace, delay=False), lambda: _read_or_empty(ckpt / "latest").startswith("step"),
                   tmp_path / "killed.log")

    # killed mid-training: a checkpoint, no export, no done marker
    tag = (ckpt / "latest").read_text().strip()
    assert tag.startswith("step") and (ckpt / tag).is_dir()
    step, total = int(tag[len("step"):]), fold0_steps(tiny_crawl)
    assert 2 <= step < total
    assert not (out / "captioner" / "COMPLETE").exists() and not (out / "captioner" / "model.safetensors").exists()
    fold1 = stamps(sorted((out / "captioner" / "fold1").iterdir()))  # exported before the kill

    summary = run_to_end(command, _env(workspace, delay=False), tmp_path)
    assert not summary["skipped"]
    assert summary["metrics"]["steps_resumed"] == step and summary["metrics"]["steps"] == total
    assert "fold1_steps" not in summary["metrics"]  # not trained again
    assert stamps(sorted((out / "captioner" / "fold1").iterdir())) == fold1
    assert not ckpt.exists()  # checkpoints are dropped once the export is complete
    # the resumed run ends in the very weights (and export) of the uninterrupted one
    assert_same_bytes(out / "captioner", reference / "captioner")
    rerun_in_process_is_skipped("train-captioner", out, tiny_crawl)


@pytest.mark.slow
def test_train_captioner_survives_a_kill_inside_the_latest_file_write(tiny_crawl, reference, tmp_path, monkeypatch):
    """DeepSpeed rewrites `checkpoints/latest` in place; killed inside that write it is empty. The
    rerun then trains from the start (nothing valid to resume) and still ends in the same weights."""
    from tldr_tasks.stages import train_captioner

    for name in DIST_VARS:  # set-then-delete records the original state, so it is restored
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    io = StageIO(input=str(Path(tiny_crawl) / "train"), out=str(tmp_path / "run"))
    ckpt = Path(train_captioner.checkpoint_dir(io.captioner_dir))
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("")
    torch.set_num_threads(1)  # the reference's (OMP_NUM_THREADS=1); conftest gives this process's count back
    result = train_captioner.run(load_config(None, OVERRIDES), io)
    assert result.metrics["steps_resumed"] == 0 and result.metrics["steps"] == fold0_steps(tiny_crawl)
    # the stage alone (no executor): the same export, without the executor's params record
    assert_same_bytes(tmp_path / "run" / "captioner", reference / "captioner", ignore=(PARAMS_RECORD,))


@dataclass(frozen=True)
class Case:
    """How one stage resumes: what its resumed run reports, and which files hold timings or paths."""

    stage: str
    part: str  # glob of the outputs the stage is killed between (below its folder)
    per_part: bool  # resumes part by part: the finished part is kept, only the rest is written
    resumed: dict  # metrics of the run that finishes the killed one
    compared_apart: tuple[str, ...] = ()  # compared without their timings and paths


# train-captioner (DeepSpeed checkpoints) and evaluate (cached arms) have tests of their own below.
CASES = (
    # the defaults' filter: the tower features' parts come first (one per shard), then embed's
    Case("embed", "*.npz", True, {"tower_feature_shards": 1, "shards_reused": 0, "shards_embedded": 2}),
    Case("kmeans", "*.parquet", False, {"samples": 200}, ("stats.json",)),
    Case("assign", "*.parquet", True, {"shards_skipped": 1, "shards_done": 1}),
    Case("cluster", "*.parquet", False, {"samples": 200}, ("stats.json",)),
    Case("sample", "*.parquet", False, {"kept": 60}),
    Case("caption", "*.parquet", True, {"shards_skipped": 1, "shards_done": 1}),
    Case("materialize", "*.tar", True, {"kept": 60, "output_shards": 6}, ("manifest.json",)),
)


def without_volatile(path: Path) -> dict:
    """A stats or manifest JSON without timings and the run's own paths."""
    return {k: v for k, v in json.loads(path.read_text()).items()
            if not (k.endswith("_s") or k in ("seconds", "input", "output_shards"))}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.stage)
def test_stage_killed_after_its_first_output_resumes_to_the_same_bytes(case, tiny_crawl, reference, workspace,
                                                                        tmp_path):
    spec = get_stage(case.stage)
    out = tmp_path / "run"
    copy_upstream(reference, out, case.stage)
    folder, expected = out / STAGE_DIRS[case.stage], reference / STAGE_DIRS[case.stage]
    command = _command(case.stage, tiny_crawl, out, *(("--shard-index", "0", "--num-shards", "1")
                                                      if spec.sharded else ()))
    start_and_kill(command, _env(workspace, delay=True, match=case.part), lambda: any(folder.rglob(case.part)),
                   tmp_path / "killed.log")

    done = sorted(folder.rglob(case.part))
    assert len(done) == 1  # killed right after its first part was published
    assert_no_partial_files(folder)
    if spec.done_marker:
        assert not (folder / spec.done_marker).exists()  # the done marker comes last
    first = done[0].relative_to(folder)
    assert done[0].read_bytes() == (expected / first).read_bytes()  # complete under its final name
    before = stamps(done)
    leftover = None
    if case.per_part:  # beside the finished part, what a kill inside the next part's write leaves
        second = next(p for p in sorted(expected.rglob(case.part)) if p.relative_to(expected) != first)
        leftover = plant_partial_write(folder / second.relative_to(expected), second)

    summary = run_to_end(command, _env(workspace, delay=False), tmp_path)
    assert not summary["skipped"]
    assert {k: summary["metrics"][k] for k in case.resumed} == case.resumed
    assert not any(".tmp-" in url for url in summary["outputs"])
    if leftover:
        assert stamps(done) == before  # the finished part was not rewritten
        leftover.unlink()
    assert_same_bytes(folder, expected, ignore=case.compared_apart)
    for name in case.compared_apart:
        assert without_volatile(folder / name) == without_volatile(expected / name)
    rerun_in_process_is_skipped(case.stage, out, tiny_crawl)


def test_embed_parts_are_byte_identical_for_the_same_content(tmp_path):
    """np.savez stamps the wall-clock time into the zip; parts must not depend on when they were written."""
    part = embed.EmbedPart(keys=np.array(["0001", "0002"]), features=np.ones((2, 4), np.float16),
                           loss=np.array([1.5, np.nan], np.float32), reject_keys=np.array(["0003"]),
                           reject_reasons=np.array(["undecodable image"]), meta={"shard": "00000", "samples": 2})
    embed.save_part(str(tmp_path / "a.npz"), part)
    time.sleep(2.1)  # zip timestamps have a 2 s resolution
    embed.save_part(str(tmp_path / "b.npz"), part)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = embed.load_part(str(tmp_path / "b.npz"))
    assert loaded.keys.tolist() == ["0001", "0002"] and loaded.meta == part.meta
    np.testing.assert_array_equal(loaded.loss, part.loss)


EVAL_ARGS = ["--eval-input", "EVAL", "--set", "evaluate.preset=micro", "--set", "evaluate.epochs=1",
             "--set", "evaluate.batch_size=32"]


def _without_timings(report):
    """The report without its wall-clock times (any `*_seconds` key, at any depth)."""
    if isinstance(report, dict):
        return {k: _without_timings(v) for k, v in report.items() if not k.endswith("seconds")}
    if isinstance(report, list):
        return [_without_timings(v) for v in report]
    return report


@pytest.mark.slow
def test_evaluate_reuses_finished_arms_after_a_kill(tiny_crawl, reference, workspace, tmp_path):
    args = [a.replace("EVAL", str(Path(tiny_crawl) / "eval")) for a in EVAL_ARGS]
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(reference, uninterrupted)
    run_to_end(_command("evaluate", tiny_crawl, uninterrupted, *args), _env(workspace, delay=False), tmp_path)

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    arms = out / "evaluate" / "arms"
    command = _command("evaluate", tiny_crawl, out, *args)
    start_and_kill(command, _env(workspace, delay=True, match="*-*-*.json"),  # arms/<arm>-<steps>-<digest>.json
                   lambda: arms.exists() and any(arms.glob("*.json")),
                   tmp_path / "killed.log")
    done = sorted(arms.glob("*.json"))
    assert len(done) == 1 and not (out / "evaluate" / "report.json").exists()
    assert_no_partial_files(out / "evaluate")
    before = stamps(done)

    run_to_end(command, _env(workspace, delay=False), tmp_path)
    assert stamps(done) == before  # the finished arm was not trained again
    report = json.loads((out / "evaluate" / "report.json").read_text())
    expected = json.loads((uninterrupted / "evaluate" / "report.json").read_text())
    assert _without_timings(report) == _without_timings(expected)
