"""CLIP image-text scores for the `clip_score` selection (DataComp's standard baseline).

The score of a pair is the cosine between its image's and its caption's CLIP embeddings. It comes from
`sample.clip_model`, a CLIP folder (Hugging Face `CLIPModel` with its processor files, or a folder
`models.clip.save_clip` wrote), or, when that is empty, from the crawl itself: img2dataset's
`--save_additional_columns '["similarity"]'` carries LAION's score into every KEY.json.

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

    row = {str(k): i for i, k in enumerate(keys)}
    score = np.full(len(keys), np.nan)
    digest = np.full(len(keys), "", dtype=object)
    seen = np.zeros(len(keys), dtype=bool)
    scorer = _Scorer(cfg.sample.clip_model) if cfg.sample.clip_model else None
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
                    raise ConfigError(f"sample {item.key} ({url}) has no numeric `similarity` in its KEY.json: set "
                                      "sample.clip_model to a CLIP folder, or download the crawl with img2dataset "
                                      "--save_additional_columns '[\"similarity\"]'")
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
