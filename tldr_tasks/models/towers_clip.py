"""The evaluation model with pretrained towers: EfficientNet-Lite images, MiniLM text, contrastive heads.

Presets (`model_configs/clip-towers-*.json`, chosen by `evaluate.preset` like the from-scratch sizes):
    towers-locked   both towers locked, only two linear heads (to `embed_dim`) and the temperature learn:
                    LiT's cheapest form; with features cached a training is seconds on a CPU.
    towers-lit      locked image, tuned text (LiT, Zhai et al. 2022): the top `text_tuned_layers` of the
                    text tower learn too, at `text_lr`; the preset tunes the top 1 of 6, what a shared 2-core
                    CPU affords (the lower 5 are locked and their output is memoised per caption); on a GPU
                    set it to 6 for LiT's full recipe.
The image tower never learns, so its features are computed once per crawl and cached on disk by shard
content (`cached_features`): arms, seeds and reruns read them. A TowersCLIP takes either those features
(float [N, 1280]) or uint8 images [N, S, S, 3] (then it runs the tower: `scoring.py`'s clip_score).

    model = TowersCLIP(load_preset("towers-locked"))
    image_emb, text_emb = model.encode_images(features), model.encode_texts(["a red circle"])

The same train/score API as the from-scratch CLIP (`models/clip.py`: train_clip, embed_images,
embed_texts, save_clip, load_clip) dispatches here for these presets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tldr_tasks.models.towers import TOWERS, load_image_tower, load_text_tower
from tldr_tasks.preprocess import to_pixels

MEMO_LIMIT = 500_000  # memoised captions per text tower (a 384-float vector each, ~0.8 GB at the limit)
_TEXT: dict[str, object] = {}  # text tower spec -> TextTower, loaded once per process (shared, read-only below)
_MEMO: dict[tuple, dict[str, torch.Tensor]] = {}  # (spec, max_tokens, locked layers) -> caption -> locked output


def is_towers(preset: dict) -> bool:
    return preset.get("kind") == "towers"


def text_tower(spec: str):
    if spec not in _TEXT:
        _TEXT[spec] = load_text_tower(spec).eval().requires_grad_(False)
    return _TEXT[spec]


class TowerTokenizer:
    """What the evaluation shares between arms for these presets: the text tower's own WordPiece (nothing
    is learnt from the crawl). `to_json` names it, for the evaluation's cache keys."""

    def __init__(self, preset: dict):
        self.spec, self.max_tokens = preset["text_tower"], preset["max_text_tokens"]
        self.vocab_size = text_tower(self.spec).tokenizer.vocab_size

    def to_json(self) -> str:
        return json.dumps({"text_tower": self.spec, "max_tokens": self.max_tokens}, sort_keys=True)

    def __call__(self, texts) -> dict[str, torch.Tensor]:
        return text_tower(self.spec).tokenize([t if t.strip() else "" for t in texts], self.max_tokens)


