"""Stage caption: one parquet per source shard with exactly the selected keys; resumable; sharded."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tldr_tasks import preprocess
from tldr_tasks.config import ConfigError, load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, iter_shard
from tldr_tasks.models import captioner as cap
from tldr_tasks.stages import caption

torch.set_num_threads(1)

CFG = load_config(None, ["caption.max_new_tokens=6", "caption.min_new_tokens=2", "caption.batch_size=16",
                         "caption.num_beams=2"])


@pytest.fixture(scope="module")
def crawl_samples(tiny_crawl):
    io = StageIO(input=os.path.join(tiny_crawl, "train"), out="unused")
    return {s.key: s for url in io.input_shards() for s in iter_shard(url) if isinstance(s, Sample)}


@pytest.fixture(scope="module")
def captioner_dir(random_captioner):
    return random_captioner


def make_run(tmp_path, tiny_crawl, captioner_dir, crawl_samples, every: int = 3) -> tuple[StageIO, dict]:
    """A run folder whose sample stage selected every `every`-th sample of the crawl."""
    run_io = StageIO(input=os.path.join(tiny_crawl, "train"), out=str(tmp_path), captioner=captioner_dir)
    chosen = sorted(crawl_samples)[::every]
    table = pa.table({"key": chosen, "shard": [crawl_samples[k].shard for k in chosen],
                      "cluster": list(range(len(chosen)))})
    Path(run_io.sample_dir).mkdir(parents=True)
    pq.write_table(table, os.path.join(run_io.sample_dir, "selected.parquet"))
    by_shard: dict[str, set[str]] = {}
    for k in chosen:
        by_shard.setdefault(crawl_samples[k].shard, set()).add(k)
    return run_io, by_shard


def read_output(run_io: StageIO, stem: str):
    return pq.read_table(io.BytesIO(Path(caption.output_url(run_io, stem)).read_bytes())).to_pydict()


def test_captions_exactly_the_selected_keys(tmp_path, tiny_crawl, captioner_dir, crawl_samples):
    run_io, by_shard = make_run(tmp_path, tiny_crawl, captioner_dir, crawl_samples)
    assert len(by_shard) == 2  # the tiny crawl has two train shards
    result = caption.run(CFG, run_io)
    assert not result.skipped
    assert result.metrics["captions_written"] == sum(len(v) for v in by_shard.values())
    assert result.metrics["captions_per_second"] > 0 and result.metrics["shards_done"] == 2
    assert sorted(os.listdir(run_io.caption_dir)) == sorted(Path(caption.output_url(run_io, s)).name for s in by_shard)
    model, tokenizer = cap.load_captioner(captioner_dir)
    for stem, keys in by_shard.items():
        out = read_output(run_io, stem)
        assert set(out) == {"key", "original", "generated", "confidence", "grounding"}
        assert out["original"] == [crawl_samples[k].caption for k in out["key"]]
        assert sorted(out["key"]) == sorted(keys) and len(out["key"]) == len(keys)
        assert all(isinstance(g, str) for g in out["generated"])
        # the stage's captions are the model's beam-search captions of exactly those images
        first = out["key"][:3]
        pixels = preprocess.image_to_tensor([crawl_samples[k].image for k in first], 32)
        expected = model.generate_captions(pixels, tokenizer, num_beams=2, min_new_tokens=2, max_new_tokens=6)
        assert out["generated"][:3] == expected
        # confidence: the mean token log-probability of that caption given its own image (teacher-forced)
        ids, mask = preprocess.tokenize_captions(tokenizer, expected, model.arch["max_tokens"])
        own = -model.per_sample_loss(pixels, ids, mask)
        assert out["confidence"][:3] == pytest.approx(own.tolist(), abs=1e-4)
        assert all(c <= 0 for c in out["confidence"])


def test_grounding_is_zero_for_a_caption_that_ignores_the_image(captioner_dir, crawl_samples):
    """The same image twice: another image of the batch explains the caption equally well."""
    model, tokenizer = cap.load_captioner(captioner_dir)
    image = next(iter(crawl_samples.values())).image
    pixels = preprocess.image_to_tensor([image, image], 32)
    quantized = model.encode(pixels).quantized
    confidence, grounding = caption.caption_confidence(model, tokenizer, quantized, ["a red circle", "a red circle"])
    assert grounding == pytest.approx([0.0, 0.0], abs=1e-5)
    assert confidence[0] == pytest.approx(confidence[1])
    confidence, grounding = caption.caption_confidence(model, tokenizer, quantized[:1], ["a red circle"])
    assert grounding[0] != grounding[0]  # a lone caption has nothing to compare with: NaN, the gate fails it


def test_captions_the_selection_made_are_shipped_as_they_were_scored(tmp_path, tiny_crawl, captioner_dir,
                                                                     crawl_samples):
    """A kept sample the selection already captioned (the filter's repair: recaptioned.parquet) keeps that caption
    and its scores; only the others are captioned."""
    run_io, by_shard = make_run(tmp_path, tiny_crawl, captioner_dir, crawl_samples, every=4)
    chosen = sorted(k for keys in by_shard.values() for k in keys)
    scored = chosen[::3] + [sorted(crawl_samples)[1]]  # and one the selection did not keep: never shipped
    scored = scored[::-1]  # not the shards' order: the rows come back in the order asked for
    made = caption.caption_rows(CFG, run_io, scored, [crawl_samples[k].shard for k in scored], "test")
    assert made.schema == caption.CAPTION_SCHEMA and made["key"].to_pylist() == scored
    assert made["original"].to_pylist() == [crawl_samples[k].caption for k in scored]
    made = made.set_column(2, "generated", pa.array([f"scored {k}" for k in made["key"].to_pylist()]))
    pq.write_table(made, os.path.join(run_io.sample_dir, "recaptioned.parquet"))
    result = caption.run(CFG, run_io)
    assert result.metrics["captions_reused"] == len(chosen[::3])
    assert result.metrics["captions_written"] == len(chosen) - len(chosen[::3])
    for stem, keys in by_shard.items():
        out = read_output(run_io, stem)
        assert sorted(out["key"]) == sorted(keys)
        for key, text in zip(out["key"], out["generated"]):
            assert (text == f"scored {key}") == (key in scored)


def test_rerun_skips_done_shards_and_redoes_only_missing(tmp_path, tiny_crawl, captioner_dir, crawl_samples):
    run_io, by_shard = make_run(tmp_path, tiny_crawl, captioner_dir, crawl_samples, every=5)
    caption.run(CFG, run_io)
    files = {s: Path(caption.output_url(run_io, s)) for s in by_shard}
    stamps = {s: f.stat().st_mtime_ns for s, f in files.items()}
    again = caption.run(CFG, run_io)
    assert again.skipped and again.metrics["captions_written"] == 0
    assert {s: f.stat().st_mtime_ns for s, f in files.items()} == stamps
    first, second = sorted(by_shard)
    files[second].unlink()
    redo = caption.run(CFG, run_io)
    assert not redo.skipped
    assert redo.metrics["shards_done"] == 1 and redo.metrics["shards_skipped"] == 1
    assert redo.metrics["captions_written"] == len(by_shard[second])
    assert files[first].stat().st_mtime_ns == stamps[first]
    assert sorted(read_output(run_io, second)["key"]) == sorted(by_shard[second])


def test_workers_split_the_source_shards(tmp_path, tiny_crawl, captioner_dir, crawl_samples):
    run_io, by_shard = make_run(tmp_path, tiny_crawl, captioner_dir, crawl_samples, every=7)
    stems = sorted(by_shard)
    first = caption.run(CFG, run_io, shard_index=0, num_shards=2)
    assert os.listdir(run_io.caption_dir) == [Path(caption.output_url(run_io, stems[0])).name]
    assert first.metrics["captions_written"] == len(by_shard[stems[0]])
    second = caption.run(CFG, run_io, shard_index=1, num_shards=2)
    assert second.metrics["captions_written"] == len(by_shard[stems[1]])
    assert sorted(os.listdir(run_io.caption_dir)) == [Path(caption.output_url(run_io, s)).name for s in stems]
    with pytest.raises(ValueError, match="shard-index"):
        caption.run(CFG, run_io, shard_index=2, num_shards=2)


def test_errors_say_what_to_fix(tmp_path, tiny_crawl, captioner_dir, crawl_samples):
    run_io = StageIO(input=os.path.join(tiny_crawl, "train"), out=str(tmp_path / "a"), captioner=captioner_dir)
    with pytest.raises(ConfigError, match="sample stage"):
        caption.run(CFG, run_io)
    run_io, _ = make_run(tmp_path / "b", tiny_crawl, captioner_dir, crawl_samples)
    table = pa.table({"key": ["0000001"], "shard": ["99999"], "cluster": [0]})
    pq.write_table(table, os.path.join(run_io.sample_dir, "selected.parquet"))
    with pytest.raises(ValueError, match="not in --input"):
        caption.run(CFG, run_io)
    shard = next(iter(crawl_samples.values())).shard
    pq.write_table(pa.table({"key": ["nosuchkey"], "shard": [shard], "cluster": [0]}),
                   os.path.join(run_io.sample_dir, "selected.parquet"))
    with pytest.raises(ValueError, match="missing or unreadable"):
        caption.run(CFG, run_io)
    assert not Path(caption.output_url(run_io, shard)).exists()
