"""The pretrained towers load from the installed packages with the network unreachable, and are the
real ImageNet / sentence models: known outputs on a real photo, a bundled drawing and sentence pairs."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tldr_tasks.config import ConfigError
from tldr_tasks.models import towers
from tldr_tasks.preprocess import image_to_tensor

DATA = Path(__file__).parent / "data"
AMBULANCE, MILITARY_UNIFORM = 407, 652  # ImageNet-1k class indices


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection fails, as on a cluster node without a route to a model hub."""
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _white_background(path) -> Image.Image:
    image = Image.open(path).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


@pytest.mark.parametrize("name", towers.IMAGE_TOWERS)
def test_image_tower_knows_imagenet(name, no_network):
    import matplotlib.cbook

    tower = towers.load_image_tower(name)
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    size = towers.TOWERS[name].native_size
    with torch.no_grad():
        photo_top3 = tower.logits(image_to_tensor([photo], size)).topk(3).indices[0].tolist()
        drawing = _white_background(DATA / "noto-ambulance-1f691.png")
        drawing_top1 = tower.logits(image_to_tensor([drawing], 128)).argmax()
    assert MILITARY_UNIFORM in photo_top3  # Grace Hopper in uniform, the classic ImageNet check
    assert drawing_top1.item() == AMBULANCE
    grid = tower(image_to_tensor([photo], 128))
    assert grid.shape == (1, 1280, 4, 4) and not grid.requires_grad


def test_image_tower_stays_frozen():
    tower = towers.load_image_tower("efficientnet-lite0")
    tower.train()
    assert not tower.training and not tower.net.training
    assert not any(p.requires_grad for p in tower.parameters())


def test_text_tower_orders_by_meaning(no_network):
    text = towers.load_text_tower("minilm-l6")
    vectors = text.embed(["a dog runs on the grass", "a puppy playing in a field", "quarterly stock market report",
                          "a red circle on a blue background", "blue background with a red round shape"])
    assert vectors.shape == (5, 384)
    np.testing.assert_allclose(vectors.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.t()
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 0]


def test_text_tower_from_a_folder(no_network):
    folder = towers.text_folder("minilm-l6")
    same = towers.load_text_tower(folder).embed(["a green triangle"])
    assert torch.allclose(same, towers.load_text_tower("minilm-l6").embed(["a green triangle"]))


def test_unknown_towers_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="efficientnet-lite0"):
        towers.check_image_tower("resnet50", "embed.tower")
    with pytest.raises(ConfigError, match="minilm-l6"):
        towers.text_folder(str(tmp_path))


def test_hub_ids_do_not_download_here(no_network):
    with pytest.raises(OSError):
        towers.load_text_tower("hf:sentence-transformers/all-MiniLM-L6-v2")
