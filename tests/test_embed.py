"""embed: one npz per shard with the right feature shapes and dtypes, rejects counted, reruns and
other workers reuse finished parts."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tldr_tasks import content, storage
from tldr_tasks.config import FEATURES, Config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import ShardWriter
from tldr_tasks.models.captioner import build_captioner, load_captioner, save_captioner
from tldr_tasks.models.tokenizer import train_tokenizer
from tldr_tasks.preprocess import image_to_tensor
from tldr_tasks.stages import embed

CODEBOOK, IMAGE = 24, 32  # tiny preset: a stride-16 conv stem -> 2x2 patches + CLS = 5 tokens, code_dim 32
TOKENS, CODE_DIM = (IMAGE // 16) ** 2 + 1, 32


def _png(seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _cfg(feature="quantized_mean"):
    cfg = Config(seed=0)
    cfg.captioner.image_size, cfg.captioner.codebook_size, cfg.captioner.codebook_init = IMAGE, CODEBOOK, "random"
    cfg.embed.feature, cfg.embed.batch_size = feature, 4
    cfg.captioner.folds = 1  # one hand-built captioner (tests/test_crossfit.py runs two folds)
    return cfg


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """3 shards of 6 samples; shard 00001 has a corrupt image (key 0008), key 0003 an empty caption."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("embed")
    captions = [f"a red square number {i}" if i != 3 else "" for i in range(18)]
    with ShardWriter(str(root / "crawl"), shard_size=6) as writer:
        for i in range(18):
            image = b"not an image" if i == 8 else _png(i)
            writer.write(f"{i:04d}", {"png": image, "txt": captions[i].encode()})
    torch.manual_seed(0)
    tokenizer = train_tokenizer(captions, 300)
    model = build_captioner(_cfg().captioner, tokenizer)
    save_captioner(model, tokenizer, _cfg().to_dict(), str(root / "captioner"))
    return root


def _io(root, out="run", cache=None):
    return StageIO(input=str(root / "crawl"), out=str(root / out), captioner=str(root / "captioner"),
                   embed_cache=str(root / cache) if cache else None)


@pytest.mark.parametrize("feature", FEATURES)
def test_features_have_right_shape_and_dtype(crawl, feature):
    io = _io(crawl, out=f"run-{feature}")
    result = embed.run(_cfg(feature), io)
    # parts are named by the shard's name and content: {stem}-{md5 of the tar}.npz
    assert len(result.outputs) == 3 and all(
        u.endswith(f"-{feature}/{i:05d}-{content.file_md5(str(crawl / 'crawl' / f'{i:05d}.tar'))}.npz")
        for i, u in enumerate(result.outputs))
    part = embed.load_part(result.outputs[1])
    assert part.keys.tolist() == ["0006", "0007", "0009", "0010", "0011"]  # 0008 rejected
    expected = {"quantized_mean": ((5, CODE_DIM), np.float16), "cls": ((5, CODE_DIM), np.float16),
                "code_histogram": ((5, CODEBOOK), np.float16), "code_index_pca": ((5, TOKENS), np.int16),
                "tower": ((5, 1280), np.float16)}[feature]
    assert (part.features.shape, part.features.dtype) == expected
    assert part.loss.dtype == np.float32 and np.isfinite(part.loss).all() and (part.loss > 0).all()
    if feature == "code_histogram":
        assert np.allclose(part.features.astype(np.float32).sum(axis=1), 1.0, atol=1e-2)
    if feature == "code_index_pca":
        assert part.features.min() >= 0 and part.features.max() < CODEBOOK
    if feature == "cls":
        assert np.allclose(np.linalg.norm(part.features.astype(np.float32), axis=1), 1.0, atol=1e-2)


