"""data/spool: shards decoded once to local files and read back by index, exactly as decoded in memory;
CLIP trains to the same weights from a spool as from an array, and its tokenizer reads a stream."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tldr_tasks import storage
from tldr_tasks.data.shards import Sample, iter_shard
from tldr_tasks.data.spool import write_spool
from tldr_tasks.models import clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def decoded(tiny_crawl):
    samples = [s for url in storage.expand_shards(f"{tiny_crawl}/train") for s in iter_shard(url)
               if isinstance(s, Sample)]
    return samples, np.stack([np.asarray(s.image.resize((24, 24), Image.BICUBIC), dtype=np.uint8) for s in samples])


@pytest.fixture(scope="module")
def spooled(tiny_crawl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("spool")
    return write_spool(storage.expand_shards(f"{tiny_crawl}/train"), 24, str(folder), "train")  # 32 px: resized


def test_a_spool_reads_back_what_was_decoded(decoded, spooled):
    samples, images = decoded
    assert len(spooled) == len(samples) == 200 and spooled.images.shape == (200, 24, 24, 3)
    assert np.array_equal(np.asarray(spooled.images), images)
    assert list(spooled.keys) == [s.key for s in samples]
    assert list(spooled.captions) == [s.caption for s in samples]
    assert list(spooled.metas) == [s.meta for s in samples]
    assert spooled.truthful and list(spooled.truths()) == [s.meta["truth"] for s in samples]
    # scattered, contiguous, negative and single reads
    index = np.array([7, 3, 199, 3])
    assert np.array_equal(spooled.images[index], images[index])
    assert np.array_equal(spooled.images[10:20], images[10:20])
    assert np.array_equal(spooled.images[-1], images[-1])
    assert spooled.captions[5] == samples[5].caption and spooled.captions[-2:] == [s.caption for s in samples[-2:]]
    with pytest.raises(IndexError):
        spooled.images[np.array([200])]


def test_views_compose_without_copying_the_data(decoded, spooled):
    samples, images = decoded
    first = spooled.take(range(199, -1, -2))  # every other sample, backwards
    second = first.take([0, 5, 6])
    rows = np.arange(199, -1, -2)[[0, 5, 6]]
    assert np.array_equal(second.images[np.arange(3)], images[rows])
    assert list(second.keys) == [samples[r].key for r in rows]
    assert list(second.metas.field("truth")) == [samples[r].meta["truth"] for r in rows]
    assert list(second.metas.field("missing", "-")) == ["-"] * 3
    assert [c.shape[0] for c in first.images.chunks(rows=40)] == [40, 40, 20]


def test_a_crawl_without_ground_truth_is_not_truthful(tmp_path, decoded):
    from tldr_tasks.data.shards import encode_json, write_tar

    samples, _ = decoded
    rows = [(s.key, {"png": s.image_bytes, "txt": s.caption.encode(), "json": encode_json({"n": i})})
            for i, s in enumerate(samples[:3])]
    write_tar(str(tmp_path / "00000.tar"), rows)
    split = write_spool([str(tmp_path / "00000.tar")], 24, str(tmp_path / "spool"), "x")
    assert len(split) == 3 and not split.truthful and split.truths() is None
    empty = write_spool([], 24, str(tmp_path / "empty"), "x")
    assert len(empty) == 0 and empty.images[np.array([], dtype=int)].shape == (0, 24, 24, 3)


def test_clip_trains_the_same_from_a_spool_as_from_an_array(decoded, tiny_crawl, tmp_path):
    samples = decoded[0]
    images = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])  # 32 px, the micro preset's
    spooled = write_spool(storage.expand_shards(f"{tiny_crawl}/train"), 32, str(tmp_path), "train")
    captions = [s.caption for s in samples]
    tok = clip.CaptionTokenizer.train(captions)
    from_array, _ = clip.train_clip(images, captions, tok, steps=6, batch_size=32, seed=3, preset="micro")
    from_spool, _ = clip.train_clip(spooled.images, spooled.captions, tok, steps=6, batch_size=32, seed=3,
                                    preset="micro")
    assert all(torch.equal(a, b) for a, b in zip(from_array.state_dict().values(), from_spool.state_dict().values()))
    assert torch.equal(clip.embed_images(from_spool, spooled.images), clip.embed_images(from_array, images))


def test_the_tokenizer_vocabulary_does_not_depend_on_caption_order(decoded):
    captions = [s.caption for s in decoded[0]] * 2
    shuffled = list(captions)
    random.Random(0).shuffle(shuffled)
    for vocab_size in (8000, 40):  # all words, and a cut through words of equal counts
        one = clip.CaptionTokenizer.train(iter(captions), vocab_size=vocab_size)
        other = clip.CaptionTokenizer.train(iter(shuffled), vocab_size=vocab_size)
        assert one.to_json() == other.to_json()


def test_a_full_scratch_disk_says_what_to_change(tiny_crawl, tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: (
        FullDisk(real_open(path, mode, *a, **k)) if str(path).startswith(str(tmp_path)) and "w" in mode
        else real_open(path, mode, *a, **k)))
    with pytest.raises(OSError, match="scratch folder .* is full after 0 samples.*TMPDIR.*scratch_gb"):
        write_spool(storage.expand_shards(f"{tiny_crawl}/train"), 24, str(tmp_path / "spool"), "x")
