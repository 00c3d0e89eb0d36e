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


def test_the_readme_table_reports_every_row_on_test_and_the_rule_s_outcome(caption_half):
    records = _records({"original": [5.0, 5.2, 4.9], "mix": [6.0, 6.1, 6.0]}, {"mix": 0.31})
    for crawl, recs in records.items():
        for r in recs:
            r.update(metric="mean_r1", seconds=60, machine="vm",
                     repair={"recaptioned": 90, "repaired": 30, "repair": 10, "kept": 100, "filter_passed": 70},
                     captions_shipped={"fusions": {"replaced": 20, "original": 80}})
            for row in caption_half.ROWS:
                values = r["rows"].setdefault(row, {"validation": 4.0, "noise": 0.3})
                values["test"] = values["validation"] + (1.0 if crawl == "b" else 0.0)
    result = {"rule": caption_half.decide(records), "summary": caption_half.summary(records)}
    table = caption_half.readme_table(result)
    lines = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:]
             for line in table.splitlines() if line.startswith("| ")}
    assert set(caption_half.ROWS) <= set(lines)
    assert lines["mix"] == ["6.0 ± 0.1 (31.0%)", "7.0 ± 0.1 (31.0%)"]  # each crawl's test mean, its noise
    assert lines["input noise"] == ["30.0%", "30.0%"]
    assert "mix +0.100 (lower bound +0.075; ships more noise than its input)" in table
    assert "Chosen: **original** (no change)" in table
