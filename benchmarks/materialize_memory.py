"""Peak memory of materialize against crawl size: the columnar stage vs the old dict-per-row code.

    .venv/bin/python benchmarks/materialize_memory.py                      # 100k and 1M input samples
    .venv/bin/python benchmarks/materialize_memory.py --sizes 100000 --workdir /tmp/mm

For every size, synthetic cluster/sample/caption outputs as the stages write them (10,000 samples per
source shard, 0.1% rejected, 25% selected, ~60-character captions), then in child processes of their
own, so each peak RSS (`ru_maxrss`) is that code's alone:
- `imports`: the imports (torch among them) and one small parquet read, the floor under both;
- `dicts`: the pre-issue-10 materialize up to the image copy (every assignment, selected and caption
  row a Python dict, the shipped caption of every sample in a dict), reproduced below;
- `columnar`: the real `materialize.run`, with only the image copy replaced (the source shards hold
  no images here): each output shard's samples are placeholders and its tar is not written. The image
  copy holds one output shard at a time in both versions; the manifest is written.

Writes `benchmarks/results/materialize_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHARD_ROWS = 10_000
VARIANTS = ("imports", "dicts", "columnar")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def make_run(n: int, work: Path):
    """Empty source shards (caption parts are named by their content) and the parquet files
    materialize reads, for `n` input samples. Returns the StageIO."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tldr_tasks.contract import StageIO
    from tldr_tasks.stages import caption

    shutil.rmtree(work, ignore_errors=True)
    stems = [f"{s:05d}" for s in range(-(-n // SHARD_ROWS))]
    (work / "crawl").mkdir(parents=True)
    for stem in stems:
        with tarfile.open(work / "crawl" / f"{stem}.tar", "w") as tar:
            info = tarfile.TarInfo(stem)  # a member of its own: distinct content, distinct part names
            tar.addfile(info)
    io = StageIO(input=str(work / "crawl"), out=str(work / "run"))
    rng = np.random.default_rng(0)
    index = np.arange(n)
    rejected = index % 1000 == 999
    keys = pa.array([f"{i:09d}" for i in range(n)])
    shard = pa.DictionaryArray.from_arrays(pa.array(index // SHARD_ROWS, pa.int32()), pa.array(stems))
    cluster = pa.array(rng.integers(0, 1000, n, dtype=np.int32))
    loss = pa.array(rng.random(n, dtype=np.float32))
    table = pa.table({"key": keys, "shard": shard, "cluster": cluster, "distance": loss, "loss": loss})
    for folder in ("cluster", "sample"):
        Path(io.out, folder).mkdir(parents=True)
    pq.write_table(table.filter(pa.array(~rejected)), f"{io.cluster_dir}/assignments.parquet")
    pq.write_table(pa.table({"key": keys.filter(pa.array(rejected)),
                             "shard": shard.filter(pa.array(rejected)).cast(pa.string()),
                             "reason": pa.array(["undecodable image: truncated"] * int(rejected.sum()))}),
                   f"{io.cluster_dir}/rejects.parquet")
    kept = (rng.random(n) < 0.25) & ~rejected
    selected = table.select(["key", "shard", "cluster", "loss"]).filter(pa.array(kept))
    selected = selected.append_column("alignment", pa.array(rng.normal(size=selected.num_rows)))
    pq.write_table(selected, f"{io.sample_dir}/selected.parquet")
    for s, stem in enumerate(stems):
        ids = index[kept & (index // SHARD_ROWS == s)]
        caption.write_captions(caption.output_url(io, stem), [f"{i:09d}" for i in ids],
                               [f"a photo of {i % 5003} red things on a wooden table, number {i}" for i in ids],
                               [f"a picture of {i % 4001} things on a table" for i in ids],
                               rng.uniform(-2, 0, len(ids)).tolist(), rng.uniform(-1, 2, len(ids)).tolist())
    return io


def dicts(cfg, io) -> None:
    """The pre-issue-10 materialize up to the image copy, with what it kept alive until the manifest."""
    from tldr_tasks import fusion, storage
    from tldr_tasks.stages import caption, materialize

    def rows(url):
        return storage.read_parquet(url).to_pylist()

    selected = rows(f"{io.sample_dir}/selected.parquet")
    assignments = rows(f"{io.cluster_dir}/assignments.parquet")
    rejects = rows(f"{io.cluster_dir}/rejects.parquet")
    selected_by_key = {row["key"]: row for row in selected}
    shard_order = {storage.shard_stem(u): i for i, u in enumerate(io.input_shards())}
    ordered = sorted(selected, key=lambda r: (shard_order[r["shard"]], r["key"]))
    captions = {}
    for stem in sorted({r["shard"] for r in selected}):
        captions.update((row["key"], row) for row in rows(caption.output_url(io, stem)))
    caption_rows = [captions[r["key"]] for r in selected]
    check = fusion.collapse_check([r["original"] for r in caption_rows], [r["generated"] for r in caption_rows],
                                  cfg.caption.min_entropy_ratio)
    shipped = {r["key"]: materialize.ship(r, cfg, check["collapsed"], False) for r in caption_rows}
    per_shard: dict[str, Counter] = defaultdict(Counter)
    for row in assignments:
        per_shard[row["shard"]]["kept" if row["key"] in selected_by_key else "dropped"] += 1
    assert len(ordered) == len(shipped) and rejects


def columnar(cfg, io) -> None:
    from tldr_tasks import storage
    from tldr_tasks.data.shards import Sample
    from tldr_tasks.stages import materialize

    def placeholders(shard_urls, keys):
        return {key: Sample(key, "", None, b"", "png", "caption") for key in keys}

    materialize._samples = placeholders
    materialize.write_tar = lambda url, members: storage.write_bytes_atomic(url, b"")  # the manifest digests it
    materialize.run(cfg, io)


def child(variant: str, work: Path) -> None:
    from tldr_tasks import storage
    from tldr_tasks.config import Config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.models import captioner  # noqa: F401  (torch: materialize reads the captioner's version)
    from tldr_tasks.stages import materialize  # noqa: F401

    io = StageIO(input=str(work / "crawl"), out=str(work / "run"))
    shutil.rmtree(io.shards_dir, ignore_errors=True)
    started = time.time()
    if variant == "imports":
        storage.read_parquet(f"{io.cluster_dir}/rejects.parquet")  # the first parquet read costs ~60 MB
    else:
        {"dicts": dicts, "columnar": columnar}[variant](Config(), io)
    print(json.dumps({"wall_s": round(time.time() - started, 2), "peak_rss_gib": round(peak_rss_gib(), 3)}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="input samples, comma-separated")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="materialize_memory_"))
    records = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            make_run(n, work / str(n))
            record = {"input_samples": n}
            for variant in VARIANTS:
                done = subprocess.run([sys.executable, __file__, "--child", variant, str(work / str(n))],
                                      check=True, stdout=subprocess.PIPE, text=True)
                record[variant] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"n={n:,} {variant}: peak {record[variant]['peak_rss_gib']:.3f} GiB, "
                      f"{record[variant]['wall_s']} s", file=sys.stderr)
            records.append(record)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "materialize_memory.json").write_text(json.dumps(records, indent=1) + "\n")
    for r in records:
        print(f"{r['input_samples']:>9,} input samples: imports {r['imports']['peak_rss_gib']:.3f} GiB, "
              f"dicts {r['dicts']['peak_rss_gib']:.3f} GiB ({r['dicts']['wall_s']} s), "
              f"columnar {r['columnar']['peak_rss_gib']:.3f} GiB ({r['columnar']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
