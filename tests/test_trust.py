"""The trust summary's facts and verdict (tldr_tasks/trust.py), on hand-made sets."""

from __future__ import annotations

import numpy as np
import pytest

from tldr_tasks import trust


def _facts(mask, **overrides):
    n = len(mask)
    columns = {"loss": np.linspace(1.0, 3.0, n), "alignment": np.zeros(n), "cluster": np.arange(n) % 4,
               "digest": np.asarray([f"d{i}" for i in range(n)]), "near": 0, "noisy": None}
    columns.update(overrides)
    finite = np.sort(columns["loss"][np.isfinite(columns["loss"])])
    return trust.set_facts(np.asarray(mask), columns["loss"], finite, columns["alignment"], columns["cluster"],
                           columns["digest"], columns["near"], columns["noisy"])


def test_facts_count_copies_misaligned_pairs_clusters_and_noise_of_the_set_only():
    n = 8
    mask = np.array([True, True, True, True, False, False, False, False])
    digest = np.asarray(["a", "a", "b", "c", "c", "c", "c", "d"])  # one copy inside the set, three outside
    alignment = np.array([-3.0, 0.0, -np.inf, 1.0, -5.0, -5.0, -5.0, -5.0])  # empty caption: misaligned
    noisy = np.array([True, False, False, False, True, True, True, True])
    facts = _facts(mask, digest=digest, alignment=alignment, noisy=noisy, near=1)
    assert facts["samples"] == 4
    assert facts["exact_duplicate_share"] == 1 / 4
    assert facts["misaligned_share"] == 2 / 4
    assert facts["near_duplicate_share"] == 1 / 4
    assert facts["noise"] == 1 / 4
    assert (facts["clusters_covered"], facts["clusters_share"]) == (4, 1.0)
    losses = np.linspace(1.0, 3.0, n)
    assert facts["caption_loss_median"] == pytest.approx(np.median(losses[:4]))
    # the median of the four lowest losses sits below the input's middle
    assert facts["caption_loss_percentile"] == 100 * 2 / n
    assert "noise" not in _facts(mask)  # no ground truth: no noise fact at all


def test_verdict_says_plainly_when_the_kept_set_is_no_better_than_random():
    same = {"samples": 400, "misaligned_share": 0.30, "exact_duplicate_share": 0.10, "near_duplicate_share": 0.2,
            "clusters_covered": 40, "noise": 0.3}
    plain = trust.verdict(dict(same), dict(same))
    assert plain["no_better_than_random"] and plain["better"] == []
    assert plain["text"].startswith("The kept set is no better than a random subset of the same size")
    worse = trust.verdict({**same, "exact_duplicate_share": 0.3}, same)
    assert worse["no_better_than_random"] and "worse on exact duplicate images" in worse["text"]
    # a gap inside what another random draw of 400 would vary by is no difference
    assert trust.verdict({**same, "misaligned_share": 0.29}, same)["no_better_than_random"]
    better = trust.verdict({**same, "misaligned_share": 0.05, "noise": 0.06}, same)
    assert not better["no_better_than_random"]
    assert better["better"] == ["likely misaligned pairs", "noisy captions (ground truth)"]
    assert better["text"].startswith("Better than a random subset of the same size on likely misaligned pairs")


def test_one_metric_per_fact():
    sets = {name: {"samples": 10, "misaligned_share": share, "caption_loss_median": None}
            for name, share in (("input", 0.3), ("kept", 0.1), ("random", 0.3))}
    metrics = trust.metrics({"sets": sets, "verdict": {"no_better_than_random": False}})
    assert metrics == {"trust.input.samples": 10.0, "trust.kept.samples": 10.0, "trust.random.samples": 10.0,
                       "trust.input.misaligned_share": 0.3, "trust.kept.misaligned_share": 0.1,
                       "trust.random.misaligned_share": 0.3, "trust.kept_no_better_than_random": 0.0}
    assert trust.metrics(None) == {}


def test_the_random_reference_has_the_kept_size_and_follows_the_seed():
    a, b = trust.random_subset(100, 30, 0), trust.random_subset(100, 30, 1)
    assert a.sum() == b.sum() == 30 and (a != b).any()
    assert (trust.random_subset(100, 30, 0) == a).all()
