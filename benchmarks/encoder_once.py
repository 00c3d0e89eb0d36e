"""The embed and caption stages' model work with the encoder run once per batch (now) against once per
use (before: embed encoded each batch twice, for the feature and for the caption loss; caption three
times, for beam search and for each of the two scores).

    .venv/bin/python benchmarks/encoder_once.py          (~2 min on 2 busy cores)

A random tiny captioner (`side_by_side.tiny_captioner`) on one 1000-sample shard of a synthetic crawl
(64 px): embed in batches of 256, caption (3 beams, up to 30 tokens) in batches of 128. The two ways
alternate batch by batch, so that other work on the machine slows both alike. The "once per use" arms
are the stages' former per-batch code. Writes `benchmarks/results/encoder_once.json`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from side_by_side import tiny_captioner  # noqa: E402
from stage_scale import device_info  # noqa: E402

from tldr_tasks.runner import thread_defaults  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def alternate(arms: dict, batches: list, rounds: int) -> dict:
    """Seconds per arm, each batch run by every arm in turn (the order flips every round)."""
    seconds = dict.fromkeys(arms, 0.0)
    for r in range(rounds):
        for batch in batches:
            for name in sorted(arms, reverse=r % 2 == 1):
                started = time.time()
                arms[name](*batch)
                seconds[name] += time.time() - started
    return seconds


def main() -> int:
    thread_defaults()
    import torch

    from tldr_tasks.data.shards import iter_shard
    from tldr_tasks.preprocess import image_to_tensor, tokenize_captions
    from tldr_tasks.stages.caption import caption_batch
    from tldr_tasks.stages.embed import _batches, _to_storage_dtype, compute_features, embed_batch

    work = Path(tempfile.mkdtemp(prefix="encoder_once_"))
    try:
        subprocess.run([sys.executable, "-m", "tldr_tasks.cli", "make-crawl", "--out", str(work), "--samples", "1000",
                        "--eval-samples", "100"], check=True, stdout=subprocess.DEVNULL)
        cfg, _, model, tokenizer = tiny_captioner(work)
        shard = sorted((work / "train").glob("*.tar"))[0]
        samples = list(_batches(iter_shard(str(shard)), cfg.embed.batch_size, []))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size, feature, c = model.arch["codebook_size"], cfg.embed.feature, cfg.caption
    embed_inputs = []
    for batch in samples:
        rows = [i for i, s in enumerate(batch) if s.caption.strip()]
        ids, mask = tokenize_captions(tokenizer, [batch[i].caption for i in rows], model.arch["max_tokens"])
        embed_inputs.append((image_to_tensor([s.image for s in batch], model.image_size), rows, ids, mask))

    def embed_per_use(pixels, rows, ids, mask):
        _to_storage_dtype(compute_features(model.encode(pixels), feature, size).numpy(), feature, size)
        model.per_sample_loss(pixels[rows], ids, mask)

    def caption_per_use(pixels):
        captions = model.generate_captions(pixels, tokenizer, num_beams=c.num_beams, min_new_tokens=c.min_new_tokens,
                                           max_new_tokens=c.max_new_tokens)
        ids, mask = tokenize_captions(tokenizer, captions, model.arch["max_tokens"])
        model.per_sample_loss(pixels, ids, mask)
        model.per_sample_loss(pixels.roll(len(pixels) // 2, dims=0), ids, mask)

    with torch.inference_mode():
        embed = alternate({"once": lambda *b: embed_batch(model, *b, feature), "per_use": embed_per_use},
                          embed_inputs, rounds=3)
        pixels = [(b[0][:c.batch_size],) for b in embed_inputs[:2]]  # two caption batches
        caption = alternate({"once": lambda p: caption_batch(model, tokenizer, p, c), "per_use": caption_per_use},
                            pixels, rounds=2)
    record = {"machine": device_info()}
    for name, seconds, images in (("embed", embed, 3 * sum(len(b[0]) for b in embed_inputs)),
                                  ("caption", caption, 2 * sum(len(p[0]) for p in pixels))):
        record[name] = {"images": images, "once_per_s": round(images / seconds["once"], 1),
                        "per_use_per_s": round(images / seconds["per_use"], 1),
                        "speedup": round(seconds["per_use"] / seconds["once"], 2)}
        print(f"{name}: {record[name]}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encoder_once.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
