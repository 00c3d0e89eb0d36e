"""Config: defaults, params.yaml, overrides, and refusals that say what to change."""

from pathlib import Path

import pytest

from tldr_tasks.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_holds_the_built_in_defaults():
    assert load_config(ROOT / "params.yaml").to_dict() == Config().to_dict()


def test_overrides_are_typed():
    cfg = load_config(None, ["sample.ratio=0.3", "cluster.clusters=7", "seed=3", "evaluate.arms=full,tldr"])
    assert (cfg.sample.ratio, cfg.cluster.clusters, cfg.seed) == (0.3, 7, 3)
    assert cfg.evaluate.arms == ["full", "tldr"]
    assert cfg.hash() != Config().hash()


@pytest.mark.parametrize("override, message", [
    ("sample.ratio=0", r"sample.ratio=0.0 must be in \(0, 1\]"),
    ("sample.ratio=1.5", r"sample.ratio=1.5 must be in \(0, 1\]"),
    ("sample.strategy=best", "sample.strategy='best' is not one of uniform"),
    ("embed.feature=pixels", "embed.feature='pixels' is not one of"),
    ("caption.fusion=merge", "caption.fusion='merge' is not one of"),
    ("cluster.clusters=-1", "cluster.clusters=-1 must be >= 1, or 0 for the size rule"),
    ("cluster.clusters=many", "cluster.clusters='many': expected int"),
    ("sample.ratoi=0.2", "unknown parameter sample.ratoi"),
    ("sampel.ratio=0.2", "unknown params section 'sampel'"),
    ("ratio", "must look like section.key=value"),
])
def test_bad_parameters_are_refused_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_params_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
