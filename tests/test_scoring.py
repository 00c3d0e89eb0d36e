"""scoring: clip_score's built-in reference (pretrained towers, heads cross-fitted on the crawl) and the
preflight refusal of a clip_score that has nothing to score with (exit 2 before any stage runs)."""

import hashlib

import numpy as np
import pytest
import torch

from tldr_tasks import cli, scoring, storage
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, encode_json, iter_shard, write_tar
from tldr_tasks.folds import fold_of

torch.set_num_threads(1)


def _crawl(tiny_crawl: str) -> list[Sample]:
    return [s for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url) if isinstance(s, Sample)]


def test_the_builtin_reference_ranks_clean_pairs_above_swapped_ones(tiny_crawl, tmp_path):
    samples = _crawl(tiny_crawl)
    keys = np.array([s.key for s in samples])
    cfg = Config()
    io = StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path / "run"))
    score, digest = scoring.pair_scores(cfg, io, keys[::-1])  # any key order
    score, digest = score[::-1], digest[::-1]
    noise = np.array([s.meta["truth"]["noise"] for s in samples])
    empty = np.array([not s.caption.strip() for s in samples])
    assert np.isnan(score[empty]).all() and not np.isnan(score[~empty]).any()
    clean, swapped = score[noise == "none"], score[noise == "swap"]
    assert len(swapped) >= 5 and np.median(clean) > np.quantile(swapped, 0.75)
    assert list(digest) == [hashlib.sha256(s.image_bytes).hexdigest() for s in samples]


def test_cross_fitted_heads_never_train_on_the_fold_they_score(tiny_crawl, tmp_path, monkeypatch):
    """Heads k train on the captioned pairs outside fold k and score fold k; a new caption of a pair (the filter's
    repair) is scored by the heads that scored its original, without training again."""
    samples = _crawl(tiny_crawl)
    keys = [s.key for s in samples]
    trained: list[list[str]] = []  # the captions every reference trains on, in call order
    real = scoring.train_reference
    monkeypatch.setattr(scoring, "train_reference",
                        lambda features, captions, cfg, desc="": trained.append(list(captions))
                        or real(features, captions, cfg, desc))
    cfg = Config()
    cfg.captioner.folds = 3  # the reference takes the project's folds when there are more than two
    reference = scoring.tower_reference(cfg, StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path / "run")),
                                        np.array(keys))
    score = reference.original_scores()
    assert trained == [[s.caption for s in samples if fold_of(s.key, 3) != fold and s.caption.strip()]
                       for fold in range(3)]
    positions = np.flatnonzero(~np.isnan(score))[:6]
    again = reference.score(positions, [samples[i].caption for i in positions])
    assert np.allclose(again, score[positions], atol=1e-6) and len(trained) == 3  # the same heads, none retrained
    other = reference.score(positions, [samples[(i + 1) % len(samples)].caption or "x" for i in positions])
    assert not np.allclose(other, score[positions]) and np.isnan(reference.score(positions[:1], [" "])).all()


@pytest.fixture(scope="module")
def crawls(tiny_crawl, tmp_path_factory) -> dict[str, str]:
    """The tiny crawl, a crawl whose KEY.json carries LAION's similarity, and a folder without a CLIP."""
    root = tmp_path_factory.mktemp("scorers")
    samples = _crawl(tiny_crawl)[:60]
    write_tar(str(root / "laion" / "00000.tar"), [
        (s.key, {"png": s.image_bytes, "txt": s.caption.encode(), "json": encode_json({"similarity": 0.3})})
        for s in samples])
    (root / "not_a_clip").mkdir()
    (root / "not_a_clip" / "weights.bin").write_bytes(b"")
    return {"crawl": f"{tiny_crawl}/train", "laion": str(root / "laion"), "not_a_clip": str(root / "not_a_clip")}


@pytest.mark.parametrize("clip_model, message", [
    ("{missing}", "sample.clip_model={missing} not found"),
    ("{not_a_clip}", "holds no CLIP"),
    ("similarity", "has no numeric `similarity` in its KEY.json"),
])
def test_clip_score_without_a_usable_scorer_is_refused_before_any_stage(crawls, tmp_path, capsys, monkeypatch,
                                                                         clip_model, message):
    from tldr_tasks import runner

    started: list = []
    monkeypatch.setattr(runner, "load_stage_module", lambda name: started.append(name))
    places = {**crawls, "missing": str(tmp_path / "missing")}
    out = tmp_path / "out"
    argv = ["compress", "--input", crawls["crawl"], "--out", str(out), "--clusters", "4", "--strategy", "clip_score",
            "--filter", "none", "--set", f"sample.clip_model={clip_model.format(**places)}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message.format(**places) in err
    assert not out.exists() and started == []
    assert cli.main(["run", "sample", *argv[1:]]) == 2  # one stage alone: refused the same way


@pytest.mark.parametrize("clip_model", ["", "similarity"])
def test_a_usable_scorer_passes_the_check(crawls, clip_model):
    from tldr_tasks.preflight import check_clip_scorer

    cfg = Config()
    cfg.sample.strategy, cfg.sample.clip_model = "clip_score", clip_model
    check_clip_scorer(cfg, storage.expand_shards(crawls["laion"]))


def test_a_saved_towers_folder_scores_from_cached_features_like_from_pixels(tiny_crawl, tmp_path):
    """The benchmark's reference (a towers model in a folder) scores from the cached features; the same
    folder read as any CLIP folder (pixels through the tower) gives the same scores."""
    from tldr_tasks.models import clip

    samples = _crawl(tiny_crawl)[:40]
    keys = np.array([s.key for s in samples])
    cfg = Config()
    io = StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path / "run"))
    rows = np.random.default_rng(0).standard_normal((8, 1280)).astype(np.float32)
    model = scoring.train_reference(rows, [s.caption or "x" for s in samples[:8]], cfg)
    clip.save_clip(model, clip.make_tokenizer(scoring.REFERENCE_PRESET, []), scoring.REFERENCE_PRESET,
                   str(tmp_path / "ref"))
    cfg.sample.clip_model = str(tmp_path / "ref")
    cached, _ = scoring.pair_scores(cfg, io, keys)
    captioned = [i for i, s in enumerate(samples) if s.caption.strip()]
    direct = scoring._Scorer(str(tmp_path / "ref"))([samples[i].image for i in captioned],
                                                    [samples[i].caption for i in captioned])
    assert np.allclose(cached[captioned], direct, atol=2e-2) and np.isnan(np.delete(cached, captioned)).all()
