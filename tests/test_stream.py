"""The streaming training loader: every sample once per epoch, the same global batches for any
number of ranks and workers, exact resume, and an order that changes with the epoch."""

from __future__ import annotations

import os

import pytest
import torch

from tldr_tasks.data import stream
from tldr_tasks.data.shards import Sample, iter_shard
from tldr_tasks.models.tokenizer import train_tokenizer
from tldr_tasks.storage import expand_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def crawl(tiny_crawl):
    urls = expand_shards(os.path.join(tiny_crawl, "train"))
    index, captions = stream.index_shards(urls, keep_captions=10_000)
    return index, train_tokenizer(captions, 400)


def trainable_keys(index) -> list[str]:
    return [f"{s.shard}/{s.key}" for url in index.urls for s in iter_shard(url)
            if isinstance(s, Sample) and s.caption.strip()]


def epoch(index, tokenizer, *, world=1, workers=0, epoch=0, start_step=0, drop_last=False, streams=4, batch=16):
    """{step: [keys of the global batch in rank order]} and {step: pixels of the global batch}."""
    keys: dict[int, list[str]] = {}
    pixels: dict[int, list[torch.Tensor]] = {}
    for rank in range(world):
        data = stream.TrainStream(index, batch_size=batch, streams=streams, seed=3, epoch=epoch, image_size=32,
                                  tokenizer=tokenizer, max_tokens=30, shuffle_buffer=16, rank=rank, world=world,
                                  start_step=start_step, drop_last=drop_last)
        for b in stream.batches(data, workers, torch.device("cpu")):
            assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape[1:] == (3, 32, 32)
            assert b["input_ids"].shape == b["attention_mask"].shape
            assert len(b["keys"]) == len(b["pixels"]) == len(b["input_ids"])
            keys.setdefault(b["step"], []).extend(b["keys"])
            pixels.setdefault(b["step"], []).append(b["pixels"])
    return keys, {step: torch.cat(p) for step, p in pixels.items()}


def test_index_counts_captioned_samples_without_decoding(crawl):
    index, _ = crawl
    assert index.counts == [sum(k.startswith(stream_shard(url)) for k in trainable_keys(index)) for url in index.urls]
    assert index.total < 200  # the crawl's empty captions are not trainable
    assert stream.ShardIndex.from_json(index.to_json()) == index


def stream_shard(url: str) -> str:
    return os.path.basename(url).split(".")[0] + "/"


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 3), (2, 0), (2, 2), (4, 1)])
def test_every_sample_exactly_once_per_epoch_for_any_ranks_and_workers(crawl, world, workers):
    index, tokenizer = crawl
    keys, _ = epoch(index, tokenizer, world=world, workers=workers)
    seen = [k for step in sorted(keys) for k in keys[step]]
    assert len(seen) == len(set(seen)) == index.total
    assert sorted(seen) == sorted(trainable_keys(index))
    assert all(len(keys[s]) == 16 for s in sorted(keys)[:-1])  # full global batches, then the ragged tail


def test_global_batches_do_not_depend_on_ranks_or_workers(crawl):
    index, tokenizer = crawl
    ref_keys, ref_pixels = epoch(index, tokenizer, drop_last=True)
    assert len(ref_keys) == index.total // 16
    for world, workers in [(2, 2), (4, 0)]:
        keys, pixels = epoch(index, tokenizer, world=world, workers=workers, drop_last=True)
        assert keys.keys() == ref_keys.keys()
        for step in ref_keys:
            assert sorted(keys[step]) == sorted(ref_keys[step])
            order = [keys[step].index(k) for k in ref_keys[step]]
            assert torch.equal(pixels[step][order], ref_pixels[step])


def test_resume_mid_epoch_yields_the_same_remaining_batches(crawl):
    index, tokenizer = crawl
    full_keys, full_pixels = epoch(index, tokenizer, drop_last=True, workers=2)
    keys, pixels = epoch(index, tokenizer, drop_last=True, workers=2, start_step=4)
    assert sorted(keys) == [s for s in sorted(full_keys) if s >= 4]
    assert all(keys[s] == full_keys[s] and torch.equal(pixels[s], full_pixels[s]) for s in keys)


def test_order_is_a_function_of_seed_and_epoch(crawl):
    index, tokenizer = crawl
    a, _ = epoch(index, tokenizer, epoch=0, drop_last=True)
    again, _ = epoch(index, tokenizer, epoch=0, drop_last=True, workers=2)
    other, _ = epoch(index, tokenizer, epoch=1, drop_last=True)
    assert a == again
    assert a != other and sorted(sum(a.values(), [])) != sorted(sum(other.values(), []))  # other tail dropped too


def test_streams_must_split_the_batch_and_the_ranks(crawl):
    index, tokenizer = crawl
    with pytest.raises(ValueError, match="streams must divide"):
        stream.TrainStream(index, batch_size=16, streams=3, seed=0, epoch=0, image_size=32, tokenizer=tokenizer,
                           max_tokens=30, shuffle_buffer=8)
    with pytest.raises(ValueError, match="multiple"):
        stream.TrainStream(index, batch_size=16, streams=4, seed=0, epoch=0, image_size=32, tokenizer=tokenizer,
                           max_tokens=30, shuffle_buffer=8, world=3)


def test_head_is_the_first_trainable_samples(crawl):
    index, tokenizer = crawl
    piece = stream.head(index, 10, 32, tokenizer, 30)
    assert piece["keys"] == trainable_keys(index)[:10]
    assert piece["pixels"].shape == (10, 3, 32, 32) and piece["input_ids"].shape[1] == piece["length"]
