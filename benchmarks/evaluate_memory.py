"""Peak memory of the evaluation's data path against crawl size: spooled to disk vs held in memory.

    .venv/bin/python benchmarks/evaluate_memory.py                  # 12,000 and 60,000 samples (~6 min)
    .venv/bin/python benchmarks/evaluate_memory.py --sizes 2000,4000 --workdir /tmp/evalmem

For every size, a synthetic crawl (64 px, the demo's settings); then, in a child process of its own
per way of holding the data: read the crawl, take a random quarter (the random arm), train the
shared tokenizer on both arms' captions, digest both arms as the training cache does and train the
tiny CLIP for 20 steps on the full arm, all as stages/evaluate.py does. `spool`: the evaluation's
way (data/spool.py: decoded once to local files, read back by index); `memory`: every image decoded
into one array, as the evaluation did before. The training budget is cut to 20 steps: memory does
not grow with steps, and a whole evaluation at 60k samples takes hours on a CPU.

Writes `benchmarks/results/evaluate_memory.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from stage_scale import device_info, peak_rss_gib  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEPS = 20


def read_in_memory(urls: list[str], size: int):
    """The evaluation's data before the spool: (images uint8 [N, S, S, 3], captions)."""
    from tldr_tasks.data.shards import Sample, iter_shard

    images, captions = [], []
    for url in urls:
        for item in iter_shard(url):
            if isinstance(item, Sample):
                images.append(np.asarray(item.image.resize((size, size)) if item.image.size != (size, size)
                                         else item.image, dtype=np.uint8))
                captions.append(item.caption)
    return np.stack(images), captions


def child(mode: str, crawl: Path, scratch: Path) -> None:
    from tldr_tasks import storage
    from tldr_tasks.data.spool import write_spool
    from tldr_tasks.models import clip
    from tldr_tasks.stages.evaluate import random_subset

    preset = clip.load_preset("tiny")
    urls = storage.expand_shards(str(crawl / "train"))
    started = time.perf_counter()
    if mode == "spool":
        full = write_spool(urls, preset["image_size"], str(scratch), "input")
        images, captions = full.images, full.captions
        subset = full.take(random_subset(len(full), len(full) // 4, 0))
        random_images, random_captions = subset.images, subset.captions
    else:
        images, captions = read_in_memory(urls, preset["image_size"])
        idx = random_subset(len(images), len(images) // 4, 0)
        random_images, random_captions = images[idx], [captions[i] for i in idx]
    read_seconds = time.perf_counter() - started
    tokenizer = clip.CaptionTokenizer.train((c for arm in (captions, random_captions) for c in arm),
                                            max_tokens=preset["max_text_tokens"])
    for arm_images, arm_captions in ((images, captions), (random_images, random_captions)):
        digest = hashlib.sha256()
        chunks = arm_images.chunks() if mode == "spool" else [arm_images]
        for chunk in chunks:
            digest.update(np.ascontiguousarray(chunk).tobytes())
        for caption in arm_captions:
            digest.update(caption.encode())
    _, seconds = clip.train_clip(images, captions, tokenizer, steps=STEPS, batch_size=128, preset="tiny")
    print(json.dumps({"samples": len(images), "read_seconds": round(read_seconds, 1),
                      "step_seconds": round(seconds / STEPS, 3), "peak_rss_gib": round(peak_rss_gib(), 3)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="12000,60000")
    parser.add_argument("--workdir", help="where the crawls go (default: a temporary folder, deleted)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return 0
    from tldr_tasks.config import Config
    from tldr_tasks.data.synthetic import make_crawl
    from tldr_tasks.runner import thread_defaults

    thread_defaults()  # the stage's OpenMP settings, inherited by the children
    work = Path(args.workdir or tempfile.mkdtemp(prefix="evaluate-memory-"))
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        crawl = work / f"crawl-{n}"
        if not (crawl / "crawl.json").exists():
            cfg = Config()
            cfg.crawl.samples = n
            make_crawl(str(crawl), cfg.crawl, 0)
        for mode in ("spool", "memory"):
            with tempfile.TemporaryDirectory(dir=work) as scratch:
                done = subprocess.run([sys.executable, __file__, "--child", mode, str(crawl), scratch],
                                      capture_output=True, text=True, check=True)
            row = {"mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "evaluate_memory.json").write_text(json.dumps({"device": device_info(), "steps": STEPS,
                                                              "rows": rows}, indent=1))
    print("| samples | spooled: peak GiB | in memory: peak GiB |\n|---|---|---|")
    for n in sorted({r["samples"] for r in rows}):
        peak = {r["mode"]: r["peak_rss_gib"] for r in rows if r["samples"] == n}
        print(f"| {n:,} | {peak['spool']} | {peak['memory']} |")
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
