"""CLIP image-text scores for the `clip_score` selection (DataComp's standard baseline).

The score of a pair is the cosine between its image's and its caption's CLIP embeddings. `sample.clip_model`
says where they come from:
    "" (default)   the built-in reference: the pretrained-towers model with its heads aligned on the crawl
                   itself, cross-fitted (REFERENCE_PRESET; heads k train on the samples outside fold k of
                   folds.py and score fold k, so no pair is scored by heads that saw it). Nothing to bring.
    a folder       a CLIP folder (Hugging Face `CLIPModel` with its processor files, or a folder
                   `models.clip.save_clip` wrote, e.g. the benchmark's reference)
    "similarity"   the crawl's own score: img2dataset's `--save_additional_columns '["similarity"]'` carries
                   LAION's score into every KEY.json
`preflight.check_clip_scorer` refuses a choice that cannot score before any stage runs.

    scores, digests = pair_scores(cfg, io, keys)   # float64 [n] (NaN: empty caption), sha256 hex [n]

The digest (sha256 of the stored image bytes) is what exact image dedup compares.
"""

from __future__ import annotations

import hashlib

import numpy as np
from tqdm import tqdm

from tldr_tasks import storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO

BATCH = 256
SIMILARITY = "similarity"  # sample.clip_model: the crawl's own LAION score
REFERENCE_PRESET = "towers-locked"  # the built-in reference: locked pretrained towers, heads aligned on the crawl
REFERENCE_EPOCHS = 20  # of the heads' training data: a reference should not be undertrained (~seconds on a CPU)
REFERENCE_FOLDS = 2  # at least two, so every pair is scored by heads that never saw it


def reference_folds(cfg: Config) -> int:
    """The built-in reference's cross-fitting folds: the captioner's (folds.py), at least REFERENCE_FOLDS."""
    return max(REFERENCE_FOLDS, cfg.captioner.folds)


def train_reference(features, captions, cfg: Config, desc: str = "reference heads"):
    """The built-in reference's heads (REFERENCE_PRESET) trained on tower features [N, C] and their captions:
    REFERENCE_EPOCHS epochs at evaluate.batch_size and evaluate.lr; returns the model in eval mode."""
    from tldr_tasks.models import clip
    from tldr_tasks.models.towers_clip import Rows

    ev = cfg.evaluate
    steps = REFERENCE_EPOCHS * clip.epoch_batches(len(captions), ev.batch_size)
    model, _ = clip.train_clip(Rows(features), list(captions), clip.make_tokenizer(REFERENCE_PRESET, []), steps=steps,
                               batch_size=ev.batch_size, lr=ev.lr, seed=cfg.seed + 1, preset=REFERENCE_PRESET,
                               desc=desc)
    return model


def feature_rows(crawl_keys: list[str], keys) -> np.ndarray:
    """The row of each of `keys` among `cached_features`' keys (`crawl_keys`, input order): a key's first
    occurrence counts, as in cluster. ValueError when a key is not there (the crawl changed since cluster ran)."""
    first: dict[str, int] = {}
    for i, key in enumerate(crawl_keys):
        first.setdefault(key, i)
    missing = [str(k) for k in keys if str(k) not in first]
    if missing:
        raise ValueError(f"{len(missing)} assigned samples (e.g. {', '.join(missing[:5])}) are not in the input "
                         "shards any more: the crawl changed since cluster ran; use a new --out")
    return np.array([first[str(k)] for k in keys], dtype=np.int64)


class TowerReference:
    """The tower-feature scorer (features cached per shard content below io.embed_dir, as the evaluation's) of the
    pairs `keys`: with `model` (a saved pretrained-towers CLIP) one model scores every pair; without, the built-in
    reference, cross-fitted: heads k, trained on the captioned pairs outside fold k, score the pairs of fold k. Heads
    are trained when first needed and kept, so new captions of the same images (sample.misaligned: repair) are
    scored by the heads that scored their originals."""

    def __init__(self, cfg: Config, io: StageIO, keys: np.ndarray, model=None):
        from tldr_tasks.folds import fold_of
        from tldr_tasks.models import clip
        from tldr_tasks.models.towers_clip import cached_features

        preset = model.preset if model is not None else clip.load_preset(REFERENCE_PRESET)
        crawl_keys, self.features, captions, digests = cached_features(io.input_shards(), preset, io.embed_dir,
                                                                       "input")
        self.rows = feature_rows(crawl_keys, keys)
        self.captions = [captions[r] for r in self.rows]
        self.digests = np.array([digests[r] for r in self.rows], dtype=str)
        self.cfg = cfg
        self.heads = {0: model} if model is not None else {}
        folds = 1 if model is not None else reference_folds(cfg)
        self.fold = np.array([fold_of(str(k), folds) for k in keys], dtype=np.int64)
        self.has_text = np.array([bool(c.strip()) for c in self.captions])

    def _heads(self, fold: int):
        if fold not in self.heads:
            train = np.flatnonzero((self.fold != fold) & self.has_text)
            if len(train) < 2:
                raise ValueError(f"the built-in clip_score reference needs at least 2 captioned pairs outside fold "
                                 f"{fold}; the crawl has {len(train)}: give sample.clip_model a CLIP folder")
            self.heads[fold] = train_reference(self.features[self.rows[train]], [self.captions[i] for i in train],
                                               self.cfg, f"reference heads {fold}")
        return self.heads[fold]

    def score(self, positions: np.ndarray, texts: list[str]) -> np.ndarray:
        """The cosine of each pair `positions` (indices into `keys`) with its text in `texts` instead of its
        caption (NaN for an empty text), by the heads that score that pair."""
        import torch

        from tldr_tasks.models import clip

        positions = np.asarray(positions, dtype=np.int64)
        texts = np.array(texts, dtype=object)
        result = np.full(len(positions), np.nan)
        written = np.array([bool(str(t).strip()) for t in texts], dtype=bool)
        for fold in np.unique(self.fold[positions[written]]):
            at = np.flatnonzero(written & (self.fold[positions] == fold))
            model = self._heads(int(fold))
            with torch.no_grad():
                image = clip.embed_images(model, self.features[self.rows[positions[at]]])
                text = clip.embed_texts(model, None, [str(t) for t in texts[at]])
            result[at] = (image * text).sum(-1).double().numpy()
        return result

    def original_scores(self) -> np.ndarray:
        """pair_scores: every pair with its own caption."""
        return self.score(np.arange(len(self.rows)), self.captions)


