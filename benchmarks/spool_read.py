"""Read speed and memory of the evaluation's spool (data/spool.py): batches of seeded permutations.

    .venv/bin/python benchmarks/spool_read.py --label pread          # 60,000 samples, 64 px (~3 min)
    .venv/bin/python benchmarks/spool_read.py --label memmap --samples 20000 --workdir /tmp/spoolread

A crawl of random 64-px images is written once; then, in a child process of its own per repeat,
`write_spool` decodes it to scratch files and the reads are timed as the evaluation makes them:
`clip.batch_schedule` batches (every epoch one seeded permutation, 128 rows a batch), each read as
`images[batch]` plus the batch's captions, then one sequential pass of `images.chunks()` (the
training cache's digest). Rows/s is the median over the repeats. Memory: the child's resident set
before the first read and its peak while reading (VmHWM, reset after the spool is written), so the
growth is what reading costs. The files were just written, so reads come from the page cache, as
they do in the evaluation while the scratch fits in memory.

Every run adds its label's numbers to `benchmarks/results/spool_read.json` (the file keeps the
other labels), so the code path before a change and after it are measured the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from stage_scale import device_info  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "spool_read.json"
IMAGE_PX = 64
BATCH_SIZE = 128
SEED = 0


def make_crawl(folder: Path, samples: int) -> None:
    from PIL import Image

    from tldr_tasks.data.shards import ShardWriter

    rng = np.random.default_rng(SEED)
    with ShardWriter(str(folder), shard_size=5000) as writer:
        for i in range(samples):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)).save(buffer, format="PNG")
            writer.write(f"s{i:07d}", {"png": buffer.getvalue(), "txt": f"caption {i}".encode()})
    (folder / "done").write_text(str(samples))


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(crawl: Path, scratch: Path, epochs: int) -> None:
    from tldr_tasks import storage
    from tldr_tasks.data.spool import write_spool
    from tldr_tasks.models.clip import batch_schedule, epoch_batches

    split = write_spool(storage.expand_shards(str(crawl)), IMAGE_PX, str(scratch), "bench")
    n = len(split)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on: reading only
    before = _memory_kib("VmRSS")
    pixel_seconds = caption_seconds = 0.0
    for batch in batch_schedule(n, BATCH_SIZE, epochs * epoch_batches(n, BATCH_SIZE), SEED):
        started = time.perf_counter()
        pixels = split.images[batch]
        pixel_seconds += time.perf_counter() - started
        started = time.perf_counter()
        captions = [split.captions[int(i)] for i in batch]
        caption_seconds += time.perf_counter() - started
        assert pixels.shape == (len(batch), IMAGE_PX, IMAGE_PX, 3) and len(captions) == len(batch)
    started = time.perf_counter()
    rows = sum(len(chunk) for chunk in split.images.chunks())
    sequential_seconds = time.perf_counter() - started
    assert rows == n
    print(json.dumps({"samples": n, "batch_rows_per_second": round(epochs * n / pixel_seconds),
                      "caption_rows_per_second": round(epochs * n / caption_seconds),
                      "sequential_rows_per_second": round(n / sequential_seconds),
                      "rss_before_reading_mib": round(before / 1024, 1),
                      "peak_rss_reading_mib": round(_memory_kib("VmHWM") / 1024, 1)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", help="the code path measured, e.g. pread or memmap")
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the crawl goes (kept for the next label; default: a temporary "
                                          "folder, deleted)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return 0
    if not args.label:
        parser.error("--label is required")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="spool-read-"))
    crawl = work / f"crawl-{args.samples}"
    if not (crawl / "done").exists():
        make_crawl(crawl, args.samples)
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            done = subprocess.run([sys.executable, __file__, "--child", str(crawl), scratch, str(args.epochs)],
                                  capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    row = {"samples": args.samples, "image_px": IMAGE_PX, "batch_size": BATCH_SIZE, "epochs": args.epochs,
           "repeats": args.repeats}
    for name in runs[0]:
        if name != "samples":
            row[name] = statistics.median(r[name] for r in runs)
    row["peak_rss_growth_mib"] = round(row["peak_rss_reading_mib"] - row["rss_before_reading_mib"], 1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("labels", {})[args.label] = {"device": device_info(), **row}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({args.label: row}, indent=1))
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
