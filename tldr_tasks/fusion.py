"""Fusing a sample's original web caption with the captioner's generated caption.

Modes:
    concat     "original; generated" (the paper's fusion).
    alternate  the trainer sees the original or the generated caption, chosen at random each time
               the sample is visited; shards store the concatenation so open_clip can read them.
    generated  the generated caption only (the paper reports it collapses the contrastive loss).
    original   the web caption only (selection without refinement).
"""

from __future__ import annotations

import random


def fuse(original: str, generated: str, mode: str) -> str:
    """The caption written to a compressed shard's KEY.txt."""
    original, generated = original.strip(), generated.strip()
    if mode in ("concat", "alternate"):
        return f"{original}; {generated}" if original and generated else (original or generated)
    if mode == "generated":
        return generated or original
    if mode == "original":
        return original
    raise ValueError(f"unknown fusion mode {mode!r}: use concat, alternate, generated or original")


def training_caption(original: str, generated: str, mode: str, rng: random.Random) -> str:
    """The caption a trainer uses on one visit of a sample; only `alternate` varies per visit."""
    if mode == "alternate" and original.strip() and generated.strip():
        return original.strip() if rng.random() < 0.5 else generated.strip()
    return fuse(original, generated, mode)
