"""`tldr-vlp compare`: run folders and MLflow runs side by side, differences marked, also as a page."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from test_report import run_dir  # noqa: F401  (fixture: a finished, evaluated run folder)

from tldr_tasks import cli


def _rows(text: str) -> dict[str, list[str]]:
    """Terminal table -> {row name: [marker, values...]}."""
    rows = {}
    for line in text.splitlines()[1:]:
        marker, cells = line[:2].strip(), line[2:].split()
        rows[cells[0]] = [marker, *cells[1:]]
    return rows


def test_compare_marks_what_differs_between_run_folders_and_mlflow_runs(run_dir, tmp_path, capsys,  # noqa: F811
                                                                      mlflow_store):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    manifest = json.loads((other / "shards" / "manifest.json").read_text())
    manifest.update(kept=3, dropped=9, ratio=0.25)
    manifest["config"]["sample"]["ratio"] = 0.25
    (other / "shards" / "manifest.json").write_text(json.dumps(manifest))
    with mlflow.start_run(run_name="scheduled") as tracked:
        mlflow.log_params({"sample.ratio": "0.5", "seed": "0"})
        mlflow.log_metrics({"materialize.kept": 6.0, "seconds.embed": 1.5})

    page = tmp_path / "compare.html"
    assert cli.main(["compare", str(run_dir), str(other), tracked.info.run_id, "--html", str(page)]) == 0
    rows = _rows(capsys.readouterr().out.split("written:")[0])
    assert rows["sample.ratio"] == ["*", "0.5", "0.25", "0.5"]
    assert rows["seed"] == ["", "0", "0", "0"]
    assert rows["kept"] == ["*", "6", "3", "-"]
    assert rows["input_samples"] == ["*", "12", "12", "-"]  # absent from the MLflow run: differs
    assert rows["materialize.kept"] == ["*", "-", "-", "6"]
    assert "eval.test.tldr.mean_r1" in rows and "eval.test.tldr.i2t_r5" not in rows  # key metrics only
    html = page.read_text()
    assert "<tr class='diff'><th>sample.ratio</th><td>0.5</td><td>0.25</td><td>0.5</td></tr>" in html
    assert "<tr class='same'><th>seed</th>" in html and "scheduled" in html

    assert cli.main(["compare", str(run_dir), str(other), "--all"]) == 0
    assert "eval.test.tldr.i2t_r5" in _rows(capsys.readouterr().out)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(tmp_path / "no-such-run")])
    assert exit_info.value.code == 2 and "neither a run folder" in capsys.readouterr().err


def test_compare_finds_airflows_store_and_creates_nothing_when_a_run_is_unknown(tmp_path, monkeypatch, capsys):
    home = tmp_path / "airflow_home"  # scripts/airflow-local.sh's default AIRFLOW_HOME, under the repo root
    home.mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
    run = client.create_run(client.create_experiment("tldr-vlp"), run_name="compress airflow")
    client.log_param(run.info.run_id, "sample.ratio", "0.25")
    client.set_terminated(run.info.run_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AIRFLOW_HOME")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", run.info.run_id]) == 0  # ./airflow_home/mlflow.db
    assert _rows(capsys.readouterr().out)["sample.ratio"] == ["", "0.25"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    assert cli.main(["compare", run.info.run_id]) == 0  # $AIRFLOW_HOME/mlflow.db
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "0" * 32])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "point MLFLOW_TRACKING_URI at the store" in error
    assert f"sqlite:///{elsewhere}/mlflow.db or sqlite:///{home}/mlflow.db" in error
    assert list(elsewhere.iterdir()) == []  # no empty mlflow.db left behind
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}/other.db")
    with pytest.raises(SystemExit):
        cli.main(["compare", run.info.run_id])
    assert list(elsewhere.iterdir()) == []