def tower_reference(cfg: Config, io: StageIO, keys: np.ndarray) -> TowerReference | None:
    """The tower-feature scorer sample.clip_model names: the built-in reference (empty) or a pretrained-towers CLIP
    folder; None for a Hugging Face or other CLIP folder or `similarity`, which score from the shards."""
    if not cfg.sample.clip_model:
        return TowerReference(cfg, io, keys)
    if cfg.sample.clip_model != SIMILARITY and is_towers_folder(cfg.sample.clip_model):
        import torch

        from tldr_tasks.models import clip

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TowerReference(cfg, io, keys, clip.load_clip(cfg.sample.clip_model, device)[0])
    return None


def is_towers_folder(folder: str) -> bool:
    """Whether a CLIP folder holds a pretrained-towers model (save_clip of a towers preset): it scores from the
    cached tower features."""
    import json

    from tldr_tasks.config import load_preset
    from tldr_tasks.models.clip import CLIP_RECORD

    record = storage.join(folder, CLIP_RECORD)
    return storage.exists(record) and load_preset("clip", json.loads(storage.read_text(record))["preset"]).get(
        "kind") == "towers"


class _Scorer:
    """Cosine of image and caption embeddings from a CLIP folder, a batch at a time."""

    def __init__(self, folder: str):
        import torch

        from tldr_tasks.models import clip

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if storage.exists(storage.join(folder, clip.CLIP_RECORD)):
            self.model, self.tokenizer, self.image_size = clip.load_clip(folder, self.device)
            self.processor = None
        elif storage.exists(storage.join(folder, "config.json")):
            from transformers import AutoProcessor, CLIPModel

            self.model = CLIPModel.from_pretrained(folder).to(self.device).eval()
            self.processor = AutoProcessor.from_pretrained(folder)
        else:
            raise ConfigError(f"sample.clip_model={folder!r} holds no CLIP (neither a Hugging Face CLIPModel "
                              "config.json nor tldr_clip.json); point it at a CLIP folder")

    def __call__(self, images: list, captions: list[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from tldr_tasks.models import clip

        with torch.no_grad():
            if self.processor is None:
                pixels = np.stack([np.asarray(i.resize((self.image_size, self.image_size)), dtype=np.uint8)
                                   for i in images])
                image_emb = clip.embed_images(self.model, pixels)
                text_emb = clip.embed_texts(self.model, self.tokenizer, captions)
            else:
                inputs = self.processor(text=captions, images=images, return_tensors="pt", padding=True,
                                        truncation=True).to(self.device)
                output = self.model(**inputs)
                image_emb, text_emb = F.normalize(output.image_embeds, dim=-1), F.normalize(output.text_embeds, dim=-1)
        return (image_emb * text_emb).sum(dim=-1).float().cpu().numpy().astype(np.float64)


def pair_scores(cfg: Config, io: StageIO, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score and image digest of every key (in the order given), read from the input shards; a key's
    first occurrence in input order counts, as in the cluster stage. An empty caption scores NaN."""
    from tldr_tasks.data.shards import Sample, iter_shard

    reference = tower_reference(cfg, io, keys)
    if reference is not None:
        return reference.original_scores(), reference.digests
    row = {str(k): i for i, k in enumerate(keys)}
    score = np.full(len(keys), np.nan)
    digest = np.full(len(keys), "", dtype=object)
    seen = np.zeros(len(keys), dtype=bool)
    scorer = None if cfg.sample.clip_model == SIMILARITY else _Scorer(cfg.sample.clip_model)
    pending: list[tuple[int, object, str]] = []

    def flush():
        rows = [r for r, _, c in pending if c.strip()]
        if rows and scorer is not None:
            score[rows] = scorer([i for _, i, c in pending if c.strip()], [c for _, _, c in pending if c.strip()])
        pending.clear()

    for url in tqdm(io.input_shards(), desc="sample: clip scores", unit="shard"):
        for item in iter_shard(url):
            i = row.get(item.key) if isinstance(item, Sample) else None
            if i is None or seen[i]:
                continue
            seen[i] = True
            digest[i] = hashlib.sha256(item.image_bytes).hexdigest()
            if scorer is None:
                if not isinstance(item.meta.get("similarity"), (int, float)):
                    raise ConfigError(f"sample {item.key} ({url}) has no numeric `similarity` in its KEY.json: leave "
                                      "sample.clip_model empty (the built-in reference), set it to a CLIP folder, or "
                                      "download the crawl with img2dataset --save_additional_columns "
                                      "'[\"similarity\"]'")
                score[i] = float(item.meta["similarity"]) if item.caption.strip() else np.nan
            else:
                pending.append((i, item.image, item.caption))
                if len(pending) >= BATCH:
                    flush()
    flush()
    if not seen.all():
        missing = [str(k) for k in keys[~seen][:5]]
        raise ValueError(f"{int((~seen).sum())} assigned samples (e.g. {', '.join(missing)}) are not in the input "
                         "shards any more: the crawl changed since cluster ran; use a new --out")
    return score, digest.astype(str)