class TowersCLIP(nn.Module):
    """Heads over pretrained towers. The text tower's top `text_tuned_layers` are a trainable copy (the only
    tower part in train mode, with its dropout); below them (all of it when locked) it is the shared locked
    tower, not a submodule (never saved, never trained, always in eval mode), its output memoised per caption."""

    def __init__(self, preset: dict):
        super().__init__()
        self.preset = dict(preset)
        text = text_tower(preset["text_tower"])
        self.tuned = int(preset.get("text_tuned_layers", 0))
        layers = text.bert.encoder.layer
        if not 0 <= self.tuned <= len(layers):
            raise ValueError(f"text_tuned_layers={self.tuned}: the text tower has {len(layers)} layers")
        self.locked_layers = len(layers) - self.tuned
        self.text_layers = nn.ModuleList(copy.deepcopy(layer).requires_grad_(True)
                                         for layer in layers[self.locked_layers:])
        self.image_head = nn.Linear(TOWERS[preset["image_tower"]].width, preset["embed_dim"], bias=False)
        self.text_head = nn.Linear(text.width, preset["embed_dim"], bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict]:
        heads = [self.image_head.weight, self.text_head.weight]
        groups = [{"params": heads, "weight_decay": weight_decay, "lr": lr},
                  {"params": [self.logit_scale], "weight_decay": 0.0, "lr": lr}]
        if self.tuned:
            groups.append({"params": list(self.text_layers.parameters()), "weight_decay": weight_decay,
                           "lr": self.preset["text_lr"]})
        return groups

    def encode_images(self, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings [N, D] of tower features (float [N, C]) or of uint8 images [N, S, S, 3]."""
        rows = torch.as_tensor(np.asarray(rows))
        if rows.dtype == torch.uint8:
            rows = image_features(self.preset["image_tower"], rows, self.preset["image_size"], self.device)
        return self.image_head(rows.to(self.device, torch.float32))

    def encode_texts(self, texts) -> torch.Tensor:
        """Unnormalised embeddings [N, D] of captions: the locked part from the memo, the tuned layers on top."""
        spec, max_tokens = self.preset["text_tower"], self.preset["max_text_tokens"]
        locked = _locked_text(spec, max_tokens, self.locked_layers, [str(t) for t in texts], self.device)
        if not self.tuned:
            return self.text_head(locked)
        hidden, mask = locked
        bert = text_tower(spec).bert
        attention = bert._create_attention_masks(mask, None, hidden, None, None, None)[0]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            for layer in self.text_layers:
                hidden = layer(hidden, attention)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = hidden.float()
        weights = mask[..., None].to(hidden.dtype)
        return self.text_head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def _locked_text(spec: str, max_tokens: int, layers: int, texts: list[str], device):
    """The locked text tower's output for `texts`: the mean-pooled vectors [N, W] when all its layers are
    locked, else (hidden states after `layers` layers [N, T, W], attention mask [N, T]); computed once
    per caption and process (the memo is cleared past MEMO_LIMIT captions)."""
    memo = _MEMO.setdefault((spec, max_tokens, layers), {})
    missing = list(dict.fromkeys(t for t in texts if t not in memo))
    if len(memo) + len(missing) > MEMO_LIMIT:
        memo.clear()
        missing = list(dict.fromkeys(texts))
    tower = text_tower(spec)
    tower.to(device)
    with torch.no_grad():
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            batch = tower.tokenize(chunk, max_tokens)
            # kept on the CPU: a memo seeded from disk parts and one filled on a GPU mix in one batch
            if layers == len(tower.bert.encoder.layer):
                for text, vector in zip(chunk, tower(**batch).float().cpu()):
                    memo[text] = vector
            else:
                states = tower.bert(**batch, output_hidden_states=True).hidden_states[layers].float().cpu()
                for text, state, mask in zip(chunk, states, batch["attention_mask"].cpu()):
                    memo[text] = state[: int(mask.sum())]
    rows = [memo[t] for t in texts]
    if layers == len(tower.bert.encoder.layer):
        return torch.stack(rows).to(device) if rows else torch.zeros(0, tower.width, device=device)
    longest = max((len(r) for r in rows), default=1)
    hidden = torch.zeros(len(rows), longest, tower.width)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        hidden[i, : len(r)], mask[i, : len(r)] = r, 1
    return hidden.to(device), mask.to(device)


def remember_texts(spec: str, max_tokens: int, texts, vectors: np.ndarray) -> None:
    """Seed the locked text memo with vectors read from a features part (the same tower and token limit). They
    replace what the memo holds: a caption's vector is the part's float16 one whether the part was just written or
    read from the cache, so a first run and a rerun train on the same numbers."""
    memo = _MEMO.setdefault((spec, max_tokens, len(text_tower(spec).bert.encoder.layer)), {})
    if len(memo) + len(vectors) <= MEMO_LIMIT:
        for text, vector in zip(texts, torch.from_numpy(np.asarray(vectors, dtype=np.float32))):
            memo[str(text)] = vector


@torch.no_grad()
def image_features(spec: str, images: torch.Tensor | np.ndarray, size: int, device=None, batch_size: int = 64,
                   progress: tqdm | None = None) -> torch.Tensor:
    """Pooled image-tower features float32 [N, C] of uint8 images [N, S, S, 3], resized to `size` (bilinear,
    antialiased) when they are not; on `device` (bf16 autocast on CUDA)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tower = load_image_tower(spec, str(device))
    out = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start:start + batch_size], device)
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(tower.pooled(pixels).float())
        if progress is not None:
            progress.update(len(pixels))
    return torch.cat(out) if out else torch.zeros(0, TOWERS[spec].width, device=device)


