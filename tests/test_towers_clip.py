"""models/towers_clip: the evaluation model on pretrained towers (towers-locked, towers-lit), its features
cached per shard content, and the evaluation stage running it with the arms it runs for every preset."""

import json
import os

import numpy as np
import pytest
import torch

from tldr_tasks import content, storage
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, encode_json, iter_shard, write_tar
from tldr_tasks.models import clip, towers_clip
from tldr_tasks.models.towers import load_image_tower
from tldr_tasks.stages import evaluate

torch.set_num_threads(1)


@pytest.fixture()
def counted(monkeypatch):
    """Every call of the image tower over images, with how many images it was given."""
    calls: list[int] = []
    real = towers_clip.image_features

    def counting(spec, images, *args, **kwargs):
        calls.append(len(images))
        return real(spec, images, *args, **kwargs)

    monkeypatch.setattr(towers_clip, "image_features", counting)
    monkeypatch.setattr(towers_clip, "_BY_DIGEST", {})
    return calls


@pytest.fixture(scope="module")
def features(tiny_crawl, tmp_path_factory):
    """(keys, features, captions) of the tiny crawl's train shards at the locked preset."""
    cache = str(tmp_path_factory.mktemp("tower_cache"))
    preset = clip.load_preset("towers-locked")
    keys, rows, _, _ = towers_clip.cached_features(storage.expand_shards(f"{tiny_crawl}/train"), preset, cache,
                                                   "train")
    captions = {s.key: s.caption for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)
                if isinstance(s, Sample)}
    return keys, rows, [captions[k] for k in keys]


def test_features_are_computed_once_per_shard_content_and_reused(tiny_crawl, tmp_path, counted):
    preset = clip.load_preset("towers-locked")
    urls = storage.expand_shards(f"{tiny_crawl}/train")
    keys, first, captions, _ = towers_clip.cached_features(urls, preset, str(tmp_path), "train")
    assert sum(counted) == len(keys) == 200 and first.shape == (200, 1280)
    parts = storage.listdir(towers_clip.features_dir(str(tmp_path), preset), ".npz")
    assert sorted(p.rsplit("/", 1)[-1] for p in parts) == sorted(content.shard_id(u) + ".npz" for u in urls)

    counted.clear()
    towers_clip._BY_DIGEST.clear()  # a new process: only the parts on disk remain
    again_keys, again, again_captions, _ = towers_clip.cached_features(urls, preset, str(tmp_path), "train")
    assert counted == [] and again_keys == keys and np.array_equal(again, first) and again_captions == captions

    # a compressed shard repeats crawl images byte for byte: a new part, but no image runs through the tower again
    samples = [s for s in iter_shard(urls[0]) if isinstance(s, Sample)][:10]
    write_tar(str(tmp_path / "kept" / "00000.tar"),
              [(s.key, {"png": s.image_bytes, "txt": b"another caption"}) for s in samples])
    kept_keys, kept, _, _ = towers_clip.cached_features([str(tmp_path / "kept" / "00000.tar")], preset,
                                                        str(tmp_path), "kept")
    assert sum(counted) == 0 and np.array_equal(kept, first[[keys.index(k) for k in kept_keys]])


def test_a_first_run_and_a_rerun_read_the_same_caption_vectors(tiny_crawl, tmp_path, monkeypatch):
    """The text memo holds what a part stores (float16), whether the part was just written or read back: a first
    run and a rerun in a new process train on the same numbers."""
    preset = clip.load_preset("towers-locked")
    urls = storage.expand_shards(f"{tiny_crawl}/train")
    locked_layers = len(towers_clip.text_tower(preset["text_tower"]).bert.encoder.layer)
    vectors = []
    for _ in range(2):  # computed, then read from the cache with the per-process memos empty (a new process)
        monkeypatch.setattr(towers_clip, "_MEMO", {})
        monkeypatch.setattr(towers_clip, "_BY_DIGEST", {})
        _, _, captions, _ = towers_clip.cached_features(urls, preset, str(tmp_path), "train")
        vectors.append(towers_clip._locked_text(preset["text_tower"], preset["max_text_tokens"], locked_layers,
                                                captions, "cpu"))
    assert torch.equal(vectors[0], vectors[1])
    assert torch.equal(vectors[0], vectors[0].half().float())  # float16 values: what the part stores


def test_locked_towers_stay_unchanged_and_only_the_heads_learn(features):
    keys, rows, captions = features
    image_tower = load_image_tower("efficientnet-lite0")
    text_tower = towers_clip.text_tower("minilm-l6")
    before = {k: v.clone() for k, v in [*image_tower.state_dict().items(), *text_tower.state_dict().items()]}
    model, _ = clip.train_clip(towers_clip.Rows(rows), captions, clip.make_tokenizer("towers-locked", []), steps=6,
                               batch_size=32, lr=1e-2, seed=0, preset="towers-locked")
    after = {**image_tower.state_dict(), **text_tower.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(model.state_dict()) == ["image_head.weight", "logit_scale", "text_head.weight"]
    torch.manual_seed(0)  # train_clip's initialisation for seed 0
    start = towers_clip.TowersCLIP(clip.load_preset("towers-locked"))
    assert not torch.equal(model.image_head.weight, start.image_head.weight)
    assert not torch.equal(model.text_head.weight, start.text_head.weight)


def test_lit_tunes_the_text_tower_and_not_the_image_tower(features):
    keys, rows, captions = features
    image_tower = load_image_tower("efficientnet-lite0")
    text_tower = towers_clip.text_tower("minilm-l6")
    images_before = {k: v.clone() for k, v in image_tower.state_dict().items()}
    text_before = {k: v.clone() for k, v in text_tower.state_dict().items()}
    preset = clip.load_preset("towers-lit")
    model, _ = clip.train_clip(towers_clip.Rows(rows), captions, clip.make_tokenizer("towers-lit", []), steps=4,
                               batch_size=32, lr=1e-3, seed=0, preset="towers-lit")
    top = len(text_tower.bert.encoder.layer) - preset["text_tuned_layers"]
    tuned = model.text_layers[0].state_dict()
    original = text_tower.bert.encoder.layer[top].state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)  # the text tower's top layers learnt
    assert all(torch.equal(v, image_tower.state_dict()[k]) for k, v in images_before.items())
    assert all(torch.equal(v, text_tower.state_dict()[k]) for k, v in text_before.items())  # the shared copy


