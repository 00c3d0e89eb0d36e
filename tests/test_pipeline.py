"""The stage list is the one source of truth: dvc.yaml, the CLI and the stage modules agree with it."""

import importlib
from pathlib import Path

import pytest
import yaml

from tldr_tasks.pipeline import STAGE_NAMES, STAGES

ROOT = Path(__file__).resolve().parents[1]


def _dvc_stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_every_stage_in_order():
    names = [n for n in _dvc_stages() if n not in ("make-crawl", "report")]  # the crawl, and the page after
    assert names == list(STAGE_NAMES)


def test_dvc_stages_run_their_stage_with_its_params_and_inputs():
    dvc = _dvc_stages()
    outs = {name: stage.get("outs", []) for name, stage in dvc.items()}
    for spec in STAGES:
        stage = dvc[spec.name]
        assert stage["cmd"].startswith(f"tldr-vlp run {spec.name} "), spec.name
        assert sorted(stage.get("params", [])) == sorted(spec.params), spec.name
        assert f"tldr_tasks/stages/{spec.module}.py" in stage["deps"], spec.name
        for dep in spec.deps:  # every upstream stage's output is declared as an input
            assert any(out in stage["deps"] for out in outs[dep]), (spec.name, dep)


def test_every_stage_module_has_run_and_a_command_line(capsys):
    from tldr_tasks import cli

    for spec in STAGES:
        module = importlib.import_module(f"tldr_tasks.stages.{spec.module}")
        assert callable(module.run), spec.name
        with pytest.raises(SystemExit) as exited:  # argparse's --help prints the usage and exits 0
            cli.main(["run", spec.name, "--help"])
        usage = capsys.readouterr().out
        assert exited.value.code == 0 and f"tldr-vlp run {spec.name}" in usage, spec.name
        assert ("--shard-index" in usage) == spec.sharded, spec.name


def test_stage_list_is_importable_without_heavy_packages():
    import subprocess
    import sys

    code = ("import sys, tldr_tasks.pipeline, tldr_tasks.config; "
            "print(sorted(m for m in ('torch', 'faiss', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
