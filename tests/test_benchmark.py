"""benchmark: choices made on validation only (over the crawls), test reported with mean, 95% CI and
paired differences per seed; the reference CLIP's pairs are disjoint from the arms'."""

import math

import numpy as np
import pytest

from tldr_tasks import benchmark
from tldr_tasks.stages import evaluate

METRICS = ("mean_r1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "zero_shot_acc")


def _arm(validation, test, steps=20, samples=100):
    curve = [[steps // 2, test / 2], [steps, test]]
    return {"validation": dict.fromkeys(METRICS, validation), "test": dict.fromkeys(METRICS, test),
            "curve": {"validation": curve, "test": curve}, "steps": steps, "samples": samples}


def _report(arms):
    names = list(arms)
    # what evaluate writes: time to accuracy against the full arm of the same evaluation ({} without one)
    tta = evaluate.time_to_accuracy({n: a["curve"]["test"] for n, a in arms.items() if not n.endswith("_epochs")}, 20)
    return {"arms": arms, "noise_rate": dict.fromkeys(names, 0.1), "distinct_scenes": dict.fromkeys(names, 50),
            "noise_types": {n: {"none": 90, "mislabel": 10} for n in names}, "noise_rate_input": 0.3,
            "caption_accuracy": 0.8, "time_to_accuracy": tta, "selection": {"kept": 25}}


def _seed(shift):
    """balanced_cluster_pool wins validation; clip_score would win test; paper_uniform trains the baselines."""
    baselines = {"full": _arm(10, 20 + shift, samples=400), "random": _arm(5, 8 + shift),
                 "oracle_clean": _arm(13, 25 + shift)}
    epochs = {f"{name}_epochs": _arm(a["validation"]["mean_r1"], a["test"]["mean_r1"] - 1, steps=5)
              for name, a in baselines.items()}
    return {"paper_uniform": _report({**baselines, **epochs, "tldr": _arm(6, 9 + shift),
                                      "tldr_epochs": _arm(6, 8, steps=5)}),
            "balanced_cluster_pool": _report({"tldr": _arm(12, 18 + shift), "tldr_epochs": _arm(12, 17, steps=5)}),
            "clip_score": _report({"tldr": _arm(11, 30 + shift), "tldr_epochs": _arm(11, 29, steps=5)}),
            "semdedup": _report({"tldr": _arm(4, 7 + 2 * shift), "tldr_epochs": _arm(4, 6, steps=5)})}


def test_choice_is_made_on_validation_over_the_crawls_and_test_is_reported_with_a_ci():
    per_crawl = {"synthetic": [_seed(0), _seed(1), _seed(2)], "real_emoji": [_seed(0), _seed(1), _seed(2)]}
    chosen = benchmark.choose_on_validation(per_crawl)
    assert chosen["tldr"] == chosen["default"] == "balanced_cluster_pool"  # not clip_score, which wins on test
    result = benchmark.assemble("synthetic", per_crawl["synthetic"], [0, 1, 2], chosen)
    assert result["crawl"] == "synthetic" and result["split"] == "test" and result["seeds"] == [0, 1, 2]
    tldr = result["arms"]["tldr"]["mean_r1"]
    assert tldr["values"] == [18, 19, 20] and tldr["mean"] == 19
    assert tldr["ci95"] == pytest.approx(4.303 * 1 / math.sqrt(3), rel=1e-3)  # t(0.975, 2) * sd / sqrt(n)
    assert set(result["arms"]) >= {"full", "random", "oracle_clean", "clip_score", "semdedup", "paper_uniform",
                                   "tldr", "tldr_epochs", "full_epochs", "clip_score_epochs"}
    # paired: the same offset on every seed has no spread; semdedup's differs per seed
    assert result["paired_differences"]["tldr - full"] == {"mean": -2.0, "ci95": 0.0, "values": [-2, -2, -2]}
    assert result["paired_differences"]["tldr - clip_score"]["mean"] == -12.0
    semdedup = result["paired_differences"]["tldr - semdedup"]
    assert semdedup["values"] == [11, 10, 9] and semdedup["ci95"] > 0
    assert result["paired_differences"]["tldr_epochs - random_epochs"]["values"] == [10, 9, 8]
    assert result["steps_per_arm"]["tldr_epochs"] == 5 and result["steps_per_arm"]["tldr"] == 20
    assert result["time_to_accuracy_per_seed"]["tldr"] == [None, None, None]  # 18 + shift < 0.95 * (20 + shift)
    assert result["noise_types"]["tldr"]["mislabel"]["mean"] == 10
    table = benchmark.markdown(result)
    assert "| tldr | compute (20) | 19.0 ± 2.5 |" in table and "| balanced_cluster_pool |" not in table
    assert "tldr - full -2.0 ± 0.0 (≥ -2.0)" in table


def _curved(curve, steps=20):
    arm = _arm(1, curve[-1][1], steps)
    arm["curve"] = {"validation": curve, "test": curve}
    return arm


def test_time_to_accuracy_is_a_number_for_every_variant_that_reaches_its_seeds_full_score():
    # only the first variant's evaluation trains full; each seed's full curve sets that seed's target
    fulls = [[[10, 8.0], [20, 10.0]], [[10, 16.0], [20, 20.0]]]  # targets 0.95 * best: 9.5 and 19
    seeds = [{"paper_uniform": _report({"full": _curved(full), "random": _curved([[10, 4.0], [20, 6.0]]),
                                        "tldr": _curved([[10, 5.0], [20, 9.0]])}),
              "balanced_cluster_pool": _report({"tldr": _curved([[10, 19.0], [20, 19.0]])}),
              "clip_score": _report({"tldr": _curved([[10, 10.0], [20, 12.0]])})} for full in fulls]
    seeds[0]["balanced_cluster_pool"]["arms"]["tldr"]["validation"]["mean_r1"] = 5  # the TL;DR row
    result = benchmark.assemble("synthetic", seeds, [0, 1], benchmark.choose_on_validation({"synthetic": seeds}))
    tta = result["time_to_accuracy_per_seed"]
    # interpolated between checkpoints from R@1 0 at step 0, as a share of full's 20 steps
    assert tta["full"] == [pytest.approx((10 + 10 * 1.5 / 2) / 20), pytest.approx((10 + 10 * 3 / 4) / 20)]
    assert tta["balanced_cluster_pool"] == [pytest.approx(10 * 9.5 / 19 / 20), pytest.approx(10 / 20)]
    assert tta["tldr"] == tta["balanced_cluster_pool"]
    assert tta["clip_score"] == [pytest.approx(10 * 9.5 / 10 / 20), None]  # never reaches 19 on seed 1
    assert tta["random"] == [None, None] and tta["paper_uniform"] == [None, None]


def test_a_baseline_that_wins_validation_becomes_the_default_not_the_tldr_row():
    seeds = [_seed(0), _seed(1)]
    for seed in seeds:
        seed["clip_score"]["arms"]["tldr"]["validation"]["mean_r1"] = 50
    chosen = benchmark.choose_on_validation({"synthetic": seeds})
    assert chosen["default"] == "clip_score" and chosen["tldr"] == "balanced_cluster_pool"


def test_the_default_selection_is_paired_like_the_tldr_row():
    seeds = [_seed(0), _seed(1), _seed(2)]
    for seed in seeds:
        seed["clip_score"]["arms"]["tldr"]["validation"]["mean_r1"] = 50
    result = benchmark.assemble("synthetic", seeds, [0, 1, 2], benchmark.choose_on_validation({"synthetic": seeds}))
    paired = benchmark.default_paired(result)
    assert paired["default"] == "clip_score"
    # clip_score's test R@1 is 30 + shift, random's 8 + shift, the TL;DR row's 18 + shift
    assert paired["paired_differences"]["clip_score - random"] == {"mean": 22.0, "ci95": 0.0, "values": [22, 22, 22],
                                                                   "lower": 22.0}
    assert paired["paired_differences"]["clip_score - tldr"]["values"] == [12, 12, 12]
    # the epoch-matched rows: clip_score 29, random 7 + shift
    assert paired["paired_differences"]["clip_score_epochs - random_epochs"]["values"] == [22, 21, 20]
    assert "clip_score - clip_score" not in paired["paired_differences"]


def test_the_demo_runs_at_the_benchmarks_size_unless_given_params(tmp_path):
    from tldr_tasks.config import load_config
    from tldr_tasks.demo import demo_config

    cfg = demo_config(None, ["seed=3"])
    assert (cfg.crawl.samples, cfg.captioner.epochs, cfg.evaluate.preset) == (6000, 4, "towers-locked")
    assert cfg.embed.feature == "tower"  # what the protocol clustered on
    assert cfg.evaluate.budgets == ["compute"] and cfg.seed == 3
    assert cfg.sample == load_config(None).sample  # the shipped selection, not a demo one
    params = tmp_path / "params.yaml"
    params.write_text("crawl:\n  samples: 900\n")
    full = demo_config(str(params), [])
    assert full.crawl.samples == 900 and full.evaluate.preset == load_config(None).evaluate.preset


# reference_split(f"{i:07d}") for i in range(32), as the sha256 of the key gives it: every process, machine and
# release splits a crawl the same way
PINNED_REFERENCE = "10100000001100101111000010000100"


def test_reference_split_is_a_stable_quarter_of_the_keys(fresh_python):
    keys = [f"{i:07d}" for i in range(4000)]
    reference = np.array([benchmark.reference_split(k) for k in keys])
    assert 0.22 < reference.mean() < 0.28
    assert "".join(str(int(r)) for r in reference[:32]) == PINNED_REFERENCE
    code = ("from tldr_tasks.benchmark import reference_split\n"
            "print(''.join(str(int(reference_split(f'{i:07d}'))) for i in range(32)))")
    assert {fresh_python(code, seed) for seed in (1, 2)} == {PINNED_REFERENCE}


def test_split_crawl_writes_two_disjoint_crawls(tiny_crawl, tmp_path):
    from tldr_tasks import storage
    from tldr_tasks.data.shards import Sample, iter_shard

    benchmark.split_crawl(f"{tiny_crawl}/train", str(tmp_path / "main"), str(tmp_path / "reference"))

    def keys(folder):
        return [s.key for url in storage.expand_shards(str(folder)) for s in iter_shard(url) if isinstance(s, Sample)]

    crawl, main, reference = keys(f"{tiny_crawl}/train"), keys(tmp_path / "main"), keys(tmp_path / "reference")
    assert sorted(reference) == sorted(k for k in crawl if benchmark.reference_split(k))
    assert sorted(main) == sorted(k for k in crawl if not benchmark.reference_split(k))
    assert len(reference) > 0.15 * len(crawl) and len(main) > 0.5 * len(crawl)  # both crawls have pairs


def test_ci95_of_one_value_is_zero():
    assert benchmark.ci95([3.0]) == 0.0


def test_every_variant_gets_a_valid_config_with_its_own_settings():
    """What run_seed builds per variant: its sample settings, the reference CLIP for clip_score, and a
    cluster count scaled from the size rule where the variant asks for one."""
    from tldr_tasks.config import Config
    from tldr_tasks.stages.kmeans import cluster_count

    cfg = Config()
    for variant in benchmark.VARIANTS:
        vcfg = benchmark.variant_config(cfg, variant, 4500, ["full", "tldr"], "runs/reference_clip")
        assert all(getattr(vcfg.sample, key) == value for key, value in variant.sample.items())
        assert vcfg.evaluate.arms == ["full", "tldr"]
        assert (vcfg.sample.clip_model == "runs/reference_clip") == (variant.name == "clip_score")
        expected = round(variant.cluster_scale * cluster_count(cfg, 4500)) if variant.cluster_scale != 1 else 0
        assert vcfg.cluster.clusters == expected
    assert cfg.sample.strategy == Config().sample.strategy  # the caller's config is left as it was
