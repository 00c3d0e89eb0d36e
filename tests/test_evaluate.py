"""stages/evaluate: arms, splits, learning curves, ground-truth metrics and the report, on the tiny
synthetic crawl with a hand-made "compressed" set (every 4th sample; half of the generated captions
correct) written the way materialize writes it."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from tldr_tasks import storage
from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, encode_json, iter_shard, write_tar
from tldr_tasks.data.spool import write_spool
from tldr_tasks.data.synthetic import describes_scene_exactly, scene_signature
from tldr_tasks.fusion import ship_caption
from tldr_tasks.stages import evaluate

torch.set_num_threads(1)


def _generated(j: int, s: Sample) -> str:
    return s.meta["truth"]["description"] if j % 2 == 0 else "a blurry picture of nothing"


def _make_compressed(crawl: str, out: str, cfg: Config) -> list[Sample]:
    """Write `out/shards/00000.tar` like materialize: every 4th input sample; even ones get a correct
    generated caption (the truth's description), odd ones a wrong one; every 3rd fails the gate."""
    samples = [s for url in storage.expand_shards(f"{crawl}/train") for s in iter_shard(url)
               if isinstance(s, Sample)]
    kept = samples[::4]
    rows = []
    for j, s in enumerate(kept):
        generated, grounding = _generated(j, s), (0.1 if j % 3 == 0 else 2.0)
        text, reason = ship_caption(s.key, s.caption, generated, -0.2, grounding, mode=cfg.caption.fusion,
                                    min_confidence=cfg.caption.min_confidence,
                                    min_grounding=cfg.caption.min_grounding, seed=cfg.seed, collapsed=False)
        meta = {"original_caption": s.caption, "generated_caption": generated, "confidence": -0.2,
                "grounding": grounding, "caption_reason": reason, "fusion": cfg.caption.fusion, "cluster": j % 5,
                "source_shard": s.shard, "source_key": s.key, "truth": s.meta["truth"]}
        rows.append((s.key, {"png": s.image_bytes, "txt": text.encode(), "json": encode_json(meta)}))
    write_tar(storage.join(out, "shards", "00000.tar"), rows)
    return kept


def _cfg(**evaluate) -> Config:
    cfg = Config()
    cfg.evaluate.preset = "micro"
    cfg.evaluate.epochs = 1
    cfg.evaluate.batch_size = 32
    cfg.evaluate.lr = 1e-3
    cfg.caption.max_new_tokens, cfg.caption.num_beams = 6, 1
    cfg.caption.fusion = "mix"  # the shards below mix original and generated captions
    for key, value in evaluate.items():
        setattr(cfg.evaluate, key, value)
    return cfg.validate()


@pytest.fixture(scope="module")
def splits(tiny_crawl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_splits"))
    kept = _make_compressed(tiny_crawl, out, _cfg())
    full = write_spool(storage.expand_shards(f"{tiny_crawl}/train"), 32, f"{out}/spool/input", "input")
    tldr = write_spool(storage.listdir(f"{out}/shards", ".tar"), 32, f"{out}/spool/compressed", "compressed")
    return full, tldr, kept


def test_training_steps_and_curve_points():
    assert evaluate.training_steps(200, 3, 32) == 3 * 7  # every arm: the full set's budget
    assert evaluate.curve_steps(21, [0.125, 0.25, 0.5, 0.75]) == [3, 5, 10, 16, 21]
    assert evaluate.curve_steps(2, [0.125, 0.25]) == [1, 2]


def test_time_to_accuracy_reads_the_curves():
    curves = {"full": [[10, 5.0], [20, 9.0], [40, 10.0]], "tldr": [[10, 9.6], [20, 11.0], [40, 12.0]],
              "random": [[10, 2.0], [20, 4.0], [40, 6.0]]}
    # target 0.95 * 10 = 9.5: full crosses it between 20 (9.0) and 40 (10.0), at 30; tldr between 0 (R@1 0
    # at step 0) and 10 (9.6), at 10 * 9.5 / 9.6
    got = evaluate.time_to_accuracy(curves, 40)
    assert got["full"] == pytest.approx(0.75) and got["tldr"] == pytest.approx(10 * 9.5 / 9.6 / 40)
    assert got["random"] is None
    assert evaluate.time_to_accuracy({"tldr": curves["tldr"]}, 40) == {}


def test_eval_split_is_halved_by_key(tiny_crawl, tmp_path):
    held_out = write_spool(storage.expand_shards(f"{tiny_crawl}/eval"), 32, str(tmp_path), "eval")
    parts = evaluate.split_eval(held_out)
    assert sorted([*parts["validation"].keys, *parts["test"].keys]) == sorted(held_out.keys)
    assert not set(parts["validation"].keys) & set(parts["test"].keys)
    assert 15 <= len(parts["validation"]) <= 45
    again = evaluate.split_eval(held_out.take(range(len(held_out) - 1, -1, -1)))  # another order, same split
    assert set(again["test"].keys) == set(parts["test"].keys)


def test_random_arm_is_a_seeded_subset_of_the_tldr_size(splits):
    full, tldr, kept = splits
    assert len(full) == 200 and len(tldr) == len(kept) == 50
    arms = evaluate.build_arms(["full", "tldr", "random"], full, tldr, _cfg(), StageIO(input="", out=""))
    assert len(arms["full"].images) == 200
    assert len(arms["random"].images) == len(arms["tldr"].images) == 50
    idx = evaluate.random_subset(200, 50, seed=0)
    assert len(set(idx.tolist())) == 50 and np.array_equal(idx, evaluate.random_subset(200, 50, seed=0))
    assert not np.array_equal(idx, evaluate.random_subset(200, 50, seed=1))
    assert np.array_equal(arms["random"].images, full.images[idx])
    assert list(arms["random"].captions) == [full.captions[i] for i in idx]
    assert list(arms["full"].captions) == list(full.captions)
    with pytest.raises(ValueError, match="larger than the accepted input"):
        evaluate.random_subset(10, 50, seed=0)


def test_tldr_arm_trains_on_key_txt_and_fusion_arms_on_what_would_ship(splits):
    full, tldr, kept = splits
    cfg = _cfg()
    arms = evaluate.build_arms(["tldr", "tldr_mix", "tldr_concat", "tldr_generated", "tldr_original"], full, tldr,
                               cfg, StageIO(input="", out=""))
    key_txt = list(tldr.captions)  # read from the shards' KEY.txt
    assert list(arms["tldr"].captions) == key_txt  # exactly what a client reads
    assert arms["tldr_mix"].captions == key_txt  # the shards' own fusion, re-decided: the same captions
    originals = [s.caption for s in kept]
    assert list(arms["tldr_original"].captions) == originals
    for j, s in enumerate(kept):
        gated = j % 3 == 0  # ungrounded: the original ships whatever the fusion
        expected = s.caption if gated else _generated(j, s)
        assert arms["tldr_generated"].captions[j] == expected
        if not gated and s.caption:
            assert arms["tldr_concat"].captions[j] == f"{s.caption}; {_generated(j, s)}"
    with pytest.raises(ValueError, match="fusion mode"):
        evaluate.build_arms(["tldr_shuffled"], full, tldr, cfg, StageIO(input="", out=""))


def test_the_task_comes_with_the_eval_data(tiny_crawl, tmp_path):
    eval_split = write_spool(storage.expand_shards(f"{tiny_crawl}/eval"), 32, f"{tmp_path}/spool", "eval")
    task = evaluate.load_task(f"{tiny_crawl}/eval/{{00000..00000}}.tar")
    assert task == evaluate.load_task(f"{tiny_crawl}/eval") and task["hit"] == "group"
    zero_shot = evaluate.zero_shot_task(eval_split, task)
    truths = eval_split.truths()
    assert zero_shot.items == [i for i, t in enumerate(truths) if len(t["objects"]) == 1]
    for item, label in zip(zero_shot.items, zero_shot.labels):
        obj = truths[item]["objects"][0]
        assert zero_shot.classes[label] == {"colour": obj["colour"], "shape": obj["shape"]}
    assert len(zero_shot.classes) == 48 and zero_shot.attributes == ["colour", "shape"]
    red_circle = zero_shot.prompts[zero_shot.classes.index({"colour": "red", "shape": "circle"})]
    assert "an image showing a red circle" in red_circle  # the eval split's held-out caption styles
    assert all("red circle" in p for p in red_circle)
    # a held-out set without task.json (a user's own): exact-pair hits, no zero-shot
    shutil.copy(f"{tiny_crawl}/eval/00000.tar", tmp_path / "00000.tar")
    assert evaluate.load_task(str(tmp_path)) == {}
    assert evaluate.scene_groups(eval_split, {}) is None and evaluate.zero_shot_task(eval_split, {}) is None


def test_missing_eval_input_says_what_to_pass(tmp_path, tiny_crawl):
    io = StageIO(input=f"{tiny_crawl}/train", out=str(tmp_path))
    with pytest.raises(ValueError, match="--eval-input"):
        evaluate.run(_cfg(), io)


@pytest.fixture(scope="module")
def evaluated(tiny_crawl, random_captioner, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_run"))
    cfg = _cfg(arms=["full", "tldr", "random", "tldr_original", "random_generated", "oracle_clean"],
               budgets=["compute", "epochs"])
    kept = _make_compressed(tiny_crawl, out, cfg)
    io = StageIO(input=f"{tiny_crawl}/train", out=out, eval_input=f"{tiny_crawl}/eval", captioner=random_captioner)
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


def test_report_shape_curves_and_step_counts(evaluated):
    cfg, io, result, report, kept = evaluated
    arms = ["full", "tldr", "random", "tldr_original", "random_generated", "oracle_clean"]
    assert set(report["arms"]) == set(arms) | {f"{a}_epochs" for a in arms}
    keys = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1", "zero_shot_acc"}
    for arm in arms:
        values = report["arms"][arm]
        assert values["steps"] == report["steps"] == 7  # 1 epoch * ceil(200 / 32), every arm (compute)
        for split in ("validation", "test"):
            metrics = values[split]
            assert keys <= set(metrics)
            assert all(0.0 <= metrics[k] <= 100.0 for k in keys)
            assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
            assert metrics["mean_r1"] == pytest.approx((metrics["i2t_r1"] + metrics["t2i_r1"]) / 2)
            assert metrics["mean_r1_instance"] <= metrics["mean_r1"]  # an exact pair is also a same-scene hit
            # the learning curve ends with the final model's score
            assert [s for s, _ in values["curve"][split]] == [1, 2, 4, 5, 7]
            assert values["curve"][split][-1][1] == metrics["mean_r1"]
    assert {a: report["arms"][a]["samples"] for a in arms} == {"full": 200, "tldr": 50, "random": 50,
                                                                "tldr_original": 50, "random_generated": 50,
                                                                "oracle_clean": 50}
    # the paper's protocol: every arm its own epochs (1 * ceil(50 / 32)); the full arm's are the budget
    assert report["arms"]["tldr_epochs"]["steps"] == 2 and report["arms"]["full_epochs"]["steps"] == 7
    assert report["arms"]["full_epochs"]["test"] == report["arms"]["full"]["test"]  # one training, cached
    assert report["splits"]["validation"] + report["splits"]["test"] == 60
    assert set(report["time_to_accuracy"]) == set(arms) and report["time_to_accuracy"]["full"] <= 1.0
    assert result.metrics["test.tldr.mean_r1"] == report["arms"]["tldr"]["test"]["mean_r1"]
    assert open(f"{io.evaluate_dir}/retrieval.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_ground_truth_metrics_measure_what_ships(evaluated, tiny_crawl):
    cfg, io, result, report, kept = evaluated
    full = [s for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)]
    noisy_in = np.mean([not describes_scene_exactly(s.caption, s.meta["truth"]) for s in full])
    assert report["noise_rate_input"] == pytest.approx(noisy_in)
    assert 0.25 <= report["noise_rate_input"] <= 0.4
    shipped = [s.caption for url in storage.listdir(f"{io.out}/shards", ".tar") for s in iter_shard(url)]
    noisy_out = np.mean([not describes_scene_exactly(c, s.meta["truth"]) for c, s in zip(shipped, kept)])
    assert report["noise_rate_output"] == report["noise_rate"]["tldr"] == pytest.approx(noisy_out)
    idx = evaluate.random_subset(200, 50, cfg.seed)
    assert report["distinct_scenes"]["full"] == len({s.meta["truth"]["scene"] for s in full})
    assert report["distinct_scenes"]["tldr"] == len({s.meta["truth"]["scene"] for s in kept})
    assert report["distinct_scenes"]["random"] == len({full[i].meta["truth"]["scene"] for i in idx})
    # the random captioner writes gibberish: nothing it says about held-out images is right, and the
    # gate keeps its captions out of the random_generated arm
    assert report["caption_accuracy"] == 0.0
    assert report["noise_rate"]["random_generated"] == pytest.approx(report["noise_rate"]["random"])
    assert result.metrics["distinct_scenes.tldr"] == report["distinct_scenes"]["tldr"]


def test_oracle_clean_is_a_subset_of_truly_clean_pairs(evaluated):
    cfg, io, result, report, kept = evaluated
    assert report["noise_rate"]["oracle_clean"] == 0.0
    assert report["noise_types"]["oracle_clean"] == {"none": 50}
    assert sum(report["noise_types"]["full"].values()) == 200 and report["noise_types"]["full"]["none"] < 200


def test_every_evaluation_of_one_input_shares_tokenizer_and_initialisation(evaluated, tiny_crawl, random_captioner,
                                                                            tmp_path, monkeypatch):
    """Another selection of the same input, evaluated with other arms: the full arm is the very same
    training (one tokenizer, one initialisation), so a paired difference is a difference of data."""
    cfg, io, result, report, kept = evaluated
    other = str(tmp_path / "other")
    os.makedirs(f"{other}/shards")
    samples = [s for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)]
    meta = [encode_json({"original_caption": s.caption, "truth": s.meta["truth"]}) for s in samples]
    write_tar(f"{other}/shards/00000.tar", [(s.key, {"png": s.image_bytes, "txt": s.caption.encode(), "json": meta[i]})
                                            for i, s in enumerate(samples) if i % 3 == 1])
    other_io = StageIO(input=f"{tiny_crawl}/train", out=other, eval_input=f"{tiny_crawl}/eval",
                       captioner=random_captioner)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    during, spooled = [], evaluate.evaluate_spooled
    monkeypatch.setattr(evaluate, "evaluate_spooled",
                        lambda *args: during.append(torch.get_num_threads()) or spooled(*args))
    torch.set_num_threads(2)  # the caller's count: the stage trains with OMP_NUM_THREADS' and gives this one back
    evaluate.run(cfg, other_io)
    assert during == [1] and torch.get_num_threads() == 2
    again = json.loads(open(f"{other}/evaluate/report.json").read())
    assert again["tokenizer_vocab"] == report["tokenizer_vocab"]
    assert again["arms"]["full"]["test"] == report["arms"]["full"]["test"]
    assert again["arms"]["tldr"]["samples"] == len(samples[1::3]) != report["arms"]["tldr"]["samples"]


def test_rerun_is_skipped_with_the_same_metrics(evaluated):
    cfg, io, result, report, kept = evaluated
    again = evaluate.run(cfg, io)
    assert again.skipped and again.metrics == result.metrics
    assert all(not math.isnan(v) for v in again.metrics.values())


def test_scene_groups_follow_signatures(tiny_crawl, tmp_path):
    eval_split = write_spool(storage.expand_shards(f"{tiny_crawl}/eval"), 32, str(tmp_path), "eval")
    groups = evaluate.scene_groups(eval_split, {"hit": "group"})
    assert groups == [scene_signature(t) for t in eval_split.truths()]
    assert len(set(groups)) < len(groups)  # descriptions repeat: instance hits would understate