def test_a_saved_towers_model_scores_pixels_like_its_features(features, tiny_crawl, tmp_path):
    keys, rows, captions = features
    model, _ = clip.train_clip(towers_clip.Rows(rows), captions, clip.make_tokenizer("towers-locked", []), steps=3,
                               batch_size=32, seed=0, preset="towers-locked")
    clip.save_clip(model, clip.make_tokenizer("towers-locked", []), "towers-locked", str(tmp_path / "ref"))
    loaded, tokenizer, size = clip.load_clip(str(tmp_path / "ref"))
    assert size == 128
    samples = [s for s in iter_shard(storage.expand_shards(f"{tiny_crawl}/train")[0]) if isinstance(s, Sample)][:4]
    pixels = np.stack([np.asarray(s.image.resize((size, size), 3)) for s in samples])  # bicubic, as the spool
    from_pixels = clip.embed_images(loaded, pixels)
    from_features = clip.embed_images(model, rows[[keys.index(s.key) for s in samples]])
    assert torch.allclose(from_pixels, from_features, atol=2e-2)  # the cache stores float16
    assert torch.allclose(clip.embed_texts(loaded, tokenizer, captions[:3]),
                          clip.embed_texts(model, None, captions[:3]), atol=1e-5)


def _compressed(tiny_crawl: str, out: str) -> None:
    """Every 4th input sample as materialize writes it (original captions)."""
    samples = [s for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)
               if isinstance(s, Sample)][::4]
    write_tar(storage.join(out, "shards", "00000.tar"), [
        (s.key, {"png": s.image_bytes, "txt": s.caption.encode(),
                 "json": encode_json({"original_caption": s.caption, "truth": s.meta["truth"]})}) for s in samples])


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("shared_tower_cache"))


@pytest.mark.parametrize("preset", ["towers-locked", "towers-lit"])
def test_the_evaluation_runs_its_arms_on_a_towers_preset_and_reuses_features(preset, tiny_crawl, random_captioner,
                                                                              shared_cache, tmp_path, counted,
                                                                              monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # both presets read the same parts (same towers, size and token limit): the first run computes them
    fresh = not storage.exists(towers_clip.features_dir(shared_cache, clip.load_preset(preset)))
    cfg = Config()
    cfg.evaluate.preset, cfg.evaluate.epochs, cfg.evaluate.batch_size = preset, 1, 64
    cfg.evaluate.arms, cfg.evaluate.curve_points = ["full", "tldr", "random", "oracle_clean"], [0.5]
    cfg.caption.max_new_tokens, cfg.caption.num_beams = 6, 1
    cfg.validate()
    from tldr_tasks.stages import caption

    seen = []  # what the captioner is shown: pictures, whatever the evaluation model trains on
    real_caption_images = caption.caption_images

    def captioning(model, tokenizer, images, *args):
        images = list(images)
        seen.extend((image.mode, image.size) for image in images)
        return real_caption_images(model, tokenizer, iter(images), *args)

    monkeypatch.setattr(caption, "caption_images", captioning)
    monkeypatch.setattr(evaluate, "_HELD_OUT_CACHE", {})  # captioned again in this test
    io = StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path / "a"), eval_input=f"{tiny_crawl}/eval",
                 embed_cache=shared_cache, captioner=random_captioner)
    _compressed(tiny_crawl, io.out)
    evaluate.run(cfg, io)
    report = json.loads(open(f"{io.out}/evaluate/report.json").read())
    assert sorted(report["arms"]) == ["full", "oracle_clean", "random", "tldr"]
    assert all(0 <= report["arms"][a][s]["mean_r1"] <= 100 for a in report["arms"] for s in ("validation", "test"))
    assert report["arms"]["tldr"]["samples"] == 50 and report["arms"]["random"]["samples"] == 50
    size = cfg.captioner.image_size
    assert seen and set(seen) == {("RGB", (size, size))} and 0 <= report["caption_accuracy"] <= 1
    # train + held-out images, once; the compressed shard's are the crawl's
    assert sum(counted) == (260 if fresh else 0)

    counted.clear()
    towers_clip._BY_DIGEST.clear()
    other = StageIO(input=io.input, out=str(tmp_path / "b"), eval_input=io.eval_input, embed_cache=io.embed_cache,
                    captioner=random_captioner)
    _compressed(tiny_crawl, other.out)
    cfg.seed = 1
    evaluate.run(cfg, other)  # another seed (a new run folder): the tower runs on nothing
    assert counted == [] and os.path.exists(f"{other.out}/evaluate/report.json")
