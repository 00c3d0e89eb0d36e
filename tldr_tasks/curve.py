"""The ratio curve: how far a crawl can be compressed before a model notices, and `sample.ratio: auto`.

The sample stage runs it when `sample.curve` is on or `sample.ratio` is `auto` (config.SampleConfig):

1. `carve`: a validation split, the `holdout_share` of the crawl's keys (at most `holdout_max`) with the
   smallest salted sha256: the same keys on every rerun, shard layout and worker count. The selection never
   sees them (the sample stage takes them out before any score is computed) and no head trains on them.
2. `ratio_curve`: the selection rule at every `curve_ratios` (shares of the rest; 1.0 is the whole rest),
   each scored by the cheap proxy: the locked pretrained-towers heads (scoring.REFERENCE_PRESET, as
   clip_score's reference trains them: scoring.train_reference, epochs of the subset's own data) trained on
   the subset's cached tower features, `curve_seeds` seeds; the score is the mean of image->text and
   text->image R@1 on the validation split, a hit being any caption equal to the pair's own (a crawl repeats
   captions). Mean and 95% Student-t interval over the seeds per ratio.
3. `choose_ratio`: auto's choice, the smallest ratio whose interval's lower bound is at least
   (1 - auto_tolerance) times the whole rest's mean score; 1.0 when none is.

    holdout = carve(keys, cfg.sample)                               # bool mask over keys
    curve = ratio_curve(cfg, io, keys[~holdout], keys[holdout], select)   # select(ratio) -> keep mask
    plot(curve, "runs/r1/sample/curve.png")

Memory: the crawl's cached tower features (scoring's cache below the embed folder, float32 [N, 1280]) and
one subset's copy at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import numpy as np

from tldr_tasks import storage
from tldr_tasks.config import AUTO, MIN_HOLDOUT, Config, ConfigError, SampleConfig
from tldr_tasks.contract import StageIO

# R@1: it agreed with the benchmark's evaluation model more often than R@10 (auto's promise held on 16 of 20
# protocol crawl-seeds against 12, and on 7 of 8 fresh ones against 5: benchmarks/results/proxy_variants.json)
CURVE_K = 1


def holdout_count(samples: int, s: SampleConfig) -> int:
    """Pairs carved from a crawl of `samples`: round(holdout_share * samples), at most holdout_max."""
    return min(s.holdout_max, int(math.floor(s.holdout_share * samples + 0.5)))


def check_holdout(samples: int, s: SampleConfig) -> None:
    """Refuse the curve (and so `auto`) on a crawl whose carved split would hold fewer than MIN_HOLDOUT pairs,
    naming what to change."""
    carved = holdout_count(samples, s)
    if not s.curve_on or carved >= MIN_HOLDOUT:
        return
    if s.holdout_max < MIN_HOLDOUT:
        change = f"raise sample.holdout_max to {MIN_HOLDOUT}"
    elif holdout_count(samples, dataclasses.replace(s, holdout_share=0.5)) >= MIN_HOLDOUT:
        change = f"raise sample.holdout_share to {math.ceil(1000 * MIN_HOLDOUT / samples) / 1000:g}"
    else:
        change = f"use a crawl of at least {2 * MIN_HOLDOUT} samples"
    asked, instead = (("sample.ratio=auto", "set a ratio, e.g. --ratio 0.25") if s.ratio == AUTO
                      else ("sample.curve=true", "set sample.curve=false"))
    raise ConfigError(f"{asked} needs a validation split of at least {MIN_HOLDOUT} pairs, and "
                      f"sample.holdout_share={s.holdout_share} of {samples} samples carves {carved} ({change}, or "
                      f"{instead})")


def holdout_rank(key: str) -> int:
    """A key's place in the carving order: its salted sha256 (independent of the folds' and other key splits)."""
    return int.from_bytes(hashlib.sha256(f"holdout:{key}".encode()).digest()[:8], "big")


def carve(keys: np.ndarray, s: SampleConfig) -> np.ndarray:
    """Boolean mask of the validation split among `keys` (distinct): the holdout_count keys of smallest rank."""
    ranks = np.array([holdout_rank(str(k)) for k in keys], dtype=np.uint64)
    mask = np.zeros(len(keys), dtype=bool)
    mask[np.argsort(ranks, kind="stable")[: holdout_count(len(keys), s)]] = True
    return mask


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean (a point for one value)."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2 or np.std(values) == 0:
        return mean, mean, mean
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def choose_ratio(points: list[dict], tolerance: float) -> float:
    """The smallest ratio whose interval's low end is at least (1 - tolerance) x the 1.0 point's mean; else 1.0."""
    full = next(p for p in points if p["ratio"] == 1.0)["mean"]
    for point in sorted(points, key=lambda p: p["ratio"]):
        if point["low"] >= (1 - tolerance) * full:
            return point["ratio"]
    return 1.0


def validation_score(model, features: np.ndarray, captions: list[str]) -> float:
    """Mean of image->text and text->image R@CURVE_K (percent) on the validation pairs, captions as groups."""
    import torch

    from tldr_tasks.models import clip

    with torch.no_grad():
        image, text = clip.embed_images(model, features), clip.embed_texts(model, None, captions)
    metrics = clip.retrieval_metrics(image, text, captions, captions, ks=(CURVE_K,))
    return (metrics[f"i2t_r{CURVE_K}"] + metrics[f"t2i_r{CURVE_K}"]) / 2


def ratio_curve(cfg: Config, io: StageIO, keys: np.ndarray, holdout_keys: np.ndarray,
                select: Callable[[float], np.ndarray]) -> dict:
    """The curve over the selectable `keys` (key order) against the validation pairs `holdout_keys`.

    Args:
        select: the keep mask over `keys` of the configured rule at a ratio (sample.keep_mask).

    Returns:
        {"metric", "holdout", "seeds", "tolerance", "points": [{"ratio", "kept", "scores", "mean", "low",
        "high"}, ...] by ratio, and with ratio auto "chosen_ratio"}.
    """
    from tldr_tasks.models import clip
    from tldr_tasks.models.towers_clip import cached_features
    from tldr_tasks.scoring import REFERENCE_PRESET, feature_rows, train_reference

    s = cfg.sample
    crawl_keys, features, captions, _ = cached_features(io.input_shards(), clip.load_preset(REFERENCE_PRESET),
                                                        io.embed_dir, "input")
    rows = feature_rows(crawl_keys, keys)
    has_text = np.array([bool(captions[r].strip()) for r in rows])
    held = [r for r in feature_rows(crawl_keys, holdout_keys) if captions[r].strip()]  # an empty caption: no query
    held_captions = [captions[r] for r in held]
    held_features = features[held]
    points = []
    for ratio in sorted(s.curve_ratios):
        train = rows[select(ratio) & has_text]
        if len(train) < 2:
            raise ConfigError(f"sample.curve_ratios: {ratio} keeps {len(train)} captioned pairs of {len(keys)}, too "
                              "few to train on (drop that ratio, or raise it)")
        subset, subset_captions = features[train], [captions[r] for r in train]  # the one subset held at a time
        scores = [validation_score(train_reference(subset, subset_captions, dataclasses.replace(cfg, seed=cfg.seed + i),
                                                   f"curve {ratio:g} seed {i}"), held_features, held_captions)
                  for i in range(s.curve_seeds)]
        mean, low, high = interval(scores)
        points.append({"ratio": ratio, "kept": int(len(train)), "scores": scores, "mean": mean, "low": low,
                       "high": high})
        del subset
    curve = {"metric": f"mean R@{CURVE_K} (%), image->text and text->image, validation split",
             "holdout": len(held), "seeds": s.curve_seeds, "tolerance": s.auto_tolerance, "points": points}
    if s.ratio == AUTO:
        curve["chosen_ratio"] = choose_ratio(points, s.auto_tolerance)
    return curve


def metrics(curve: dict | None) -> dict[str, float]:
    """Flat metrics of a curve for MLflow: curve.r<ratio>.{mean,low,high} and curve.chosen_ratio."""
    if not curve:
        return {}
    out = {f"curve.r{p['ratio']:g}.{name}": float(p[name]) for p in curve["points"] for name in ("mean", "low", "high")}
    if "chosen_ratio" in curve:
        out["curve.chosen_ratio"] = float(curve["chosen_ratio"])
    return out


def summary(curve: dict) -> str:
    """One line: the chosen ratio (with auto) and every point, `0.05 41.2 [39.8, 42.6]`."""
    points = ", ".join(f"{p['ratio']:g} {p['mean']:.1f} [{p['low']:.1f}, {p['high']:.1f}]" for p in curve["points"])
    head = (f"ratio auto chose {curve['chosen_ratio']:g} (tolerance {curve['tolerance']:g}); "
            if "chosen_ratio" in curve else "")
    return f"{head}ratio curve, {curve['metric']} on {curve['holdout']} pairs: {points}"


def plot(curve: dict, url: str) -> None:
    """The curve as a PNG: mean and 95% interval per ratio, auto's threshold and choice when there is one."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    ratios = [p["ratio"] for p in points]
    means = np.array([p["mean"] for p in points])
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    ax.errorbar(ratios, means, yerr=[means - [p["low"] for p in points], [p["high"] for p in points] - means],
                marker="o", capsize=3, label=f"{curve['seeds']} seeds, 95% interval")
    full = next(p for p in points if p["ratio"] == 1.0)["mean"]
    ax.axhline((1 - curve["tolerance"]) * full, color="C7", linestyle="--", linewidth=1,
               label=f"full x (1 - {curve['tolerance']:g})")
    if "chosen_ratio" in curve:
        ax.axvline(curve["chosen_ratio"], color="C2", linewidth=1.5, label=f"auto: {curve['chosen_ratio']:g}")
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("keep ratio (share of the crawl outside the validation split)")
    ax.set_ylabel(f"mean R@{CURVE_K} (%), validation")
    ax.legend(fontsize=8)
    buffer = _io.BytesIO()
    fig.tight_layout()
    # fixed metadata: the same curve gives the same bytes
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    storage.write_bytes_atomic(url, buffer.getvalue())