# --- features cached per crawl shard -----------------------------------------------------------------

class Rows:
    """Feature rows [N, C] standing where a spool's Pixels stand (take, index, chunks): what a towers preset's
    arms train on, so the evaluation's arms and splits are built the same way for every preset. `pixels`
    (optional) are the same samples' images, taken along, for what needs the picture (the captioner)."""

    def __init__(self, array: np.ndarray, pixels=None):
        self.array = np.asarray(array)
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def take(self, index) -> Rows:
        index = np.asarray(index, dtype=np.int64)
        return Rows(self.array[index], None if self.pixels is None else self.pixels.take(index))

    def __getitem__(self, key) -> np.ndarray:
        return self.array[key]

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)

    def chunks(self, rows: int = 1024):
        for start in range(0, len(self), rows):
            yield self.array[start:start + rows]


_BY_DIGEST: dict[tuple, dict[str, np.ndarray]] = {}  # (image tower, size) -> image sha256 -> feature row


def features_dir(cache: str, preset: dict) -> str:
    """Where the parts of one (image tower, size, text tower, token limit) live below `cache`."""
    from tldr_tasks import storage

    return storage.join(cache, "towers", f"{preset['image_tower']}-{preset['image_size']}px-"
                                         f"{preset['text_tower']}-{preset['max_text_tokens']}tok")


def part_url(url: str, preset: dict, cache: str) -> str:
    """The part `cached_features` keeps for one crawl shard: named by the shard's content."""
    from tldr_tasks import content, storage

    return storage.join(features_dir(cache, preset), content.shard_id(url) + ".npz")


def _write_part(url: str, preset: dict, cache: str, device: torch.device) -> None:
    """Run the towers over one shard and write its part (keys, image sha256, image features, caption vectors;
    float16). An image whose bytes this process has seen is not run again (the compressed shards repeat the
    crawl's images)."""
    from PIL import Image

    from tldr_tasks import storage
    from tldr_tasks.data.shards import Sample, iter_shard
    by_digest = _BY_DIGEST.setdefault((preset["image_tower"], preset["image_size"]), {})
    size, text_spec, max_tokens = preset["image_size"], preset["text_tower"], preset["max_text_tokens"]
    samples = [s for s in iter_shard(url) if isinstance(s, Sample)]
    shard_digests = [hashlib.sha256(s.image_bytes).hexdigest() for s in samples]
    todo = [i for i, d in enumerate(shard_digests) if d not in by_digest]
    with tqdm(total=len(todo), desc=f"image tower {storage.shard_stem(url)}", unit="img", leave=False) as progress:
        pixels = np.zeros((len(todo), size, size, 3), np.uint8)
        for row, i in enumerate(todo):  # as the spool resizes (bicubic)
            image = samples[i].image
            pixels[row] = image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)
        computed = image_features(preset["image_tower"], pixels, size, device, progress=progress).cpu()
    vector_of = {d: by_digest[d] for d in shard_digests if d in by_digest}
    vector_of.update(zip((shard_digests[i] for i in todo), computed.numpy().astype(np.float16)))
    _remember_images(by_digest, vector_of)
    texts = [s.caption for s in samples]
    layers = len(text_tower(text_spec).bert.encoder.layer)
    vectors = (_locked_text(text_spec, max_tokens, layers, texts, device).cpu().numpy() if samples
               else np.zeros((0, TOWERS[text_spec].width)))
    width = TOWERS[preset["image_tower"]].width
    storage.write_npz(part_url(url, preset, cache), {
        "keys": np.asarray([s.key for s in samples], dtype=str),
        "digests": np.asarray(shard_digests, dtype=str),
        "image": (np.stack([vector_of[d] for d in shard_digests]) if samples else np.zeros((0, width)))
        .astype(np.float16),
        "captions": np.asarray(texts, dtype=str), "text": vectors.astype(np.float16)})


