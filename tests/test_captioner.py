"""The codebook captioner: shapes, straight-through VQ, keyword codebook init, save/load, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from tldr_tasks import preprocess
from tldr_tasks.config import CaptionerConfig
from tldr_tasks.models import captioner as cap
from tldr_tasks.models.tokenizer import train_tokenizer

torch.set_num_threads(1)

COLOURS = {"red": (220, 30, 30), "green": (30, 175, 45), "blue": (35, 70, 235), "yellow": (245, 225, 35)}
CAPTIONS = [f"a {c} {s} on a grey background" for c in COLOURS for s in ("circle", "square")]


def scene(caption: str, size: int = 32) -> Image.Image:
    _, colour, shape = caption.split()[:3]
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS * 4 + ["IMG_2041.JPG", "click to enlarge"], vocab_size=400)


def small_cfg(**kw) -> CaptionerConfig:
    return CaptionerConfig(**{"image_size": 32, "codebook_size": 64, "codebook_init": "random", **kw})


def test_tokenizer_and_tokenize_captions(tokenizer):
    ids, mask = preprocess.tokenize_captions(tokenizer, ["a red circle", "one two three four five six seven"],
                                             max_tokens=4)
    assert ids.dtype == torch.long and ids.shape == mask.shape
    assert ids[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    lengths = mask.sum(1).tolist()
    assert lengths[1] == 6  # bos + 4 capped tokens + eos
    assert ids[1, 5] == tokenizer.eos_token_id
    assert ids[0, lengths[0] - 1] == tokenizer.eos_token_id
    assert (ids[0, lengths[0]:] == tokenizer.pad_token_id).all() and (mask[0, lengths[0]:] == 0).all()
    assert tokenizer.decode(ids[0, 1: lengths[0] - 1]).strip() == "a red circle"


def test_image_to_tensor_range_and_resize():
    images = [Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("L", (32, 32), 0)]
    x = preprocess.image_to_tensor(images, 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.ones(32, 32)) and torch.allclose(x[0, 1], -torch.ones(32, 32))
    assert torch.allclose(x[1], -torch.ones(3, 32, 32))


def test_shapes_and_quantisation(tokenizer):
    torch.manual_seed(0)
    model = cap.build_captioner(small_cfg(), tokenizer)
    pixels = preprocess.image_to_tensor([scene(c) for c in CAPTIONS[:3]], 32)
    enc = model.encode(pixels)
    stride = model.arch["vision"]["patch_size"] * 2 ** len(model.arch["stem_channels"])  # pixels per token
    tokens = (32 // stride) ** 2 + 1  # the grid plus CLS
    dim = model.arch["code_dim"]
    assert enc.quantized.shape == (3, tokens, dim)
    assert enc.codes.shape == (3, tokens) and enc.codes.dtype == torch.long
    assert int(enc.codes.min()) >= 0 and int(enc.codes.max()) < 64
    assert enc.cls.shape == (3, dim)
    assert torch.allclose(enc.cls.norm(dim=-1), torch.ones(3), atol=1e-5)
    # every token is exactly (in value) the unit-norm code vector its index names
    codebook = F.normalize(model.codebook.weight, dim=-1)
    assert torch.allclose(enc.quantized, codebook[enc.codes], atol=1e-6)
    assert enc.vq_loss.ndim == 0
    model.eval()  # without the (training-only) entropy term the VQ loss is two squared distances
    assert 0 <= float(model.encode(pixels).vq_loss.detach()) <= 4 * (1 + model.codebook.beta)
    ids, mask = preprocess.tokenize_captions(tokenizer, CAPTIONS[:3], 30)
    per_sample = model.per_sample_loss(pixels, ids, mask)
    assert per_sample.shape == (3,) and torch.isfinite(per_sample).all()
    losses = model.losses(pixels, ids, mask)
    # the per-sample losses average to the LM loss when all captions have the same length
    assert torch.allclose(losses["loss"], losses["lm_loss"] + losses["vq_loss"])
    assert torch.allclose(model(pixels, ids, mask), losses["loss"])


def test_straight_through_gradient(tokenizer):
    torch.manual_seed(0)
    model = cap.build_captioner(small_cfg(), tokenizer)
    pixels = preprocess.image_to_tensor([scene(c) for c in CAPTIONS[:4]], 32)
    ids, mask = preprocess.tokenize_captions(tokenizer, CAPTIONS[:4], 30)
    model.losses(pixels, ids, mask)["lm_loss"].backward()
    # the LM loss reaches the encoder through the argmax (straight-through) ...
    patch_grad = model.encoder.embeddings.patch_embeddings.projection.weight.grad
    assert patch_grad is not None and float(patch_grad.abs().sum()) > 0
    # ... but not the codebook: codes move only by the VQ loss
    assert model.codebook.weight.grad is None or float(model.codebook.weight.grad.abs().sum()) == 0
    model.zero_grad()
    model.codebook.entropy_weight = 0.0  # the entropy term reaches every code through its softmax
    model.encode(pixels).vq_loss.backward()
    used = model.encode(pixels).codes.unique()
    grad = model.codebook.weight.grad
    assert float(grad[used].abs().sum()) > 0
    unused = torch.ones(64, dtype=torch.bool)
    unused[used] = False
    assert float(grad[unused].abs().sum()) == 0


def test_top_keywords_skip_stopwords_and_order_by_frequency():
    words = cap.top_keywords(["a red circle", "the red square", "red and blue", "IMG_2041.JPG"], 3)
    assert words == ["red", "blue", "circle"]


def test_keyword_codebook_init(tokenizer):
    book = cap.keyword_codebook(CAPTIONS * 3, size=64, dim=32)
    assert book.shape == (64, 32)
    assert torch.allclose(book.norm(dim=-1), torch.ones(64), atol=1e-5)
    keywords = cap.top_keywords(CAPTIONS, 64)  # red, green, blue, yellow, circle, square, grey, background
    gram = book[: len(keywords)] @ book[: len(keywords)].t()
    assert float((gram - torch.eye(len(keywords))).abs().max()) < 0.999  # distinct keyword codes
    assert torch.equal(book, cap.keyword_codebook(CAPTIONS * 3, size=64, dim=32))  # deterministic
    torch.manual_seed(0)
    model = cap.build_captioner(small_cfg(codebook_init="keywords"), tokenizer, CAPTIONS)
    assert torch.allclose(F.normalize(model.codebook.weight, dim=-1), book, atol=1e-6)


def test_minilm_keyword_vectors_are_semantic():
    vectors = cap._minilm_embeddings(["red", "blue", "triangle", "square"])
    assert vectors.shape == (4, 384)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])  # colour ~ colour
    assert float(vectors[2] @ vectors[3]) > float(vectors[2] @ vectors[1])  # shape ~ shape


def test_keyword_codebook_without_minilm(monkeypatch):
    def unavailable(words):
        raise ImportError("not installed")

    monkeypatch.setattr(cap, "_minilm_embeddings", unavailable)
    book = cap.keyword_codebook(CAPTIONS * 3, size=16, dim=8)
    assert book.shape == (16, 8) and torch.isfinite(book).all()
    assert torch.allclose(book.norm(dim=-1), torch.ones(16), atol=1e-5)


def test_save_load_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = cap.build_captioner(small_cfg(), tokenizer).eval()
    url = str(tmp_path / "captioner")
    assert not cap.is_complete(url)
    with pytest.raises(FileNotFoundError, match="train-captioner"):
        cap.load_captioner(url)
    version = cap.save_captioner(model, tokenizer, {"seed": 7}, url)
    assert cap.is_complete(url) and cap.captioner_version(url) == version and len(version) == 12
    loaded, loaded_tok = cap.load_captioner(url)
    pixels = preprocess.image_to_tensor([scene(c) for c in CAPTIONS[:3]], 32)
    ids, mask = preprocess.tokenize_captions(loaded_tok, CAPTIONS[:3], 30)
    assert torch.equal(ids, preprocess.tokenize_captions(tokenizer, CAPTIONS[:3], 30)[0])
    assert torch.equal(loaded.encode(pixels).codes, model.encode(pixels).codes)
    assert torch.allclose(loaded.per_sample_loss(pixels, ids, mask), model.per_sample_loss(pixels, ids, mask))
    assert loaded.generate_captions(pixels, loaded_tok, max_new_tokens=6) == \
        model.generate_captions(pixels, tokenizer, max_new_tokens=6)
    # the decoder's output layer is tied to its token embedding again after loading
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.transformer.wte.weight.data_ptr()
    # saving the same weights again gives the same version (it keys the embedding cache)
    assert cap.save_captioner(loaded, loaded_tok, {"seed": 7}, url) == version


def test_learns_to_caption_and_generation_limits(tokenizer):
    """A few dozen steps on 8 distinct scenes: beam search must reproduce the exact captions."""
    torch.manual_seed(0)
    model = cap.build_captioner(small_cfg(codebook_init="keywords"), tokenizer, CAPTIONS)
    pixels = preprocess.image_to_tensor([scene(c) for c in CAPTIONS], 32)
    ids, mask = preprocess.tokenize_captions(tokenizer, CAPTIONS, 30)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(160):
        optimizer.zero_grad()
        model(pixels, ids, mask).backward()
        optimizer.step()
    assert model.generate_captions(pixels, tokenizer, num_beams=3) == CAPTIONS
    assert model.generate_captions(pixels, tokenizer, num_beams=1) == CAPTIONS
    short = model.generate_captions(pixels[:2], tokenizer, min_new_tokens=1, max_new_tokens=2)
    assert all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) <= 2 for s in short)
    assert model.training  # generation restores the training mode


def test_presets_and_image_size_checks(tokenizer):
    with pytest.raises(ValueError, match="captioner.preset='[a-z]+' is not known"):
        cap.build_captioner(small_cfg(preset="huge"), tokenizer)
    with pytest.raises(ValueError, match="multiple of"):
        cap.build_captioner(small_cfg(image_size=40), tokenizer)
    base = cap.load_preset("base")  # the paper's ViT-B/16: plain patchify, no conv stem
    assert base["vision"]["patch_size"] == 16 and base["vision"]["hidden_size"] == 768
    assert not base.get("stem_channels")
