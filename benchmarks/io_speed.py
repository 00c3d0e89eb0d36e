"""Two speeds the tests used to assert as wall-clock bounds (a busy machine failed them; the tests keep
the behaviour: the header check allocates no pixel buffer, the crawl is what it should be).

    .venv/bin/python benchmarks/io_speed.py          (~10 s on 2 cores)

- decompression bomb: reading a shard of one PNG whose header claims side x side pixels (40000: over
  PIL's own limit; 9000: under PIL's, over ours) and one 8 px sample. The shard reader refuses the
  bomb from its header, so this takes milliseconds, not the seconds and GBs a decode would.
  Formerly `< 1.0 s` in tests/test_shards.py.
- synthetic crawl: `make_crawl` of the demo's 64 px images, in seconds per 1,000 samples.
  Formerly `< 20 s` for 440 samples in tests/test_synthetic.py.

Writes `benchmarks/results/io_speed.json` with the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from stage_scale import device_info  # noqa: E402

from tldr_tasks.config import CrawlConfig  # noqa: E402
from tldr_tasks.data.shards import Rejected, iter_shard, write_tar  # noqa: E402
from tldr_tasks.data.synthetic import make_crawl  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def png_header_only(side: int) -> bytes:
    """A ~70-byte PNG that claims side x side RGB pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def bomb_read_seconds(folder: Path, side: int, repeats: int) -> dict:
    """Seconds to read a shard of one bomb and one good sample: the fastest and slowest of `repeats`."""
    small = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(small, format="PNG")
    url = str(folder / f"bomb_{side}.tar")
    write_tar(url, [("bomb", {"png": png_header_only(side), "txt": b"a caption"}),
                    ("ok", {"png": small.getvalue(), "txt": b"a caption"})])
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        items = list(iter_shard(url))
        seconds.append(time.perf_counter() - started)
        assert [type(i) is Rejected for i in items] == [True, False], items
    return {"side": side, "repeats": repeats, "min_s": round(min(seconds), 5), "max_s": round(max(seconds), 5)}


def crawl_seconds(folder: Path, samples: int) -> dict:
    """Seconds to write a synthetic crawl of `samples` train and samples / 10 eval samples at 64 px."""
    cfg = CrawlConfig(samples=samples, eval_samples=samples // 10, image_size=64, noise=0.5, prototypes=50,
                      shard_size=1000)
    started = time.perf_counter()
    make_crawl(str(folder / f"crawl_{samples}"), cfg, seed=1)
    seconds = time.perf_counter() - started
    total = samples + samples // 10
    return {"samples": total, "image_size": 64, "seconds": round(seconds, 2),
            "seconds_per_1000": round(seconds / total * 1000, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000, help="train samples of the timed crawl")
    parser.add_argument("--repeats", type=int, default=20, help="reads of each bomb shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="io_speed_") as tmp:
        folder = Path(tmp)
        result = {"machine": device_info(),
                  "decompression_bomb": [bomb_read_seconds(folder, side, args.repeats) for side in (40000, 9000)],
                  "synthetic_crawl": crawl_seconds(folder, args.samples)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "io_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
