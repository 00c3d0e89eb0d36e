"""stages/evaluate: arms, protocols, ground-truth metrics and the report, on the tiny synthetic crawl
with a hand-made "compressed" set (every 4th sample; half of the generated captions correct)."""

import json
import os
import random

import numpy as np
import pytest
import torch

from tldr_tasks import storage
from tldr_tasks.config import Config
from tldr_tasks.data.shards import Sample, encode_json, iter_shard, write_tar
from tldr_tasks.data.synthetic import names_scene, scene_signature
from tldr_tasks.fusion import fuse
from tldr_tasks.stages import evaluate
from tldr_tasks.stages.base import StageIO

torch.set_num_threads(1)


def _make_compressed(crawl: str, out: str, fusion: str = "alternate") -> list[Sample]:
    """Write `out/shards/00000.tar` like materialize: every 4th input sample; even ones get a correct
    generated caption (the truth's description), odd ones a wrong one."""
    samples = [s for url in storage.expand_shards(f"{crawl}/train") for s in iter_shard(url)
               if isinstance(s, Sample)]
    kept = samples[::4]
    rows = []
    for j, s in enumerate(kept):
        generated = s.meta["truth"]["description"] if j % 2 == 0 else "a blurry picture of nothing"
        meta = {"original_caption": s.caption, "generated_caption": generated, "fusion": fusion, "cluster": j % 5,
                "source_shard": s.shard, "source_key": s.key, "truth": s.meta["truth"]}
        rows.append((s.key, {"png": s.image_bytes, "txt": fuse(s.caption, generated, fusion).encode(),
                             "json": encode_json(meta)}))
    write_tar(storage.join(out, "shards", "00000.tar"), rows)
    return kept


def _cfg(**evaluate) -> Config:
    cfg = Config()
    cfg.evaluate.preset = "micro"
    cfg.evaluate.epochs = 1
    cfg.evaluate.batch_size = 32
    cfg.evaluate.lr = 1e-3
    for key, value in evaluate.items():
        setattr(cfg.evaluate, key, value)
    return cfg.validate()


@pytest.fixture(scope="module")
def splits(tiny_crawl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_splits"))
    kept = _make_compressed(tiny_crawl, out)
    full = evaluate.read_split(storage.expand_shards(f"{tiny_crawl}/train"), 32, "input")
    tldr = evaluate.read_split(storage.listdir(f"{out}/shards", ".tar"), 32, "compressed")
    return full, tldr, kept


def test_protocol_steps():
    # compute-matched: every arm gets the full set's budget; epoch-matched: each arm its own epochs
    assert evaluate.protocol_steps("compute_matched", 50, 200, 3, 32) == 3 * 7
    assert evaluate.protocol_steps("compute_matched", 200, 200, 3, 32) == 3 * 7
    assert evaluate.protocol_steps("epoch_matched", 50, 200, 3, 32) == 3 * 2
    assert evaluate.protocol_steps("epoch_matched", 200, 200, 3, 32) == 3 * 7
    with pytest.raises(ValueError, match="compute_matched"):
        evaluate.protocol_steps("equal_time", 50, 200, 3, 32)


def test_random_arm_is_a_seeded_subset_of_the_tldr_size(splits):
    full, tldr, kept = splits
    assert len(full) == 200 and len(tldr) == len(kept) == 50
    arms = evaluate.build_arms(["full", "tldr", "random"], full, tldr, seed=0)
    assert len(arms["full"].images) == 200
    assert len(arms["random"].images) == len(arms["tldr"].images) == 50
    idx = evaluate.random_subset(200, 50, seed=0)
    assert len(set(idx.tolist())) == 50 and np.array_equal(idx, evaluate.random_subset(200, 50, seed=0))
    assert not np.array_equal(idx, evaluate.random_subset(200, 50, seed=1))
    assert np.array_equal(arms["random"].images, full.images[idx])
    rng = random.Random(0)
    assert [arms["random"].caption_for(i, rng) for i in range(50)] == [full.captions[i] for i in idx]
    assert [arms["full"].caption_for(i, rng) for i in range(200)] == full.captions
    with pytest.raises(ValueError, match="larger than the accepted input"):
        evaluate.random_subset(10, 50, seed=0)


def test_fusion_arms_use_their_captions(splits):
    full, tldr, kept = splits
    arms = evaluate.build_arms(["tldr", "tldr_concat", "tldr_generated", "tldr_original", "tldr_alternate"],
                               full, tldr, seed=0)
    originals = [s.caption for s in kept]
    generated = [s.meta["truth"]["description"] if j % 2 == 0 else "a blurry picture of nothing"
                 for j, s in enumerate(kept)]
    rng = random.Random(0)
    i = next(j for j, o in enumerate(originals) if o)  # a sample with a non-empty web caption
    assert arms["tldr_concat"].caption_for(i, rng) == f"{originals[i]}; {generated[i]}"
    assert arms["tldr_generated"].caption_for(i, rng) == generated[i]
    assert arms["tldr_original"].caption_for(i, rng) == originals[i]
    # alternate (the shards' own mode, so also "tldr"): one of the two per visit, both over many visits
    for name in ("tldr_alternate", "tldr"):
        seen = {arms[name].caption_for(i, rng) for _ in range(50)}
        assert seen == {originals[i], generated[i]}
    empty = next((j for j, o in enumerate(originals) if not o), None)
    if empty is not None:  # an empty web caption: every mode falls back to the generated one
        assert arms["tldr_original"].caption_for(empty, rng) == ""
        assert arms["tldr_alternate"].caption_for(empty, rng) == generated[empty]
    with pytest.raises(ValueError, match="fusion mode"):
        evaluate.build_arms(["tldr_shuffled"], full, tldr, seed=0)


def test_zero_shot_task_uses_one_object_eval_images_and_held_out_prompts(tiny_crawl):
    eval_split = evaluate.read_split(storage.expand_shards(f"{tiny_crawl}/eval"), 32, "eval")
    task = evaluate.zero_shot_task(eval_split)
    truths = eval_split.truths()
    assert task.items == [i for i, t in enumerate(truths) if len(t["objects"]) == 1]
    for item, label in zip(task.items, task.labels):
        obj = truths[item]["objects"][0]
        assert task.classes[label] == (obj["colour"], obj["shape"])
    assert len(task.classes) == 48
    red_circle = task.prompts[task.classes.index(("red", "circle"))]
    assert "an image showing a red circle" in red_circle
    assert all("red circle" in p for p in red_circle)


def test_missing_eval_input_says_what_to_pass(tmp_path, tiny_crawl):
    io = StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path))
    with pytest.raises(ValueError, match="--eval-input"):
        evaluate.run(_cfg(), io)


