"""The downstream model of the evaluation: a CLIP-style dual encoder trained from scratch.

Size presets live in `model_configs/clip-<preset>.json` ("tiny": 64 px, patch 8, width 128, 4 layers
per tower, ~2M parameters, for CPUs; "base": ViT-B/16-sized, for GPUs). The text side uses a word-level
tokenizer trained in-process on the training captions, so no vocabulary is downloaded.

    tok = CaptionTokenizer.train(captions)
    model, seconds = train_clip(images, lambda i, rng: captions[i], tok, steps=500, batch_size=128)
    metrics = retrieval_metrics(embed_images(model, eval_images), embed_texts(model, tok, eval_captions),
                                image_groups=groups, text_groups=groups)

Heavy imports (torch, transformers) are at module level here: only stage code imports this module.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tldr_tasks.config import load_preset as _load_preset
from tldr_tasks.preprocess import to_pixels

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # EOS must not be 2 in HF's CLIP (legacy argmax pooling)
assert EOS_ID != 2


def available_cpus() -> int:
    """Threads for torch: OMP_NUM_THREADS when set (a pod, or a host shared with other jobs: an
    oversubscribed 2-core host ran 4x slower with 2 threads than with 1), else the cores this process
    may use: its CPU affinity (taskset / container cpusets) and its cgroup CPU quota (a container's
    CPU limit), whichever is smaller."""
    from tldr_tasks.contract import cpu_limit

    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return cpu_limit()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads at `count` inside the block and the caller's count after it: the count is
    process-wide state, and a stage run in a process that goes on (compress, a test) must not change what
    the next one computes (trained weights depend on it: docs/pipeline.md#threads-and-devices)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_preset(preset: str) -> dict:
    """The size preset `model_configs/clip-<preset>.json` (ConfigError naming the existing ones)."""
    return _load_preset("clip", preset)


class CaptionTokenizer:
    """Word-level tokenizer: lower-cased words and punctuation, `[BOS] words [EOS]`, padded per batch.

    Words never seen in training become `[UNK]`. The CLIP text tower pools at the `[EOS]` position.
    """

    def __init__(self, tokenizer, max_tokens: int = 32):
        self._tok = tokenizer
        self.max_tokens = max_tokens
        self._tok.enable_truncation(max_length=max_tokens)
        self._tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]")

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 8000, max_tokens: int = 32,
              min_frequency: int = 1) -> CaptionTokenizer:
        """Learn the vocabulary (the `vocab_size` most frequent words) from `captions`, read once as a
        stream: the trainer keeps word counts only, and orders words by count, then by the word, so the
        ids do not depend on the order the captions come in (tested)."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIALS), show_progress=False)
        tok.train_from_iterator(iter(captions), trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)])
        for token, wanted in zip(SPECIALS, (PAD_ID, UNK_ID, BOS_ID, EOS_ID)):
            assert tok.token_to_id(token) == wanted, (token, tok.token_to_id(token))
        return cls(tok, max_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 [len(texts), longest]; every row ends in [EOS]."""
        encodings = self._tok.encode_batch([t if t.strip() else "" for t in texts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str, max_tokens: int = 32) -> CaptionTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), max_tokens)


def make_tokenizer(preset: str, captions: Iterable[str]):
    """The tokenizer every arm of an evaluation shares: learnt from `captions` for a from-scratch preset;
    for a pretrained-towers preset the text tower's own (the captions are not read)."""
    p = load_preset(preset)
    if p.get("kind") == "towers":
        from tldr_tasks.models.towers_clip import TowerTokenizer

        return TowerTokenizer(p)
    return CaptionTokenizer.train(captions, max_tokens=p["max_text_tokens"])


def build_clip(preset: str, vocab_size: int, bos_token_id: int = BOS_ID, eos_token_id: int = EOS_ID,
               pad_token_id: int = PAD_ID, max_text_tokens: int | None = None):
    """A randomly initialised transformers CLIPModel of the given size preset, or for a pretrained-towers
    preset (`"kind": "towers"`) a TowersCLIP with fresh heads (towers_clip.py; the token arguments unused).

    Args:
        preset: name of `model_configs/clip-<preset>.json`.
        vocab_size: the tokenizer's vocabulary size.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's ids; the text tower pools at EOS,
            and eos_token_id 2 would switch transformers to legacy argmax pooling, so it is refused.
        max_text_tokens: position embeddings of the text tower (default: the preset's).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    p = load_preset(preset)
    if p.get("kind") == "towers":  # pretrained towers with heads (towers_clip.py): no vocabulary of its own
        from tldr_tasks.models.towers_clip import TowersCLIP

        return TowersCLIP(p)
    if eos_token_id == 2:
        raise ValueError("eos_token_id 2 makes transformers' CLIP pool at argmax(input_ids); use another id")
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=p["text_width"], intermediate_size=p["text_width"] * p["mlp_ratio"],
        num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"],
        max_position_embeddings=max_text_tokens or p["max_text_tokens"], projection_dim=p["embed_dim"],
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    vision = CLIPVisionConfig(
        image_size=p["image_size"], patch_size=p["patch_size"], hidden_size=p["vision_width"],
        intermediate_size=p["vision_width"] * p["mlp_ratio"], num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"], projection_dim=p["embed_dim"])
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=p["embed_dim"])
    model = CLIPModel(config)
    if p.get("stem_channels"):
        model.vision_model.embeddings.patch_embedding = ConvStem(p["stem_channels"], p["vision_width"], p["patch_size"])
    return model


class ConvStem(torch.nn.Module):
    """Stride-2 3x3 convolutions in place of CLIP's patchify conv (Xiao et al. 2021, "Early
    convolutions help transformers see better"): from random init the image tower then learns
    shapes within a few hundred steps, where a patchify ViT of this size only learns colours."""

    def __init__(self, channels: list[int], width: int, patch_size: int):
        super().__init__()
        if 2 ** len(channels) != patch_size:
            raise ValueError(f"stem_channels needs log2(patch_size)={math.log2(patch_size):g} convs")
        layers, previous = [], 3
        for out in channels[:-1]:
            layers += [torch.nn.Conv2d(previous, out, 3, stride=2, padding=1), torch.nn.GroupNorm(8, out),
                       torch.nn.GELU()]
            previous = out
        layers.append(torch.nn.Conv2d(previous, width, 3, stride=2, padding=1))
        self.layers = torch.nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:  # CLIPVisionEmbeddings reads the input dtype from it
        return self.layers[0].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


def epoch_batches(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch over n samples: ceil(n / batch_size)."""
    return math.ceil(n / batch_size)


def batch_schedule(n: int, batch_size: int, steps: int, seed: int):
    """Yield `steps` index arrays. Each epoch is one seeded permutation split into ceil(n / batch_size)
    near-equal batches, so every sample is seen once per epoch and no batch holds a sample twice
    (a duplicate would be its own false negative in the contrastive loss)."""
    rng = np.random.default_rng(seed)
    per_epoch = epoch_batches(n, batch_size)
    done = 0
    while done < steps:
        for batch in np.array_split(rng.permutation(n), per_epoch):
            if done == steps:
                return
            yield batch
            done += 1


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched (image, text) pairs; embeddings L2-normalised."""
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def _features(output) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; older versions a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


def encode_images(model, rows, device) -> torch.Tensor:
    """Normalised image embeddings of a batch: uint8 images [B, S, S, 3] for a from-scratch CLIP; tower
    features (or uint8 images) for a TowersCLIP."""
    if hasattr(model, "encode_images"):
        return F.normalize(model.encode_images(rows), dim=-1)
    return F.normalize(_features(model.get_image_features(pixel_values=to_pixels(rows, device))), dim=-1)


def encode_texts(model, tokenizer, texts: Sequence[str], device) -> torch.Tensor:
    """Normalised text embeddings of a batch of captions (a TowersCLIP tokenizes with its own text tower)."""
    if hasattr(model, "encode_texts"):
        return F.normalize(model.encode_texts(texts), dim=-1)
    input_ids, mask = tokenizer(texts)
    return F.normalize(_features(model.get_text_features(input_ids=input_ids.to(device),
                                                         attention_mask=mask.to(device))), dim=-1)


def train_clip(images: torch.Tensor | np.ndarray | Sequence, captions: Sequence[str], tokenizer: CaptionTokenizer, *,
               steps: int, batch_size: int = 128, lr: float = 5e-4, seed: int = 0, preset: str = "tiny",
               weight_decay: float = 0.1, warmup_steps: int | None = None, device: str | None = None,
               desc: str = "clip", checkpoints: Sequence[int] = (),
               on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None) -> tuple[torch.nn.Module, float]:
    """Train a fresh CLIP for exactly `steps` optimizer steps; returns (model in eval mode, seconds).

    Args:
        images: uint8 [N, S, S, 3] at the preset's image size: an array, or anything that returns one
            for an index array (data/spool.py's Pixels reads a batch from disk).
        captions: the caption of every sample (what the shards' KEY.txt holds).
        tokenizer: shared by every arm so arms differ only in their data.
        steps: optimizer steps; one epoch is ceil(N / batch_size) steps.
        batch_size: upper bound; batches of an epoch are near-equal and never repeat a sample.
        lr: peak AdamW learning rate; linear warmup then cosine decay to 0.
        seed: fixes initialisation and sample order.
        warmup_steps: default 10% of steps, at most 200.
        checkpoints: step counts (< steps) after which `on_checkpoint(step, model)` scores the model
            in eval mode: the learning curve of one training, not of shorter schedules. Not counted
            in the returned seconds.
    """
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 training samples for a contrastive loss; got {n}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = build_clip(preset, tokenizer.vocab_size, max_text_tokens=tokenizer.max_tokens).to(device)
    model.train()
    if hasattr(model, "optimizer_groups"):  # a TowersCLIP: heads, temperature and tuned text layers only
        groups = model.optimizer_groups(lr, weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in model.parameters() if p.ndim < 2],  # biases, norms, logit scale
                   "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(200, max(1, steps // 10)) if warmup_steps is None else max(0, warmup_steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    if not hasattr(model, "encode_images"):
        to_pixels(images[:1])  # refuses anything but uint8 [N, S, S, 3] before training starts
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    pending = sorted(set(checkpoints))
    scoring = 0.0
    started = time.perf_counter()
    bar = tqdm(batch_schedule(n, batch_size, steps, seed), total=steps, desc=desc, unit="step",
               mininterval=2.0, leave=False)
    for batch in bar:
        image_emb = encode_images(model, images[batch], device)
        text_emb = encode_texts(model, tokenizer, [captions[int(i)] for i in batch], device)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        done = scheduler.last_epoch  # optimizer steps taken
        if on_checkpoint is not None and pending and done == pending[0] and done < steps:
            pending.pop(0)
            paused = time.perf_counter()
            on_checkpoint(done, model.eval())
            model.train()
            scoring += time.perf_counter() - paused
        if done % 20 == 0:  # loss.item() syncs the device: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started - scoring
    return model.eval(), seconds


@torch.no_grad()
def embed_images(model, images: torch.Tensor | np.ndarray | Sequence, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] (float32, CPU) of uint8 images [N, S, S, 3]."""
    device = next(model.parameters()).device
    out = [encode_images(model, images[i:i + batch_size], device).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer: CaptionTokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] (float32, CPU)."""
    device = next(model.parameters()).device
    return torch.cat([encode_texts(model, tokenizer, list(texts[i:i + batch_size]), device).float().cpu()
                      for i in range(0, len(texts), batch_size)])


def _group_ids(image_groups: Sequence | None, text_groups: Sequence | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' groups as ints in one id space; None means instance identity (item i is group i)."""
    if image_groups is None and text_groups is None:
        return np.arange(n), np.arange(n)
    image_groups = image_groups if image_groups is not None else text_groups
    text_groups = text_groups if text_groups is not None else image_groups
    if len(image_groups) != n or len(text_groups) != n:
        raise ValueError(f"got {len(image_groups)}/{len(text_groups)} groups for {n} items")
    lookup: dict = {}
    return (np.array([lookup.setdefault(g, len(lookup)) for g in image_groups]),
            np.array([lookup.setdefault(g, len(lookup)) for g in text_groups]))


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, image_groups: Sequence | None = None,
                      text_groups: Sequence | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in percent, image->text (i2t) and text->image (t2i), over paired eval items.

    A query scores a hit at k when one of its k nearest candidates shares its group: pass the same
    scene signature for items showing the same scene (eval descriptions repeat, so an exact-instance
    hit understates quality). Groups default to instance identity: item i matches only item i.

    Returns:
        {"i2t_r1", "i2t_r5", ..., "t2i_r10", "mean_r1"}: mean_r1 is the mean of i2t_r1 and t2i_r1.
    """
    image_emb, text_emb = torch.as_tensor(image_emb).float(), torch.as_tensor(text_emb).float()
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} images vs {text_emb.shape[0]} texts: eval items must be paired")
    n = image_emb.shape[0]
    image_groups_ids, text_groups_ids = _group_ids(image_groups, text_groups, n)
    sim = image_emb @ text_emb.t()
    kmax = min(max(ks), n)
    metrics: dict[str, float] = {}
    for name, scores, query_groups, cand_groups in (("i2t", sim, image_groups_ids, text_groups_ids),
                                                     ("t2i", sim.t(), text_groups_ids, image_groups_ids)):
        top = torch.topk(scores, kmax, dim=1).indices.numpy()
        hits = cand_groups[top] == query_groups[:, None]  # [n, kmax]
        for k in ks:
            metrics[f"{name}_r{k}"] = float(100.0 * hits[:, :min(k, n)].any(axis=1).mean())
    metrics["mean_r1"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2 if 1 in ks else float("nan")
    return metrics


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int],
                       class_values: Sequence | None = None) -> float:
    """Percent of images whose nearest class embedding is their label, or, with `class_values`, a class
    with the same value as their label's (e.g. the same colour, whatever the shape).

    Args:
        image_emb: [N, D] L2-normalised.
        class_emb: [C, D] one embedding per class (e.g. the normalised mean over prompt templates).
        labels: N class indices.
        class_values: C values, one per class, that a prediction is scored by (default: the class).
    """
    if len(labels) == 0:
        return float("nan")
    values = range(len(class_emb)) if class_values is None else class_values
    pred = (torch.as_tensor(image_emb).float() @ torch.as_tensor(class_emb).float().t()).argmax(dim=1).tolist()
    return 100.0 * float(np.mean([values[p] == values[y] for p, y in zip(pred, labels)]))


def class_embeddings(model, tokenizer: CaptionTokenizer, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of the embeddings of its prompts (prompt ensembling).

    Args:
        prompts: one list of prompts per class, e.g. [["an image showing a red circle", ...], ...].
    """
    flat = [p for class_prompts in prompts for p in class_prompts]
    emb = embed_texts(model, tokenizer, flat)
    out, start = [], 0
    for class_prompts in prompts:
        out.append(emb[start:start + len(class_prompts)].mean(dim=0))
        start += len(class_prompts)
    return F.normalize(torch.stack(out), dim=-1)


CLIP_RECORD = "tldr_clip.json"  # marks a folder written by save_clip


def save_clip(model, tokenizer: CaptionTokenizer, preset: str, folder: str) -> None:
    """A trained CLIP as a folder: weights, tokenizer and the preset it was built from (load_clip). A TowersCLIP
    saves its heads (and tuned text layers) only: the towers come from their packages."""
    from safetensors.torch import save

    from tldr_tasks import storage

    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes_atomic(storage.join(folder, "model.safetensors"), save(weights))
    storage.write_text_atomic(storage.join(folder, "tokenizer.json"), tokenizer.to_json())
    storage.write_text_atomic(storage.join(folder, CLIP_RECORD), json.dumps(
        {"preset": preset, "vocab_size": tokenizer.vocab_size, "max_text_tokens": tokenizer.max_tokens}))


def load_clip(folder: str, device: str = "cpu"):
    """(model, tokenizer, image_size) of a folder save_clip wrote."""
    from safetensors.torch import load

    from tldr_tasks import storage

    record = json.loads(storage.read_text(storage.join(folder, CLIP_RECORD)))
    if load_preset(record["preset"]).get("kind") == "towers":  # the text tower's own WordPiece
        tokenizer = make_tokenizer(record["preset"], [])
    else:
        tokenizer = CaptionTokenizer.from_json(storage.read_text(storage.join(folder, "tokenizer.json")),
                                               record["max_text_tokens"])
    model = build_clip(record["preset"], record["vocab_size"], max_text_tokens=record["max_text_tokens"])
    model.load_state_dict(load(storage.read_bytes(storage.join(folder, "model.safetensors"))))
    return model.to(device).eval(), tokenizer, load_preset(record["preset"])["image_size"]
