"""Cross-fitting (captioner.folds): no sample's alignment score or generated caption comes from a captioner
that trained on it. The stages run for real on the tiny crawl; which samples each captioner trained on is
recorded from the batches it was fed, and every score and caption is traced back to the captioner that
made it by recomputing it under each fold's captioner."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tldr_tasks import storage
from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.data import stream
from tldr_tasks.data.shards import Sample, iter_raw_shard, iter_shard
from tldr_tasks.folds import fold_of
from tldr_tasks.models import captioner as cap
from tldr_tasks.models import tokenizer as tokenizer_lib
from tldr_tasks.preprocess import image_to_tensor, tokenize_captions
from tldr_tasks.runner import load_stage_module
from tldr_tasks.stages import embed, evaluate

torch.set_num_threads(1)

OVERRIDES = ["captioner.image_size=32", "captioner.epochs=2", "captioner.batch_size=16",
             "captioner.data_streams=8", "captioner.codebook_size=64", "captioner.warmup_steps=2",
             "captioner.vocab_size=400", "captioner.folds=2", "sample.ratio=0.5", "caption.num_beams=1",
             "caption.max_new_tokens=8", "caption.batch_size=16"]


@pytest.fixture(scope="module")
def crossfit_run(tiny_crawl, tmp_path_factory):
    """Every stage up to caption with two folds; returns (cfg, io, {captioner folder: keys it trained on},
    {captioner folder: {"tokenizer": captions its tokenizer learnt from, "keywords": its codebook's}})."""
    cfg = load_config(None, OVERRIDES)
    io = StageIO(input=os.path.join(tiny_crawl, "train"), out=str(tmp_path_factory.mktemp("crossfit")))
    trained_on: dict[str, set[str]] = {}
    learnt_from: dict[str, dict[str, list[str]]] = {}
    fed: set[str] = set()
    vocabulary: dict[str, list[str]] = {"tokenizer": [], "keywords": []}
    real_batches, real_save = stream.batches, cap.save_captioner
    real_tokenizer, real_build = tokenizer_lib.train_tokenizer, cap.build_captioner

    def recording_batches(dataset, workers, device):
        for batch in real_batches(dataset, workers, device):
            fed.update(k.rsplit("/", 1)[1] for k in batch["keys"])
            yield batch

    def recording_tokenizer(captions, vocab_size):
        captions = list(captions)
        vocabulary["tokenizer"] += captions
        return real_tokenizer(captions, vocab_size)

    def recording_build(config, tokenizer, keyword_captions=None):
        vocabulary["keywords"] += list(keyword_captions or [])
        return real_build(config, tokenizer, keyword_captions)

    def recording_save(model, tokenizer, config, url, companions=()):
        trained_on[url] = set(fed)
        learnt_from[url] = {name: list(captions) for name, captions in vocabulary.items()}
        fed.clear()
        for captions in vocabulary.values():
            captions.clear()
        return real_save(model, tokenizer, config, url, companions)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream, "batches", recording_batches)
        patch.setattr(tokenizer_lib, "train_tokenizer", recording_tokenizer)
        patch.setattr(cap, "build_captioner", recording_build)
        patch.setattr(cap, "save_captioner", recording_save)
        load_stage_module("train-captioner").run(cfg, io)
    for stage in ("embed", "kmeans", "assign", "cluster", "sample", "caption"):
        load_stage_module(stage).run(cfg, io)
    return cfg, io, trained_on, learnt_from


def samples(io: StageIO) -> dict[str, Sample]:
    return {s.key: s for url in io.input_shards() for s in iter_shard(url) if isinstance(s, Sample)}


def caption_scores(captioners, image, text: str) -> list[float]:
    """Mean token log-probability of `text` given `image` under every fold's captioner."""
    out = []
    for model, tokenizer in captioners:
        ids, mask = tokenize_captions(tokenizer, [text], model.arch["max_tokens"])
        with torch.inference_mode():
            out.append(-float(model.per_sample_loss(image_to_tensor([image], model.image_size), ids, mask)[0]))
    return out


# fold_of(f"{i:07d}", 2) and (..., 3) for i in range(32), as the sha256 of the key gives them: a fold is a property
# of the key, the same in every process, on every machine, in every release
PINNED_FOLDS = {2: "01111010000110001011110111101000", 3: "21121121200022100122002210020100"}


def test_a_samples_fold_is_pinned_and_the_same_in_every_process(fresh_python):
    def folds(k: int) -> str:
        return "".join(str(fold_of(f"{i:07d}", k)) for i in range(32))

    assert {k: folds(k) for k in PINNED_FOLDS} == PINNED_FOLDS
    code = ("from tldr_tasks.folds import fold_of\n"
            "print(''.join(str(fold_of(f'{i:07d}', 2)) for i in range(32)))")
    assert {fresh_python(code, seed) for seed in (1, 2)} == {PINNED_FOLDS[2]}


def test_each_fold_captioner_trains_only_outside_its_fold(crossfit_run):
    _, io, trained_on, _ = crossfit_run
    assert set(trained_on) == {cap.fold_url(io.captioner_dir, 0), cap.fold_url(io.captioner_dir, 1)}
    assert cap.captioner_folds(io.captioner_dir) == 2
    for fold in (0, 1):
        keys = trained_on[cap.fold_url(io.captioner_dir, fold)]
        assert len(keys) > 30 and all(fold_of(k, 2) != fold for k in keys)
    # the folder's version covers both captioners: embeddings are keyed by it
    assert cap.captioner_version(io.captioner_dir) != cap.captioner_version(cap.fold_url(io.captioner_dir, 1))


def test_the_tokenizer_and_the_keyword_codebook_learn_only_from_the_training_folds(crossfit_run):
    """A held-out caption's words must not shape the vocabulary or the codebook of the captioner that scores it."""
    _, io, _, learnt_from = crossfit_run
    captioned = [(item.key, caption) for url in io.input_shards() for item in iter_raw_shard(url)
                 if (caption := stream.trainable_caption(item)) is not None]
    for fold in (0, 1):
        expected = sorted(caption for key, caption in captioned if fold_of(key, 2) != fold)
        learnt = learnt_from[cap.fold_url(io.captioner_dir, fold)]
        assert len(expected) > 30
        assert sorted(learnt["tokenizer"]) == expected
        assert sorted(learnt["keywords"]) == expected


def test_alignment_scores_come_from_the_captioner_that_never_saw_the_sample(crossfit_run):
    cfg, io, trained_on, _ = crossfit_run
    captioners = cap.load_fold_captioners(io.captioner_dir)
    by_key = samples(io)
    checked = {0: 0, 1: 0}
    distinct = 0
    for url in storage.listdir(embed.parts_dir(cfg, io), ".npz"):
        part = embed.load_part(url)
        for key, loss in zip(part.keys, part.loss):
            # every sample with a caption is scored, and only those: an empty caption has no score
            assert np.isnan(loss) == (not by_key[key].caption.strip()), key
            if np.isnan(loss):
                continue
            scores = caption_scores(captioners, by_key[key].image, by_key[key].caption)
            scorer = int(np.argmin([abs(-loss - s) for s in scores]))
            assert abs(-loss - scores[scorer]) < 1e-3
            assert scorer == fold_of(key, 2)
            assert key not in trained_on[cap.fold_url(io.captioner_dir, scorer)]
            distinct += abs(scores[0] - scores[1]) > 1e-3  # the trace can tell the captioners apart
            checked[scorer] += 1
    assert min(checked.values()) > 30 and distinct > 0.9 * sum(checked.values())


def test_generated_captions_come_from_the_captioner_that_never_saw_the_sample(crossfit_run):
    _, io, trained_on, _ = crossfit_run
    captioners = cap.load_fold_captioners(io.captioner_dir)
    by_key = samples(io)
    rows = [r for url in storage.listdir(io.caption_dir, ".parquet") for r in pq.read_table(url).to_pylist()]
    selected = pq.read_table(storage.join(io.sample_dir, "selected.parquet")).column("key").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(selected)
    checked = 0
    for row in rows:
        if not row["generated"].strip():
            continue
        scores = caption_scores(captioners, by_key[row["key"]].image, row["generated"])
        own = fold_of(row["key"], 2)
        assert abs(row["confidence"] - scores[own]) < 1e-3  # written and scored by its fold's captioner
        assert row["key"] not in trained_on[cap.fold_url(io.captioner_dir, own)]
        checked += 1
    assert checked > 50


def test_the_evaluation_captions_crawl_samples_out_of_fold(crossfit_run):
    """random_generated's captions (evaluate.generate with keys) follow the same rule."""
    cfg, io, trained_on, _ = crossfit_run
    captioners = cap.load_fold_captioners(io.captioner_dir)
    chosen = list(samples(io).values())[:24]
    images = np.stack([np.asarray(s.image.convert("RGB").resize((32, 32))) for s in chosen])
    captions, confidence, _ = evaluate.generate(io, cfg, images, "test", [s.key for s in chosen])
    assert len(captions) == len(confidence) == len(chosen)
    written = {0: 0, 1: 0}
    for sample, text, conf in zip(chosen, captions, confidence):
        if text.strip():
            own = fold_of(sample.key, 2)
            assert abs(conf - caption_scores(captioners, sample.image, text)[own]) < 1e-3
            assert sample.key not in trained_on[cap.fold_url(io.captioner_dir, own)]
            written[own] += 1
    assert min(written.values()) > 0 and sum(written.values()) >= len(chosen) // 2  # both folds' captioners wrote