@pytest.fixture(scope="module")
def evaluated(tiny_crawl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_run"))
    kept = _make_compressed(tiny_crawl, out)
    io = StageIO(input=f"{tiny_crawl}/train", out=out, eval_input=f"{tiny_crawl}/eval")
    cfg = _cfg(arms=["full", "tldr", "random", "tldr_generated"])
    # run() sets torch's threads from OMP_NUM_THREADS, else every core; on a shared 2-core test host two
    # threads fighting other jobs make the tiny trainings ~50x slower than one
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        result = evaluate.run(cfg, io)
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    report = json.loads(open(f"{out}/evaluate/report.json").read())
    return cfg, io, result, report, kept


def test_report_shape_and_step_counts(evaluated):
    cfg, io, result, report, kept = evaluated
    arms = ["full", "tldr", "random", "tldr_generated"]
    assert set(report["retrieval"]) == set(report["retrieval_epoch_matched"]) == set(arms)
    keys = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1", "zero_shot_acc",
            "train_seconds", "steps", "samples"}
    for protocol in ("retrieval", "retrieval_epoch_matched"):
        for arm in arms:
            values = report[protocol][arm]
            assert keys <= set(values)
            assert all(0.0 <= values[k] <= 100.0 for k in keys - {"train_seconds", "steps", "samples"})
            assert values["i2t_r1"] <= values["i2t_r5"] <= values["i2t_r10"]
            assert values["mean_r1"] == pytest.approx((values["i2t_r1"] + values["t2i_r1"]) / 2)
            assert values["mean_r1_instance"] <= values["mean_r1"]  # an exact pair is also a same-scene hit
    cm, em = report["retrieval"], report["retrieval_epoch_matched"]
    assert {a: cm[a]["steps"] for a in arms} == dict.fromkeys(arms, 7)  # 1 epoch * ceil(200 / 32)
    assert {a: em[a]["steps"] for a in arms} == {"full": 7, "tldr": 2, "random": 2, "tldr_generated": 2}
    assert {a: cm[a]["samples"] for a in arms} == {"full": 200, "tldr": 50, "random": 50, "tldr_generated": 50}
    assert em["full"] == cm["full"]  # the same run: trained once
    assert len(storage.listdir(f"{io.evaluate_dir}/arms", ".json")) == 7
    assert report["eval_samples"] == 60 and report["scene_level_hits"] is True
    assert result.metrics["compute_matched.tldr.mean_r1"] == cm["tldr"]["mean_r1"]
    assert result.metrics["epoch_matched.random.steps"] == 2
    assert open(f"{io.evaluate_dir}/retrieval.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_ground_truth_metrics(evaluated, tiny_crawl):
    cfg, io, result, report, kept = evaluated
    assert report["caption_accuracy"] == 0.5  # the even half of the generated captions is correct
    full = [s for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)]
    noisy_in = np.mean([not names_scene(s.caption, s.meta["truth"]) for s in full])
    assert report["noise_rate_input"] == pytest.approx(noisy_in)
    assert 0.25 <= report["noise_rate_input"] <= 0.32  # the crawl makes 30% noise; a swap can name a superset
    # KEY.txt = "original; generated": clean when either part names the scene
    noisy_out = np.mean([not (j % 2 == 0 or names_scene(s.caption, s.meta["truth"])) for j, s in enumerate(kept)])
    assert report["noise_rate_output"] == pytest.approx(noisy_out)
    assert report["noise_rate_output"] < report["noise_rate_input"]
    idx = evaluate.random_subset(200, 50, cfg.seed)
    assert report["distinct_scenes"] == {"full": len({s.meta["truth"]["scene"] for s in full}),
                                         "tldr": len({s.meta["truth"]["scene"] for s in kept}),
                                         "random": len({full[i].meta["truth"]["scene"] for i in idx})}
    assert result.metrics["distinct_scenes.tldr"] == report["distinct_scenes"]["tldr"]


def test_rerun_is_skipped_with_the_same_metrics(evaluated):
    cfg, io, result, report, kept = evaluated
    again = evaluate.run(cfg, io)
    assert again.skipped and again.metrics == result.metrics


def test_scene_groups_follow_signatures(tiny_crawl):
    eval_split = evaluate.read_split(storage.expand_shards(f"{tiny_crawl}/eval"), 32, "eval")
    groups = evaluate.scene_groups(eval_split)
    assert groups == [scene_signature(t) for t in eval_split.truths()]
    assert len(set(groups)) < len(groups)  # descriptions repeat: instance hits would understate
