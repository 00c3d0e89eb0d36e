"""Captioner quality levers, measured where a caption is judged: does a lever make the captions worth shipping?

    .venv/bin/python benchmarks/captioner_quality.py --crawls runs/bench_captions/synthetic/seed0 \
        runs/bench_captions/real_emoji/seed0

Reuses the crawls benchmarks/captions.py built (`<crawl dir>/crawl/{main,eval}`) and trains cross-fitted
captioners (captioner.folds=2, the benchmark's PROFILE otherwise) under each lever of LEVERS. Per lever:
    heldout_accuracy      share of the validation half of the held-out split (split by key hash as the
                          evaluation does; the test half is not read) whose caption the strict judge accepts,
                          from fold 0's captioner (no captioner trained on held-out images); head and tail
                          scenes apart (head: the most popular scenes making up half the crawl)
    out_of_fold_accuracy  the same on CRAWL_SAMPLES crawl images, each captioned by the captioner that never
                          trained on it, judged against the image's true scene (not its noisy caption)
    collapsed             the caption stage's collapse check on those out-of-fold captions (entropy_ratio:
                          their entropy over their originals'; collapsed below caption.min_entropy_ratio)
    train_seconds         wall time of the captioners' training (2 CPU cores, nothing else running; null when
                          an interrupted earlier run had finished it)
Writes `benchmarks/results/captioner_quality.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tldr_tasks.benchmark import PROFILE, machine
from tldr_tasks.config import _merge, from_dict
from tldr_tasks.fusion import collapse_check

RESULTS = Path(__file__).parent / "results"
CRAWL_SAMPLES = 600
LEVERS = {
    "default": {},  # the benchmark's profile: 4 epochs, codebook 512, beam search 3
    "epochs_12": {"captioner": {"epochs": 12}},  # longer training
    "codebook_2048": {"captioner": {"codebook_size": 2048}},  # more capacity in the bottleneck
}


def samples_of(url_pattern: str) -> list:
    from tldr_tasks import storage
    from tldr_tasks.data.shards import Sample, iter_shard

    return [s for url in storage.expand_shards(url_pattern) for s in iter_shard(url) if isinstance(s, Sample)]


def pixels(samples: list, size: int) -> np.ndarray:
    return np.stack([np.asarray(s.image.convert("RGB").resize((size, size))) for s in samples])


def judged(captions: list[str], samples: list) -> list[bool]:
    from tldr_tasks.data.truth import describes_exactly

    return [describes_exactly(c, s.meta["truth"]) for c, s in zip(captions, samples)]


def measure(root: Path, lever: str, overrides: dict, seed: int) -> dict:
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import load_stage_module
    from tldr_tasks.stages.evaluate import SPLITS, generate

    cfg = from_dict(_merge(PROFILE, _merge({"captioner": {"folds": 2}, "caption": {"num_beams": 3}, "seed": seed},
                                           overrides))).validate()
    main, held_out = str(root / "crawl" / "main"), str(root / "crawl" / "eval")
    io = StageIO(input=main, out=str(root / "quality" / lever), eval_input=held_out)
    started = time.time()
    trained = load_stage_module("train-captioner").run(cfg, io)
    # a captioner an interrupted earlier run finished is not timed again: no time rather than 0
    seconds = None if trained.skipped else round(time.time() - started, 1)
    crawl = samples_of(main)
    scenes = Counter(s.meta["truth"]["scene"] for s in crawl)
    head, covered = set(), 0
    for scene, count in scenes.most_common():
        if covered >= len(crawl) / 2:
            break
        head.add(scene)
        covered += count
    validation = [s for s in samples_of(held_out)
                  if SPLITS[hashlib.sha256(s.key.encode()).digest()[0] % 2] == "validation"]
    size = cfg.captioner.image_size
    right = judged(generate(io, cfg, pixels(validation, size), "validation")[0], validation)
    in_head = [s.meta["truth"]["scene"] in head for s in validation]
    picked = [crawl[i] for i in np.random.default_rng(seed).choice(len(crawl), CRAWL_SAMPLES, replace=False)]
    oof_captions = generate(io, cfg, pixels(picked, size), "crawl", [s.key for s in picked])[0]
    oof = judged(oof_captions, picked)
    collapse = collapse_check([s.caption for s in picked], oof_captions, cfg.caption.min_entropy_ratio)
    return {"collapsed": collapse["collapsed"], "entropy_ratio": collapse["entropy_ratio"],
            "distinct_generated": collapse["distinct_generated"], "caption_examples": oof_captions[:5],
            "heldout_accuracy": float(np.mean(right)),
            "heldout_accuracy_head": float(np.mean([r for r, h in zip(right, in_head) if h] or [np.nan])),
            "heldout_accuracy_tail": float(np.mean([r for r, h in zip(right, in_head) if not h] or [np.nan])),
            "out_of_fold_accuracy": float(np.mean(oof)), "train_seconds": seconds,
            "validation_items": len(validation)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crawls", nargs="+", required=True, help="<out>/<crawl>/seed<N> folders of captions.py")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    path = Path(args.results) / "captioner_quality.json"
    result = {"machine": machine(), "levers": LEVERS, "crawls": {}}
    for folder in map(Path, args.crawls):
        seed = int(folder.name.removeprefix("seed"))
        name = f"{folder.parent.name}/seed{seed}"
        for lever, overrides in LEVERS.items():
            result["crawls"].setdefault(name, {})[lever] = measure(folder, lever, overrides, seed)
            print(json.dumps({name: {lever: result["crawls"][name][lever]}}), flush=True)
            path.write_text(json.dumps(result, indent=1) + "\n")  # kept as it grows: a crash loses one lever


if __name__ == "__main__":
    main()
