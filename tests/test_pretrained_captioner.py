"""The `pretrained` captioner preset: a frozen EfficientNet-Lite grid, cached once per shard, a VQ codebook and a
decoder started from MiniLM; and the `tower` clustering feature."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tldr_tasks.config import CaptionerConfig, load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.shards import Sample, iter_shard
from tldr_tasks.models import captioner as cap
from tldr_tasks.models import towers
from tldr_tasks.preprocess import image_to_tensor
from tldr_tasks.stages import embed
from tldr_tasks.stages import train_captioner as tc
from tldr_tasks.storage import expand_shards

torch.set_num_threads(1)

OVERRIDES = ["captioner.preset=pretrained", "captioner.image_size=64", "captioner.epochs=1",
             "captioner.batch_size=32", "captioner.codebook_size=64", "captioner.warmup_steps=2",
             "captioner.folds=2", "embed.feature=tower"]


def shards(tiny_crawl: str) -> list[str]:
    return expand_shards(os.path.join(tiny_crawl, "train"))


@pytest.fixture
def tower_calls(monkeypatch):
    """Counts the images the image tower runs on."""
    calls = []
    original = towers.ImageTower.forward

    def counting(self, pixels):
        calls.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(towers.ImageTower, "forward", counting)
    return calls


def test_token_cache_computes_each_shard_once_and_matches_the_tower(tiny_crawl, tmp_path, tower_calls):
    urls = shards(tiny_crawl)
    readable = sum(isinstance(s, Sample) for url in urls for s in iter_shard(url))
    cache = towers.TokenCache("efficientnet-lite0", 64, str(tmp_path))
    cache.register(urls)
    assert sum(tower_calls) == readable
    again = towers.TokenCache("efficientnet-lite0", 64, str(tmp_path))
    again.register(urls)
    assert sum(tower_calls) == readable  # the second cache read the files: the tower did not run again

    samples = [s for s in iter_shard(urls[1]) if isinstance(s, Sample)][:5]
    cached = again.lookup([f"{s.shard}/{s.key}" for s in samples])
    with torch.no_grad():
        direct = towers.image_tokens(towers.load_image_tower("efficientnet-lite0")(image_to_tensor(
            [s.image for s in samples], 64)))
    assert cached.shape == (5, 5, 1280)  # 2x2 grid cells and their mean
    torch.testing.assert_close(cached, direct, atol=0.02, rtol=0.01)  # float16 storage


def test_token_cache_is_addressed_by_content(tiny_crawl, tmp_path):
    import shutil

    copy = tmp_path / "crawl"
    shutil.copytree(os.path.join(tiny_crawl, "train"), copy)
    cache = towers.TokenCache("efficientnet-lite0", 64, str(tmp_path / "cache"))
    cache.ensure([str(copy / "00000.tar")])
    first = sorted(os.listdir(cache.folder))
    shutil.copy(copy / "00001.tar", copy / "00000.tar")  # same name, other images
    cache.ensure([str(copy / "00000.tar")])
    assert len(sorted(os.listdir(cache.folder))) == 2 * len(first)


def test_the_preset_starts_from_minilm_and_keeps_the_tower_out_of_its_weights():
    tokenizer = cap.pretrained_tokenizer(towers.text_folder("minilm-l6"))
    cfg = CaptionerConfig(preset="pretrained", image_size=64, codebook_size=32, codebook_init="random")
    model = cap.build_captioner(cfg, tokenizer)
    minilm = towers.load_text_tower("minilm-l6").bert
    assert model.decoder.config.num_hidden_layers == 3
    torch.testing.assert_close(model.decoder.bert.encoder.layer[2].attention.self.query.weight,
                               minilm.encoder.layer[2].attention.self.query.weight)
    assert not model.decoder.get_input_embeddings().weight.requires_grad
    assert not any(name.startswith(("encoder.", "stem.", "tower.")) for name in model.state_dict())
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = model.frozen_tokens(pixels)
    assert tokens.shape == (2, 5, 1280)
    torch.testing.assert_close(model.encode(pixels).quantized, model.encode(None, tokens).quantized)


@pytest.mark.slow
def test_training_reads_cached_tokens_and_embed_reuses_them(tiny_crawl, tmp_path, tower_calls):
    cfg = load_config(None, OVERRIDES)
    io = StageIO(input=os.path.join(tiny_crawl, "train"), out=str(tmp_path))
    readable = sum(isinstance(s, Sample) for url in shards(tiny_crawl) for s in iter_shard(url))
    before = {k: v.clone() for k, v in towers.load_image_tower("efficientnet-lite0").state_dict().items()}
    tc.run(cfg, io)
    # every image once for the cache, plus the 256-image codebook-usage check of each fold's export
    assert sum(tower_calls) <= readable + 2 * 256
    after = towers.load_image_tower("efficientnet-lite0").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: not one weight moved
    model, _ = cap.load_captioner(io.captioner_dir)
    assert model.arch["image_tower"] == "efficientnet-lite0"

    calls = len(tower_calls)
    embed.run(cfg, io)
    assert len(tower_calls) == calls  # the tokens (and the `tower` feature) came from the cache
    part = embed.load_part(embed.part_url(embed.parts_dir(cfg, io), shards(tiny_crawl)[0]))
    samples = {s.key: s for s in iter_shard(shards(tiny_crawl)[0]) if isinstance(s, Sample)}
    assert part.features.shape == (len(samples), 1280)
    with torch.no_grad():
        pooled = towers.load_image_tower("efficientnet-lite0").pooled(
            image_to_tensor([samples[k].image for k in part.keys[:4]], 64))
    np.testing.assert_allclose(part.features[:4].astype(np.float32), pooled.numpy(), atol=0.02, rtol=0.01)
    captioned = np.array([bool(samples[k].caption.strip()) for k in part.keys])
    assert np.isnan(part.loss[~captioned]).all() and np.isfinite(part.loss[captioned]).all()


def test_a_users_weights_file_gets_a_cache_of_its_own(tmp_path):
    weights = tmp_path / "lite0.pth"
    weights.write_bytes(towers.image_weights("efficientnet-lite0").read_bytes())
    first = towers.TokenCache(f"efficientnet-lite0:{weights}", 128, str(tmp_path)).folder
    weights.write_bytes(weights.read_bytes() + b"\0")  # other weights at the same path
    second = towers.TokenCache(f"efficientnet-lite0:{weights}", 128, str(tmp_path)).folder
    packaged = towers.TokenCache("efficientnet-lite0", 128, str(tmp_path)).folder
    assert len({first, second, packaged}) == 3


def test_wordpiece_captions_come_back_spaced_as_the_crawl_writes_them():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(towers.text_folder("minilm-l6"))
    for caption in ("kiss: woman, man with medium-dark skin tone, a family emoji from the people & body set",
                    "t-shirt (it's blue) on a 3/4 view", "a large purple star at the top and a small yellow cross"):
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert cap.join_wordpiece_punctuation(decoded) == caption.lower()
