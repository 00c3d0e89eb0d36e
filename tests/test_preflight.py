"""Bad input is refused before any work: one `error: <what> (<what to change>)` line, exit code 2, no
traceback, nothing written to --out; the same check in compress, `tldr-vlp run` and Airflow's plan."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tldr_tasks import cli, content, preflight
from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.runner import check_run_config

TLDR_VLP = str(Path(sys.executable).with_name("tldr-vlp"))
ONE_LINE = re.compile(r"^error: .+ \(.+\)$")


@pytest.fixture(scope="module")
def places(tiny_crawl, tmp_path_factory) -> dict[str, str]:
    """Bad places beside the tiny crawl: a regular file, a folder without shards, a folder whose only
    `.tar` is a folder, a params file that is not YAML."""
    root = tmp_path_factory.mktemp("places")
    (root / "file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "unreadable" / "00000.tar").mkdir(parents=True)
    (root / "broken.yaml").write_text("sample: {ratio: [0.3\n")
    return {"crawl": f"{tiny_crawl}/train", "eval": f"{tiny_crawl}/eval", "file": str(root / "file"),
            "empty": str(root / "empty"), "unreadable": str(root / "unreadable"), "params": str(root / "broken.yaml")}


# (command, arguments, what the error names); {crawl}, {eval}, {file}, ... are the places above.
BAD = [
    ("compress", ["--set", "seed=abc"], "seed='abc' is not valid (give a whole number"),
    ("compress", ["--set", "cluster.clusters=[1"], "not valid YAML"),
    ("compress", ["--set", "captioner.preset=huge"],
     "captioner.preset='huge' is not known (use one of base, pretrained, tiny)"),
    ("compress", ["--set", "captioner.image_size=33"], "captioner.image_size=33 does not fit preset 'tiny'"),
    ("compress", ["--eval", "--eval-input", "{eval}", "--set", "evaluate.preset=huge"], "evaluate.preset='huge'"),
    ("compress", ["--set", "embed.batch_size=0"], "embed.batch_size=0 is out of range (use a value >= 1)"),
    ("compress", ["--set", "caption.batch_size=0"], "caption.batch_size=0 is out of range"),
    ("compress", ["--set", "evaluate.batch_size=-1"], "evaluate.batch_size=-1 is out of range"),
    ("compress", ["--set", "captioner.lr=0"], "captioner.lr=0.0 is out of range (use a value > 0)"),
    ("compress", ["--set", "cluster.niter=0"], "cluster.niter=0 is out of range"),
    ("compress", ["--ratio", "0"], "sample.ratio=0.0 is out of range (use a value in (0, 1])"),
    ("compress", ["--strategy", "best"], "sample.strategy='best' is not known"),
    ("compress", ["--clusters", "100000"], "is more than the 200 samples"),
    ("compress", ["--set", "sample.dedup_images=maybe"], "give true or false"),
    # the crawl's own score chosen, but no `similarity` in the tiny crawl's KEY.json: refused before train-captioner
    ("compress", ["--strategy", "clip_score", "--filter", "none", "--set", "sample.clip_model=similarity"],
     "no numeric `similarity`"),
    ("run", ["sample", "--set", "sample.strategy=clip_score", "--set", "sample.filter=none", "--set",
             "sample.clip_model=similarity"],
     "no numeric `similarity`"),
    ("compress", ["--set", "nosuch.key=1"], "unknown params section 'nosuch'"),
    ("compress", ["--set", "captioner.nope=1"], "unknown parameter captioner.nope"),
    ("compress", ["--set", "caption.min_new_tokens=40"], "caption.min_new_tokens=40 is above"),
    ("compress", ["--set", "evaluate.arms=full,tldr_fancy"], "unknown arm 'tldr_fancy'"),
    ("compress", ["--params", "{params}"], "is not valid YAML"),
    ("compress", ["--eval"], "pass --eval-input"),
    ("compress", ["--eval", "--eval-input", "{empty}/missing"], "check --eval-input"),
    ("compress", ["--input", "{empty}/{{00000..00003}}.tar"], "input shard not found"),
    ("compress", ["--input", "{empty}"], "no .tar shards found"),
    ("compress", ["--input", "{unreadable}"], "none of the 1 shards at --input"),
    ("compress", ["--out", "{file}/run"], "is below the file"),
    ("compress", ["--out", "{file}"], "is a file, not a folder"),
    ("compress", ["--input"], "expected one argument"),
    ("run", ["sample"], "stage sample reads the output of train-captioner, cluster"),
    ("run", ["caption"], "stage caption reads the output of train-captioner, sample"),
    ("run", ["cluster"], "stage cluster reads the output of kmeans"),
    ("run", ["evaluate", "--eval-input", "{eval}"], "stage evaluate reads the output of materialize"),
    ("run", ["evaluate"], "pass --eval-input"),
    ("run", ["embed", "--set", "embed.feature=pixels"], "embed.feature='pixels' is not known"),
    ("run", ["embed", "--out", "{file}/run"], "is below the file"),
    ("run", ["cluster", "--shard-index", "1"], "unrecognized arguments: --shard-index"),
    ("run", ["embed", "--shard-index", "2", "--num-shards", "2"], "--shard-index 2 is not in [0, --num-shards 2)"),
    ("run", ["nosuch"], "tldr-vlp run needs a stage, got 'nosuch'"),
]


def command_line(command: str, args: list[str], places: dict, where: Path) -> list[str]:
    """The argv of one case: --input, and --out, --captioner and --embed-cache below `where`, unless the case
    gives its own."""
    args = [a.format(**places) for a in args]
    head = [command, *args[:1]] if command == "run" else [command]
    rest = args[1:] if command == "run" else args
    defaults = [] if "--input" in rest else ["--input", places["crawl"]]
    for flag in ("--out", "--captioner", "--embed-cache"):
        defaults += [] if flag in rest else [flag, str(where / flag.removeprefix("--"))]
    return head + defaults + rest


@pytest.mark.parametrize("command, args, message", BAD, ids=[f"{c}-{' '.join(a)}" for c, a, _ in BAD])
def test_bad_input_is_refused_before_any_work(places, mlflow_store, tmp_path, capsys, command, args, message):
    assert cli.main(command_line(command, args, places, tmp_path)) == 2
    err = capsys.readouterr().err
    assert ONE_LINE.match(err.strip()), err
    assert message.format(**places) in err and "Traceback" not in err
    # nothing written: no --out, --captioner or --embed-cache, no MLflow store (so no run in it)
    assert list(tmp_path.iterdir()) == [] and Path(places["file"]).read_text() == "not a folder"


@pytest.mark.parametrize("command, args", [
    ("compress", ["--set", "seed=abc"]),
    ("run", ["sample"]),
    ("compress", ["--out", "{file}/run"]),
    ("run", ["embed", "--input", "{unreadable}"]),
])
def test_the_entry_point_prints_one_line_and_exits_2(places, tmp_path, command, args):
    done = subprocess.run([TLDR_VLP, *command_line(command, args, places, tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ONE_LINE.match(done.stderr.strip()), done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("terminal", [True, False])
def test_an_unexpected_error_says_where_its_traceback_is(places, tmp_path, capsys, monkeypatch, terminal):
    """At a terminal: one line naming a file with the traceback; under Airflow or in a pod (stderr is
    a log): the traceback, then that line."""
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(preflight, "count_input_samples", broken)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert cli.main(["compress", "--input", places["crawl"], "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    last = re.fullmatch(r"error: unexpected RuntimeError: disk on fire \(the traceback is (.+); please report it\)",
                        err.strip().splitlines()[-1])
    assert last, err
    if terminal:
        assert err.strip() == last[0] and "disk on fire" in Path(last[1].removeprefix("in ")).read_text()
    else:
        assert last[1] == "above" and err.startswith("Traceback") and "in broken" in err


def test_an_unreadable_shard_among_readable_ones_is_no_refusal(places, tmp_path):
    """The stages reject it with its reason; the input's record names it unreadable instead of raising."""
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    shutil.copy(Path(places["crawl"]) / "00000.tar", crawl / "00000.tar")
    (crawl / "00001.tar").mkdir()
    io = StageIO(input=str(crawl), out=str(tmp_path / "out"))
    preflight.check(load_config(), io)
    assert preflight.unreadable(str(crawl / "00001.tar"))
    check_run_config(load_config(), io)
    recorded = (tmp_path / "out" / "config.json").read_text()
    assert f'"00001-{content.UNREADABLE}"' in recorded and '"00000-' in recorded


def test_a_stage_whose_inputs_are_done_passes(places, tmp_path):
    io = StageIO(input=places["crawl"], out=str(tmp_path / "out"))
    assert preflight.missing_upstream("sample", io) == ["train-captioner", "cluster"]
    (tmp_path / "out" / "cluster").mkdir(parents=True)
    (tmp_path / "out" / "cluster" / "stats.json").write_text("{}")
    assert preflight.missing_upstream("sample", io) == ["train-captioner"]
    (tmp_path / "out" / "captioner").mkdir(parents=True)
    (tmp_path / "out" / "captioner" / "COMPLETE").write_text("{}")
    preflight.check(load_config(), io, stage="sample")
    assert preflight.missing_upstream("materialize", io) == ["sample"]


def test_a_rerun_with_other_parameters_is_refused_the_same_way(places, tmp_path, capsys):
    out = tmp_path / "out"
    check_run_config(load_config(), StageIO(input=places["crawl"], out=str(out)))  # what a first run records
    recorded = (out / "config.json").read_text()
    assert cli.main(["compress", "--input", places["crawl"], "--out", str(out), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert ONE_LINE.match(err.strip()) and "sections changed: sample" in err, err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == recorded
