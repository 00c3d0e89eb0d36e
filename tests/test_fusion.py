"""fusion: the caption that ships, the quality gate and the run-level collapse check."""

import math

import pytest

from tldr_tasks import fusion


def _ship(original="a red circle", generated="one shape: red circle", confidence=-0.5, grounding=1.0, mode="mix",
          key="k1", collapsed=False):
    return fusion.ship_caption(key, original, generated, confidence, grounding, mode=mode, min_confidence=-1.0,
                               min_grounding=0.5, seed=0, collapsed=collapsed)


def test_modes_ship_one_decided_caption():
    assert _ship(mode="generated") == ("one shape: red circle", fusion.REPLACED)
    assert _ship(mode="concat") == ("a red circle; one shape: red circle", fusion.APPENDED)
    assert _ship(mode="original") == ("a red circle", fusion.ORIGINAL_BY_FUSION)
    assert _ship(original="", mode="original") == ("", fusion.ORIGINAL_BY_FUSION)
    # mix: one of the two per sample, the same on every call (seeded by key), about half each
    keys = [f"{i:07d}" for i in range(2000)]
    first = [_ship(key=k) for k in keys]
    assert first == [_ship(key=k) for k in keys]
    replaced = sum(reason == fusion.REPLACED for _, reason in first)
    assert 900 < replaced < 1100
    assert {text for text, _ in first} == {"a red circle", "one shape: red circle"}
    other_seed = [fusion.ship_caption(k, "a", "b", -0.1, 2.0, mode="mix", min_confidence=-1, min_grounding=0.5,
                                      seed=1, collapsed=False)[1] for k in keys]
    assert other_seed != [reason for _, reason in first]


@pytest.mark.parametrize("confidence, grounding, reason", [
    (-1.5, 1.0, fusion.ORIGINAL_LOW_CONFIDENCE),
    (float("nan"), 1.0, fusion.ORIGINAL_LOW_CONFIDENCE),
    (-0.2, 0.1, fusion.ORIGINAL_UNGROUNDED),
    (-0.2, float("nan"), fusion.ORIGINAL_UNGROUNDED),
])
def test_gate_keeps_the_original_when_the_generated_caption_is_untrustworthy(confidence, grounding, reason):
    for mode in ("mix", "generated", "concat"):
        assert _ship(confidence=confidence, grounding=grounding, mode=mode) == ("a red circle", reason)


def test_collapse_and_missing_generated_captions_ship_the_original():
    assert _ship(mode="generated", collapsed=True) == ("a red circle", fusion.ORIGINAL_COLLAPSE)
    assert _ship(mode="concat", generated=" ") == ("a red circle", fusion.ORIGINAL_NO_GENERATED)
    # an empty web caption with a trusted generated one: the generated caption is the description
    assert _ship(original="", mode="concat") == ("one shape: red circle", fusion.REPLACED)
    with pytest.raises(ValueError, match="mix, generated, concat or original"):
        _ship(mode="alternate")


def test_collapse_check_compares_entropy_with_the_originals():
    originals = [f"caption {i}" for i in range(200)]
    diverse = [f"generated {i % 150}" for i in range(200)]
    check = fusion.collapse_check(originals, diverse, min_entropy_ratio=0.5)
    assert not check["collapsed"] and check["entropy_ratio"] > 0.9
    assert check["distinct_generated"] == 150 and check["distinct_original"] == 200
    # a handful of strings for every image, one of them on 44%
    collapsed = ["the same thing"] * 88 + [f"other {i % 13}" for i in range(112)]
    check = fusion.collapse_check(originals, collapsed, min_entropy_ratio=0.5)
    assert check["collapsed"] and check["distinct_generated"] == 14
    assert check["top_generated_share"] == pytest.approx(0.44)
    assert check["entropy_original_bits"] == pytest.approx(math.log2(200), abs=1e-3)
    assert not fusion.collapse_check(originals, collapsed, min_entropy_ratio=0.0)["collapsed"]


def test_a_pair_kept_for_repair_ships_its_generated_caption_whatever_the_fusion():
    for mode in ("original", "mix", "concat", "generated"):
        assert fusion.ship_caption("k1", "a blue square", "a red circle", -0.5, 1.0, mode=mode, min_confidence=-1.0,
                                   min_grounding=0.5, seed=0, collapsed=False, repair=True) == ("a red circle",
                                                                                                fusion.REPAIRED)
    # the gate and the collapse check still hold: the original ships, with their reason
    assert fusion.ship_caption("k1", "a blue square", "a red circle", -0.5, 0.1, mode="original", min_confidence=-1.0,
                               min_grounding=0.5, seed=0, collapsed=False, repair=True) == (
        "a blue square", fusion.ORIGINAL_UNGROUNDED)
    assert fusion.ship_caption("k1", "a blue square", "a red circle", -0.5, 1.0, mode="original", min_confidence=-1.0,
                               min_grounding=0.5, seed=0, collapsed=True, repair=True) == (
        "a blue square", fusion.ORIGINAL_COLLAPSE)


def test_a_pair_the_filter_passed_with_its_generated_caption_ships_it_whatever_the_gate():
    """The filter's repair: the reference scored this generated caption as high as a passing original; the
    captioner's own gate and the collapse check do not send back the original the filter dropped."""
    for collapsed, confidence, grounding in ((False, -5.0, 0.0), (True, -0.1, 2.0)):
        assert fusion.ship_caption("k1", "a blue square", "a red circle", confidence, grounding, mode="original",
                                   min_confidence=-1.0, min_grounding=0.5, seed=0, collapsed=collapsed, repair=True,
                                   passed_filter=True) == ("a red circle", fusion.REPAIRED)
