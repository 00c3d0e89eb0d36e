"""materialize: write the compressed WebDataset shards with refined captions, plus the manifest.

Selection wrote keys, not copies; this is the one step that copies images. Output shards use the
input layout (`KEY.png|jpg|webp`, `KEY.txt`, `KEY.json`), readable by open_clip's webdataset loader.
`KEY.txt` holds the fused caption (caption.fusion); `KEY.json` the original and generated captions,
cluster id and source shard. `manifest.json` accounts for every input sample (kept + dropped by
selection + rejected with a reason, per shard and in total) and is written last: its presence
means the output is complete.

    tldr-vlp run materialize --input crawl/train --out runs/x
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict

import pyarrow.parquet as pq
from tqdm import tqdm

from tldr_tasks import storage
from tldr_tasks.config import Config
from tldr_tasks.data.shards import Sample, encode_json, iter_shard, write_tar
from tldr_tasks.fusion import fuse
from tldr_tasks.stage_cli import stage_main
from tldr_tasks.stages.base import StageIO, StageResult
from tldr_tasks.tracking import redact


def _read_parquet(url: str) -> list[dict]:
    with storage.filesystem(url)[0].open(storage.filesystem(url)[1], "rb") as f:
        return pq.read_table(f).to_pylist()


def input_version(shard_urls: list[str]) -> str:
    """A digest of the input shards' names and sizes: which crawl version this output came from."""
    digest = hashlib.sha256()
    for url in shard_urls:
        fs, path = storage.filesystem(url)
        digest.update(f"{storage.shard_stem(url)}:{fs.size(path)}\n".encode())
    return digest.hexdigest()[:16]


def account(assignments: list[dict], rejects: list[dict], selected_keys: set[str]) -> dict:
    """Per-shard and total counts: input = kept + dropped + rejected."""
    per_shard: dict[str, Counter] = defaultdict(Counter)
    for row in assignments:
        outcome = "kept" if row["key"] in selected_keys else "dropped"
        per_shard[row["shard"]][outcome] += 1
    by_reason: Counter = Counter()
    for row in rejects:
        if row.get("key") is None:
            continue  # an unreadable shard: no samples could be counted; listed as a shard error
        per_shard[row["shard"]]["rejected"] += 1
        by_reason[row["reason"].split(":")[0]] += 1
    shards = {}
    for shard, counts in sorted(per_shard.items()):
        shards[shard] = {k: counts[k] for k in ("kept", "dropped", "rejected")}
        shards[shard]["input"] = sum(shards[shard].values())
    total = {k: sum(s[k] for s in shards.values()) for k in ("input", "kept", "dropped", "rejected")}
    return {**{f"{k}_samples" if k == "input" else k: v for k, v in total.items()},
            "rejected_by_reason": dict(sorted(by_reason.items())), "per_shard": shards,
            "shard_errors": [r for r in rejects if r.get("key") is None]}


def run(cfg: Config, io: StageIO) -> StageResult:
    manifest_url = storage.join(io.shards_dir, "manifest.json")
    if storage.exists(manifest_url):
        return StageResult(metrics=json.loads(storage.read_text(manifest_url))["metrics"],
                           outputs=[manifest_url], skipped=True)
    shard_urls = io.input_shards()
    selected = _read_parquet(storage.join(io.sample_dir, "selected.parquet"))
    assignments = _read_parquet(storage.join(io.cluster_dir, "assignments.parquet"))
    rejects = _read_parquet(storage.join(io.cluster_dir, "rejects.parquet"))
    selected_by_key = {row["key"]: row for row in selected}

    # Output order is the input order (source shard, then key): deterministic shard contents.
    shard_order = {storage.shard_stem(u): i for i, u in enumerate(shard_urls)}
    ordered = sorted(selected, key=lambda r: (shard_order[r["shard"]], r["key"]))
    size = cfg.materialize.shard_size
    groups = [ordered[i:i + size] for i in range(0, len(ordered), size)]
    generated: dict[str, str] = {}
    for stem in sorted({r["shard"] for r in selected}):
        part = storage.join(io.caption_dir, f"{stem}.parquet")
        if storage.exists(part):
            generated.update((row["key"], row["generated"]) for row in _read_parquet(part))
    missing = [r["key"] for r in selected if r["key"] not in generated]
    if missing:
        raise RuntimeError(f"{len(missing)} selected samples have no generated caption (e.g. {missing[0]}): "
                           "run the caption stage for every shard group first")

    outputs = []
    by_url = {storage.shard_stem(u): u for u in shard_urls}
    for index, group in enumerate(tqdm(groups, desc="materialize", unit="shard")):
        out_url = storage.join(io.shards_dir, f"{index:05d}.tar")
        outputs.append(out_url)
        if storage.exists(out_url):
            continue  # finished before a restart
        wanted = {r["key"] for r in group}
        samples: dict[str, Sample] = {}
        for stem in sorted({r["shard"] for r in group}, key=shard_order.get):
            for item in iter_shard(by_url[stem]):
                if isinstance(item, Sample) and item.key in wanted and item.key not in samples:
                    samples[item.key] = item
        write_tar(out_url, [(row["key"], _output_parts(samples[row["key"]], selected_by_key[row["key"]],
                                                       generated[row["key"]], cfg.caption.fusion))
                            for row in group])

    accounting = account(assignments, rejects, set(selected_by_key))
    metrics = {"input_samples": accounting["input_samples"], "kept": accounting["kept"],
               "dropped": accounting["dropped"], "rejected": accounting["rejected"],
               "ratio": accounting["kept"] / max(1, accounting["input_samples"] - accounting["rejected"]),
               "output_shards": len(outputs)}
    manifest = {**accounting, "metrics": metrics, "ratio": metrics["ratio"], "fusion": cfg.caption.fusion,
                "strategy": cfg.sample.strategy, "config_hash": cfg.hash(), "config": cfg.to_dict(),
                # URLs may carry credentials (s3://key:secret@...); the manifest travels with the data
                "input": redact(io.input),
                "input_version": os.environ.get("TLDR_INPUT_VERSION") or input_version(shard_urls),
                "output_shards": [redact(u) for u in outputs]}
    rejects_lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
    storage.write_text_atomic(storage.join(io.shards_dir, "rejects.jsonl"), rejects_lines)
    storage.write_text_atomic(manifest_url, json.dumps(manifest, indent=1, sort_keys=True))
    return StageResult(metrics=metrics, outputs=outputs + [manifest_url])


def _output_parts(sample: Sample, selected_row: dict, generated: str, fusion: str) -> dict[str, bytes]:
    meta = {"original_caption": sample.caption, "generated_caption": generated, "fusion": fusion,
            "cluster": int(selected_row["cluster"]), "source_shard": sample.shard, "source_key": sample.key}
    if "truth" in sample.meta:
        meta["truth"] = sample.meta["truth"]
    return {sample.image_ext: sample.image_bytes, "txt": fuse(sample.caption, generated, fusion).encode("utf-8"),
            "json": encode_json(meta)}


def main(argv=None):
    return stage_main("materialize", argv)
