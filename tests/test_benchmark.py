"""benchmark: choices made on validation only, test reported with mean and 95% CI over seeds."""

import math

import pytest

from tldr_tasks import benchmark


def _arm(validation, test, curve=None):
    curve = curve or [[10, test / 2], [20, test]]
    return {"validation": {m: validation for m in benchmark.REPORTED_METRICS},
            "test": {m: test for m in benchmark.REPORTED_METRICS},
            "curve": {"validation": curve, "test": curve}}


def _seed(shift, gate=0.5):
    """Two variants; `better` wins on validation, `worse` would win on test."""
    arms = {"full": _arm(10, 20 + shift, [[10, 10.0], [20, 20.0 + shift]]), "random": _arm(5, 8 + shift),
            "random_generated": _arm(6, 9 + shift)}
    fusion = {f"tldr_{m}": _arm(7, 15 + shift) for m in ("original", "mix", "generated", "concat")}
    better = {**fusion, "tldr_mix": _arm(12, 18 + shift, [[10, 19.5 + shift], [20, 18.0 + shift]])}
    worse = {**fusion, "tldr_generated": _arm(11, 30 + shift)}
    extra = {"noise_rate": dict.fromkeys(["full", "random", "random_generated", "tldr_mix", "tldr_generated",
                                          "tldr_original"], 0.1),
             "distinct_scenes": dict.fromkeys(["full", "random", "random_generated", "tldr_mix", "tldr_generated",
                                               "tldr_original"], 50),
             "noise_rate_input": 0.3, "caption_accuracy": 0.8, "caption_accuracy_head": 0.9,
             "caption_accuracy_tail": 0.7, "manifest": {"captions": {"replaced": 1}, "collapse_check": {}}}
    return {"_gate": {"calibration": [], "min_grounding": gate},
            "paper_uniform": {"arms": {**arms, **fusion}, **extra},
            "better": {"arms": better, **extra}, "worse": {"arms": worse, **extra}}


def test_choice_is_made_on_validation_and_test_is_reported_with_a_ci():
    per_seed = [_seed(0), _seed(1), _seed(2, gate=math.inf)]
    chosen = benchmark.choose_on_validation(per_seed)
    assert (chosen["variant"], chosen["fusion"]) == ("better", "mix")  # not "worse", which wins on test
    assert chosen["min_grounding_per_seed"] == [0.5, 0.5, None]
    result = benchmark.assemble(per_seed, [0, 1, 2], chosen)
    tldr = result["arms"]["tldr"]["mean_r1"]
    assert tldr["values"] == [18, 19, 20] and tldr["mean"] == 19
    assert tldr["ci95"] == pytest.approx(4.303 * 1 / math.sqrt(3), rel=1e-3)  # t(0.975, 2) * sd / sqrt(n)
    assert result["arms"]["full"]["mean_r1"]["mean"] == 21
    assert result["split"] == "test" and result["seeds"] == [0, 1, 2]
    # time to accuracy: tldr reaches 95% of full's best (0.95 * 21) at its first curve point
    assert result["time_to_accuracy"]["tldr"] == 0.5 and result["time_to_accuracy"]["random"] is None
    assert "| tldr | 19.0 ± 2.5 |" in benchmark.markdown(result)
    # the same offset on every seed: the paired difference has no spread
    assert result["paired_differences"]["tldr - full"] == {"mean": -2.0, "ci95": 0.0, "values": [-2, -2, -2]}


def test_gate_threshold_is_the_lowest_precise_enough():
    rows = [{"min_grounding": 0.0, "precision": 0.7}, {"min_grounding": 0.5, "precision": 0.92},
            {"min_grounding": 1.0, "precision": 0.95}]
    assert benchmark.gate_threshold(rows) == 0.5
    assert benchmark.gate_threshold([{"min_grounding": 0.0, "precision": 0.5},
                                     {"min_grounding": 2.0, "precision": None}]) == math.inf
    assert benchmark.ci95([3.0]) == 0.0


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    result = benchmark.assemble([_seed(0), _seed(1)], [0, 1], benchmark.choose_on_validation([_seed(0), _seed(1)]))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{benchmark.README_START}\nold table\n{benchmark.README_END}\noutro\n")
    benchmark.update_readme(str(readme), result)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert benchmark.markdown(result) in text
    readme.write_text("no block")
    with pytest.raises(ValueError, match="benchmark:start"):
        benchmark.update_readme(str(readme), result)