def _remember_images(by_digest: dict, vectors: dict) -> None:
    """Memoise image vectors by sha256 while the memo stays under MEMO_LIMIT: an embed worker runs the towers
    over its whole shard group, so the memo must not grow with the crawl."""
    if len(by_digest) + len(vectors) <= MEMO_LIMIT:
        by_digest.update(vectors)


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # the towers run there


def ensure_features(urls: list[str], preset: dict, cache: str, device=None) -> int:
    """Write the parts `cached_features` reads for the shards that have none, without reading any: the embed
    stage's workers call it on their shard group (and their GPU), so the stages that read the features later
    (sample's built-in clip reference, the ratio curve) never run a tower. Returns the shards computed."""
    from tldr_tasks import storage

    todo = [u for u in urls if not storage.exists(part_url(u, preset, cache))]
    for url in tqdm(todo, desc="tower features", unit="shard", leave=False, disable=not todo):
        _write_part(url, preset, cache, _device(device))
    return len(todo)


def read_part(url: str, preset: dict, cache: str) -> dict[str, np.ndarray]:
    """One shard's part as written (float16 image and text vectors)."""
    from tldr_tasks import storage

    fs, path = storage.filesystem(part_url(url, preset, cache))
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
        return {name: data[name] for name in ("keys", "digests", "image", "captions", "text")}


def cached_features(urls: list[str], preset: dict, cache: str, desc: str,
                    device=None) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """(keys, image features float32 [N, C], captions, image sha256) of every accepted sample of `urls`, in
    shard order (the order a spool of the same shards has); the locked text tower's vectors of the captions
    go to the text memo.

    One part per shard, `{features_dir}/{stem}-{md5}.npz` (`_write_part`), named by the shard's content like
    embed's parts: computed once per crawl (by the embed stage where the run needs them: ensure_features), read
    by every arm, seed and rerun."""
    from tldr_tasks import storage

    by_digest = _BY_DIGEST.setdefault((preset["image_tower"], preset["image_size"]), {})
    keys, parts, captions, digests = [], [], [], []
    with tqdm(total=len(urls), desc=f"tower features {desc}", unit="shard", leave=False) as bar:
        for url in urls:
            if not storage.exists(part_url(url, preset, cache)):
                _write_part(url, preset, cache, _device(device))
            part = read_part(url, preset, cache)
            _remember_images(by_digest, dict(zip(part["digests"], part["image"])))
            remember_texts(preset["text_tower"], preset["max_text_tokens"], part["captions"], part["text"])
            keys += [str(k) for k in part["keys"]]
            captions += [str(c) for c in part["captions"]]
            digests += [str(d) for d in part["digests"]]
            parts.append(part["image"].astype(np.float32))
            bar.update()
    width = TOWERS[preset["image_tower"]].width
    return keys, (np.concatenate(parts) if parts else np.zeros((0, width), np.float32)), captions, digests


class PooledFeatures:
    """The `tower` clustering feature read from the parts `cached_features` keeps (the same pooled image
    vectors the built-in clip reference and the ratio curve read), with TokenCache's interface for the embed
    stage: `lookup` gives a one-token grid [B, 1, C] whose token 0 (the grid's mean) is the feature."""

    def __init__(self, preset: dict, cache: str, device=None):
        self.preset, self.cache, self.device = preset, cache, device
        self._rows: dict[str, tuple[dict[str, int], np.ndarray]] = {}  # stem -> (row of key, image vectors)

    def register(self, shard_urls: list[str]) -> None:
        """Make `lookup` know these shards, and only these (computing what is missing): the embed stage holds
        one shard's vectors at a time."""
        from tldr_tasks import storage

        ensure_features(shard_urls, self.preset, self.cache, self.device)
        self._rows = {}
        for url in shard_urls:
            part = read_part(url, self.preset, self.cache)
            self._rows[storage.shard_stem(url)] = ({str(k): i for i, k in enumerate(part["keys"])}, part["image"])

    def lookup(self, keys: list[str]) -> torch.Tensor:
        """Features [B, 1, C] (float32) of "stem/key" names of registered shards, in order."""
        rows = []
        for name in keys:
            stem, key = name.split("/", 1)
            index, image = self._rows[stem]
            rows.append(image[index[key]].astype(np.float32))
        return torch.from_numpy(np.stack(rows))[:, None, :]