def test_quantized_mean_matches_the_model(crawl):
    result = embed.run(_cfg("quantized_mean"), _io(crawl, out="run-check"))
    part = embed.load_part(result.outputs[0])
    model, _ = load_captioner(str(crawl / "captioner"))
    image = Image.open(io.BytesIO(_png(2))).convert("RGB")
    with torch.inference_mode():
        expected = model.encode(image_to_tensor([image], IMAGE)).quantized.mean(dim=1)[0].numpy()
    row = part.keys.tolist().index("0002")
    np.testing.assert_allclose(part.features[row].astype(np.float32), expected, atol=2e-3)
    # the empty caption has no loss; every other sample has one
    assert np.isnan(part.loss[part.keys.tolist().index("0003")])
    assert np.isfinite(np.delete(part.loss, part.keys.tolist().index("0003"))).all()


def test_the_tower_feature_and_the_builtin_reference_share_one_sharded_tower_pass(crawl, monkeypatch):
    """With the defaults (the `tower` feature, the clip_score filter's built-in reference) each embed worker
    writes the towers' cached features of its own shards; the `tower` feature is their pooled image vector, and
    the stages after embed read them without running a tower."""
    from tldr_tasks.models import clip, towers_clip
    from tldr_tasks.scoring import REFERENCE_PRESET

    cfg = _cfg("tower")
    assert cfg.sample.filter == "clip_score" and not cfg.sample.clip_model  # the defaults this test is about
    io = _io(crawl, out="run-one-tower-pass", cache="one-tower-pass")
    preset = clip.load_preset(REFERENCE_PRESET)
    first = embed.run(cfg, io, shard_index=0, num_shards=2)
    shards = io.input_shards()
    assert first.metrics["tower_feature_shards"] == 2
    assert [storage.exists(towers_clip.part_url(u, preset, io.embed_dir)) for u in shards] == [True, False, True]
    second = embed.run(cfg, io, shard_index=1, num_shards=2)
    assert second.metrics["tower_feature_shards"] == 1
    for url, output in zip(shards, sorted(first.outputs + second.outputs)):
        tower, part = towers_clip.read_part(url, preset, io.embed_dir), embed.load_part(output)
        assert part.keys.tolist() == tower["keys"].tolist()
        np.testing.assert_array_equal(part.features, tower["image"])

    def no_tower(*args, **kwargs):
        raise AssertionError("a tower ran after the embed stage")

    monkeypatch.setattr(towers_clip, "image_features", no_tower)
    keys, features, _, _ = towers_clip.cached_features(shards, preset, io.embed_dir, "input")
    assert len(keys) == 17 and features.shape == (17, 1280)
    # a run whose later stages read no tower features writes none
    plain = _cfg("quantized_mean")
    plain.sample.filter = "none"
    assert not embed.tower_features_needed(plain, {})
    embed.run(plain, _io(crawl, out="run-no-towers", cache="no-towers"))
    assert not storage.exists(towers_clip.features_dir(str(crawl / "no-towers"), preset))


def test_rejects_counted_and_rerun_reuses_parts(crawl):
    io = _io(crawl, out="run-reuse")
    first = embed.run(_cfg(), io)
    assert first.metrics["samples"] == 17 and first.metrics["rejected"] == 1
    assert first.metrics["shards_embedded"] == 3 and first.metrics["shards_reused"] == 0
    assert first.metrics["images_per_s"] > 0 and not first.skipped
    part = embed.load_part(first.outputs[1])
    assert part.reject_keys.tolist() == ["0008"] and part.reject_reasons[0].startswith("undecodable image")
    assert part.meta["samples"] == 5 and part.meta["rejected"] == 1
    before = storage.read_bytes(first.outputs[0])
    again = embed.run(_cfg(), io)
    assert again.skipped and again.metrics["shards_reused"] == 3 and again.metrics["shards_embedded"] == 0
    # an incremental run: one part missing -> only that shard is embedded, the others untouched
    storage.filesystem(first.outputs[2])[0].rm(first.outputs[2])
    third = embed.run(_cfg(), io)
    assert third.metrics["shards_embedded"] == 1 and third.metrics["shards_reused"] == 2
    assert third.metrics["samples"] == 6 and storage.read_bytes(first.outputs[0]) == before
    assert embed.load_part(first.outputs[2]).keys.tolist() == [f"{i:04d}" for i in range(12, 18)]


