"""materialize: write the compressed WebDataset shards with refined captions, plus the manifest.

Selection wrote keys, not copies; this is the one step that copies images. Output shards use the
input layout (`KEY.png|jpg|webp`, `KEY.txt`, `KEY.json`), readable by open_clip's webdataset loader.
`KEY.txt` holds exactly the caption a trainer should use (fusion.ship_caption: the quality gate, the
collapse check and caption.fusion, decided once per sample); `KEY.json` the original and generated
captions, the generated caption's confidence, the pair's alignment score, why that caption shipped,
cluster id and source shard. `manifest.json` accounts for every input sample (kept + dropped by
selection + rejected with a reason, per shard and in total), counts the shipped captions per reason
and is written last: its presence means the output is complete.

    tldr-vlp run materialize --input crawl/train --out runs/x
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter, defaultdict

import numpy as np
from tqdm import tqdm

from tldr_tasks import fusion, storage
from tldr_tasks.config import Config
from tldr_tasks.data.shards import Sample, encode_json, iter_shard, write_tar
from tldr_tasks.stage_cli import stage_main
from tldr_tasks.stages import caption
from tldr_tasks.stages.base import StageIO, StageResult
from tldr_tasks.tracking import redact

CAPTION_REASONS = (fusion.REPLACED, fusion.APPENDED, fusion.ORIGINAL_BY_FUSION, fusion.ORIGINAL_LOW_CONFIDENCE,
                   fusion.ORIGINAL_UNGROUNDED, fusion.ORIGINAL_COLLAPSE, fusion.ORIGINAL_NO_GENERATED)


def _rows(url: str) -> list[dict]:
    return storage.read_parquet(url).to_pylist()


def input_version(shard_urls: list[str]) -> str:
    """A digest of the input shards' names and contents: which crawl version this output came from
    (two crawls whose shards have the same names and sizes still differ)."""
    from tldr_tasks.content import shard_id

    digest = hashlib.sha256()
    for url in shard_urls:
        digest.update(f"{shard_id(url)}\n".encode())
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
    selected = _rows(storage.join(io.sample_dir, "selected.parquet"))
    assignments = _rows(storage.join(io.cluster_dir, "assignments.parquet"))
    rejects = _rows(storage.join(io.cluster_dir, "rejects.parquet"))
    selected_by_key = {row["key"]: row for row in selected}

    # Output order is the input order (source shard, then key): deterministic shard contents.
    shard_order = {storage.shard_stem(u): i for i, u in enumerate(shard_urls)}
    ordered = sorted(selected, key=lambda r: (shard_order[r["shard"]], r["key"]))
    size = cfg.materialize.shard_size
    groups = [ordered[i:i + size] for i in range(0, len(ordered), size)]
    captions: dict[str, dict] = {}
    for stem in sorted({r["shard"] for r in selected}):
        part = caption.output_url(io, stem)  # named by the source shard's content
        if storage.exists(part):
            captions.update((row["key"], row) for row in _rows(part))
    missing = [r["key"] for r in selected if r["key"] not in captions]
    if missing:
        raise RuntimeError(f"{len(missing)} selected samples have no generated caption (e.g. {missing[0]}): "
                           "run the caption stage for every shard group first")
    shipped, gate = decide_captions(selected, captions, cfg)

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
                                                       captions[row["key"]], shipped[row["key"]], cfg.caption.fusion))
                            for row in group])

    accounting = account(assignments, rejects, set(selected_by_key))
    metrics = {"input_samples": accounting["input_samples"], "kept": accounting["kept"],
               "dropped": accounting["dropped"], "rejected": accounting["rejected"],
               "ratio": accounting["kept"] / max(1, accounting["input_samples"] - accounting["rejected"]),
               "output_shards": len(outputs), **gate["metrics"]}
    manifest = {**accounting, "metrics": metrics, "ratio": metrics["ratio"], "fusion": cfg.caption.fusion,
                "captions": gate["captions"], "collapse_check": gate["collapse_check"],
                "alignment": sample_alignment_stats(io),
                "strategy": cfg.sample.strategy, "config_hash": cfg.hash(), "config": cfg.to_dict(),
                # URLs may carry credentials (s3://key:secret@...); the manifest travels with the data
                "input": redact(io.input),
                "input_version": os.environ.get("TLDR_INPUT_VERSION") or input_version(shard_urls),
                "output_shards": [redact(u) for u in outputs],
                # Lineage (issue 9): the output's content digest (same recipe as input_version) and the
                # weights hash of the captioner that wrote the captions; MLflow records both too.
                "output_version": input_version(outputs), "captioner_version": _captioner_version(io)}
    rejects_lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
    storage.write_text_atomic(storage.join(io.shards_dir, "rejects.jsonl"), rejects_lines)
    storage.write_text_atomic(manifest_url, json.dumps(manifest, indent=1, sort_keys=True))
    return StageResult(metrics=metrics, outputs=outputs + [manifest_url])


def _captioner_version(io: StageIO) -> str | None:
    from tldr_tasks.models.captioner import MARKER, captioner_version

    return captioner_version(io.captioner_dir) if storage.exists(storage.join(io.captioner_dir, MARKER)) else None


def decide_captions(selected: list[dict], captions: dict[str, dict], cfg: Config) -> tuple[dict, dict]:
    """The caption every kept sample ships ({key: (text, reason)}) and the gate's report: the run-level
    collapse check, the count per reason and the confidence distribution. A collapse is printed."""
    c = cfg.caption
    rows = [captions[r["key"]] for r in selected]
    check = fusion.collapse_check([r["original"] for r in rows], [r["generated"] for r in rows], c.min_entropy_ratio)
    if check["collapsed"] and c.fusion != "original":
        print(f"materialize: the generated captions collapsed ({check['distinct_generated']} distinct for "
              f"{check['samples']} images, entropy {check['entropy_ratio']:.2f} of the originals' < "
              f"{c.min_entropy_ratio}): shipping the original captions. Train the captioner longer, from a "
              "pretrained model (captioner.init_from), or on more data.", file=sys.stderr)
    shipped = {r["key"]: fusion.ship_caption(r["key"], r["original"], r["generated"], _score(r, "confidence"),
                                             _score(r, "grounding"), mode=c.fusion, min_confidence=c.min_confidence,
                                             min_grounding=c.min_grounding, seed=cfg.seed,
                                             collapsed=check["collapsed"])
               for r in rows}
    reasons = Counter(reason for _, reason in shipped.values())
    confidence = np.array([_score(r, "confidence") for r in rows], dtype=np.float64)
    grounding = np.array([_score(r, "grounding") for r in rows], dtype=np.float64)
    counts = {reason: reasons.get(reason, 0) for reason in CAPTION_REASONS}
    metrics = {f"captions_{reason.replace(':', '_')}": float(n) for reason, n in counts.items()}
    metrics.update(caption_collapsed=float(check["collapsed"]), caption_entropy_ratio=check["entropy_ratio"],
                   caption_confidence_mean=_mean(confidence), caption_grounding_mean=_mean(grounding))
    return shipped, {"captions": counts, "collapse_check": check, "metrics": metrics}


def _score(row: dict, name: str) -> float:
    value = row.get(name)
    return float("nan") if value is None else float(value)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def sample_alignment_stats(io: StageIO) -> dict:
    """The alignment distribution before/after selection, as the sample stage measured it."""
    url = storage.join(io.sample_dir, "stats.json")
    stats = json.loads(storage.read_text(url)) if storage.exists(url) else {}
    return {k: v for k, v in stats.items() if k.startswith("alignment")}


def _output_parts(sample: Sample, selected_row: dict, caption_row: dict, shipped: tuple[str, str],
                  fusion_mode: str) -> dict[str, bytes]:
    text, reason = shipped
    meta = {"original_caption": sample.caption, "generated_caption": caption_row["generated"],
            "confidence": _score(caption_row, "confidence"), "grounding": _score(caption_row, "grounding"),
            "alignment": selected_row.get("alignment"),
            "caption_reason": reason, "fusion": fusion_mode, "cluster": int(selected_row["cluster"]),
            "source_shard": sample.shard, "source_key": sample.key}
    if meta["alignment"] is not None and not np.isfinite(meta["alignment"]):
        meta["alignment"] = None  # an empty caption: strict JSON has no -inf
    for name in ("confidence", "grounding"):
        if meta[name] != meta[name]:
            meta[name] = None
    if "truth" in sample.meta:
        meta["truth"] = sample.meta["truth"]
    return {sample.image_ext: sample.image_bytes, "txt": text.encode("utf-8"), "json": encode_json(meta)}


def main(argv=None):
    return stage_main("materialize", argv)
