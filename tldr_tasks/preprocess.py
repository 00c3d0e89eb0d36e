"""Images and captions -> the captioner's tensors: shared by the data layer (the training stream
collates pieces with them) and the models and stages that encode and score pairs, below all of them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


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


def to_pixels(images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, S, S, 3] (HWC, as PIL gives) -> float [N, 3, S, S] scaled to [-1, 1] on `device` (the CLIPs' input)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, S, S, 3]; got {x.dtype} {tuple(x.shape)}")
    return x.to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