def test_sharded_workers_cover_every_shard_once(crawl):
    io = _io(crawl, out="run-workers", cache="shared-cache")
    w0 = embed.run(_cfg("code_histogram"), io, shard_index=0, num_shards=2)
    w1 = embed.run(_cfg("code_histogram"), io, shard_index=1, num_shards=2)
    assert [u.rsplit("/", 1)[1][:5] for u in w0.outputs] == ["00000", "00002"]
    assert [u.rsplit("/", 1)[1][:5] for u in w1.outputs] == ["00001"]
    assert w0.metrics["shards_embedded"] + w1.metrics["shards_embedded"] == 3
    assert w0.metrics["samples"] + w1.metrics["samples"] == 17
    directory = embed.parts_dir(_cfg("code_histogram"), io)
    assert directory.startswith(str(crawl / "shared-cache"))
    assert storage.listdir(directory, ".npz") == sorted(w0.outputs + w1.outputs)
    keys = np.concatenate([embed.load_part(u).keys for u in storage.listdir(directory, ".npz")])
    assert len(keys) == len(set(keys.tolist())) == 17
    with pytest.raises(ValueError, match="shard-index"):
        embed.run(_cfg("code_histogram"), io, shard_index=2, num_shards=2)


def test_new_content_under_an_old_name_is_embedded_again_and_reported_replaced(crawl, tmp_path):
    shutil.copytree(crawl / "crawl", tmp_path / "crawl")
    cache = str(tmp_path / "cache")  # shared by both runs, as tldr_compress shares <output root>/embed

    def run(name):
        io = StageIO(input=str(tmp_path / "crawl"), out=str(tmp_path / name), captioner=str(crawl / "captioner"),
                     embed_cache=cache)
        return io, embed.run(_cfg(), io)

    first_io, first = run("first")
    assert {s["status"] for s in embed.shard_status(first_io).values()} == {"embedded"}
    old_digest = content.file_md5(str(tmp_path / "crawl" / "00001.tar"))
    # a second crawl's 00001.tar: same name, other samples
    with ShardWriter(str(tmp_path / "other"), shard_size=6) as writer:
        for i in range(4):
            writer.write(f"x{i:03d}", {"png": _png(100 + i), "txt": b"a blue circle"})
    shutil.copy(tmp_path / "other" / "00000.tar", tmp_path / "crawl" / "00001.tar")

    second_io, second = run("second")
    assert second.metrics["shards_embedded"] == 1 and second.metrics["shards_replaced"] == 1
    assert second.metrics["shards_reused"] == 2 and second.metrics["samples"] == 4
    status = embed.shard_status(second_io)
    assert {s: r["status"] for s, r in status.items()} == {"00000": "reused", "00001": "replaced", "00002": "reused"}
    assert status["00001"]["replaced_digests"] == [old_digest]
    assert second.outputs[1] != first.outputs[1]
    assert embed.load_part(second.outputs[1]).keys.tolist() == ["x000", "x001", "x002", "x003"]
    assert embed.load_part(first.outputs[1]).keys.tolist()[0] == "0006"  # the old content's part is kept


def test_a_shard_that_cannot_be_opened_becomes_a_reject(crawl, tmp_path):
    """A folder named like a shard (or a file without read permission) among readable shards: its
    part records one whole-shard reject with the reason; the other shards are embedded."""
    shutil.copytree(crawl / "crawl", tmp_path / "crawl")
    (tmp_path / "crawl" / "00003.tar").mkdir()
    io = StageIO(input=str(tmp_path / "crawl"), out=str(tmp_path / "run"), captioner=str(crawl / "captioner"))
    result = embed.run(_cfg(), io)
    assert result.metrics["samples"] == 17 and result.outputs[3].endswith(f"00003-{content.UNREADABLE}.npz")
    part = embed.load_part(result.outputs[3])
    assert part.keys.tolist() == [] and part.reject_keys.tolist() == [""]
    assert "IsADirectoryError" in part.reject_reasons[0]
