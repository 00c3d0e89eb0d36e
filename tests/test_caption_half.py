"""benchmarks/caption_half.py's rule: a caption variant replaces the original captions only if it ships less noise
than its input everywhere and beats them on validation with the paired interval's lower bound above 0."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def caption_half(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import caption_half

    return caption_half


def _records(scores: dict[str, list[float]], noise: dict[str, float], crawls=("a", "b")) -> dict:
    """Per crawl, one record per seed: every row's validation score (`scores[row][seed]`, full at 10) and noise."""
    rows = ("original", "generated", "concat", "mix", "repair", "full")
    return {c: [{"seed": s, "noise_input": 0.3,
                 "rows": {r: {"validation": 10.0 if r == "full" else scores.get(r, scores["original"])[s],
                              "noise": noise.get(r, 0.2)} for r in rows}} for s in range(3)] for c in crawls}


def test_a_better_candidate_that_ships_less_noise_replaces_the_originals(caption_half):
    result = caption_half.decide(_records({"original": [5.0, 5.2, 4.9], "mix": [6.0, 6.1, 6.0],
                                           "repair": [5.5, 5.6, 5.5]}, {}))
    assert result["chosen"] == "mix"  # the higher of the two whose lower bounds clear 0
    assert result["candidates"]["repair"]["minus_original"]["lower"] > 0
    assert result["candidates"]["mix"]["share_of_full"]["mean"] == pytest.approx(0.6033, abs=1e-3)


def test_noise_above_the_input_or_a_gain_inside_the_noise_keeps_the_originals(caption_half):
    noisy = caption_half.decide(_records({"original": [5.0, 5.2, 4.9], "mix": [6.0, 6.1, 6.0]}, {"mix": 0.31}))
    assert noisy["chosen"] == "original" and not noisy["candidates"]["mix"]["below_input_every_crawl_and_seed"]
    unsure = caption_half.decide(_records({"original": [5.0, 5.2, 4.9], "mix": [6.0, 4.5, 5.0]}, {}))
    assert unsure["chosen"] == "original" and unsure["candidates"]["mix"]["minus_original"]["lower"] < 0
