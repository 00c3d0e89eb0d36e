"""Cross-fitting folds: which captioner may score and caption a sample.

With `captioner.folds` = K >= 2, train-captioner trains K captioners; captioner k trains on every
sample outside fold k and is the one that scores (embed's caption loss, the alignment the selection
reads) and captions (the caption stage, the evaluation's generated captions) the samples of fold k.
So no sample's score or generated caption comes from a captioner that saw its caption. K = 1 is one
captioner trained on everything, which then scores and captions its own training data.

A sample's fold is a hash of its key: stable whatever the shard layout, order or worker count.
"""

from __future__ import annotations

import hashlib


def fold_of(key: str, folds: int) -> int:
    """The fold of the sample `key` among `folds` (0 when there is no cross-fitting). Salted, so it is
    independent of the other key-hash splits (the evaluation's validation/test halves, the benchmark's
    reference share)."""
    if folds <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(f"fold:{key}".encode()).digest()[:8], "big") % folds


def in_training_set(key: str, folds: int, holdout: int | None) -> bool:
    """Whether the captioner that holds out fold `holdout` trains on sample `key` (None: no holdout)."""
    return holdout is None or fold_of(key, folds) != holdout
