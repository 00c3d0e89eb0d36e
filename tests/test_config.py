"""Config: defaults, params.yaml, overrides, and refusals that say what to change."""

from pathlib import Path

import pytest

from tldr_tasks.config import RANGES, Config, ConfigError, flat_numbers, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_holds_the_built_in_defaults():
    assert load_config(ROOT / "params.yaml").to_dict() == Config().to_dict()


def test_overrides_are_typed():
    cfg = load_config(None, ["sample.ratio=0.3", "cluster.clusters=7", "seed=3", "evaluate.arms=full,tldr"])
    assert (cfg.sample.ratio, cfg.cluster.clusters, cfg.seed) == (0.3, 7, 3)
    assert cfg.evaluate.arms == ["full", "tldr"]
    assert cfg.hash() != Config().hash()


@pytest.mark.parametrize("override, message", [
    ("sample.ratio=0", r"sample.ratio=0.0 is out of range \(use a value in \(0, 1\]\)"),
    ("sample.ratio=1.5", r"sample.ratio=1.5 is out of range \(use a value in \(0, 1\]\)"),
    ("sample.strategy=best", r"sample.strategy='best' is not known \(use one of uniform"),
    ("embed.feature=pixels", "embed.feature='pixels' is not known"),
    ("caption.fusion=merge", "caption.fusion='merge' is not known"),
    ("cluster.clusters=-1", r"cluster.clusters=-1 is out of range \(use a value >= 0\)"),
    ("cluster.clusters=many", r"cluster.clusters='many' is not valid \(give a whole number, e.g. 3\)"),
    ("seed=abc", "seed='abc' is not valid"),
    ("seed=true", "seed=True is not valid"),
    ("sample.dedup_images=maybe", r"sample.dedup_images='maybe' is not valid \(give true or false\)"),
    ("evaluate.curve_points=[0.5,a]", "evaluate.curve_points='a' is not valid"),
    ("cluster.clusters=[1", "the value is not valid YAML"),
    ("embed.batch_size=0", r"embed.batch_size=0 is out of range \(use a value >= 1\)"),
    ("evaluate.lr=nan", "evaluate.lr=nan is out of range"),
    ("captioner.preset=huge", r"captioner.preset='huge' is not known \(use one of base, pretrained, tiny\)"),
    ("captioner.image_size=33", r"captioner.image_size=33 does not fit preset 'tiny' \(use a multiple of 16"),
    ("evaluate.preset=huge",
     r"evaluate.preset='huge' is not known \(use one of base, micro, small, tiny, towers-lit, towers-locked\)"),
    ("evaluate.arms=full,tldr_fancy", "unknown arm 'tldr_fancy'"),
    ("caption.min_new_tokens=40", "caption.min_new_tokens=40 is above caption.max_new_tokens=30"),
    ("captioner=3", "params section captioner is 3, not a mapping"),
    ("sample.ratoi=0.2", "unknown parameter sample.ratoi"),
    ("sampel.ratio=0.2", "unknown params section 'sampel'"),
    ("ratio", "must look like section.key=value"),
])
def test_bad_parameters_are_refused_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_numeric_parameter_has_a_range():
    assert set(flat_numbers(Config())) == set(RANGES)
    assert all(RANGES[name][0] <= value <= RANGES[name][1] for name, value in flat_numbers(Config()).items())


def test_missing_params_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
