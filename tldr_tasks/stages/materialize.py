"""materialize: write the compressed WebDataset shards with refined captions, plus the manifest.

Selection wrote keys, not copies; this is the one step that copies images. Output shards use the
input layout (`KEY.png|jpg|webp`, `KEY.txt`, `KEY.json`), readable by open_clip's webdataset loader.
`KEY.txt` holds exactly the caption a trainer should use (fusion.ship_caption: the quality gate, the
collapse check and caption.fusion, decided once per sample); `KEY.json` the original and generated
captions, the generated caption's confidence, the pair's alignment score, why that caption shipped,
cluster id and source shard. `manifest.json` accounts for every input sample (kept + dropped by
selection + rejected with a reason, per shard and in total), counts the shipped captions per reason,
measures with the strict judge (data/truth.py) how noisy the shipped and the original captions are when
the crawl carries ground truth (KEY.json "truth", the benchmark crawls), carries the trust summary
(trust.py: input vs kept vs a random subset of the same size), and is written last: its presence means
the output is complete.

No Python object per sample: the assignments (one row per input sample, millions at scale) are counted
in record batches, the selection stays a pyarrow table, and each output shard reads only the caption
parts of the source shards it spans. Only the run-level collapse check holds the kept samples' captions
as strings.

    tldr-vlp run materialize --input crawl/train --out runs/x
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from tldr_tasks import fusion, storage, trust
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO, StageResult
from tldr_tasks.data.shards import RawSample, Sample, encode_json, iter_raw_shard, iter_shard, write_tar
from tldr_tasks.data.truth import describes_exactly
from tldr_tasks.stages import caption
from tldr_tasks.tracking import redact

log = logging.getLogger(__name__)

CAPTION_REASONS = (fusion.REPLACED, fusion.REPAIRED, fusion.APPENDED, fusion.ORIGINAL_BY_FUSION,
                   fusion.ORIGINAL_LOW_CONFIDENCE, fusion.ORIGINAL_UNGROUNDED, fusion.ORIGINAL_COLLAPSE,
                   fusion.ORIGINAL_NO_GENERATED)
BATCH_ROWS = 65_536  # rows held as Python objects at a time


def input_version(shard_urls: list[str]) -> str:
    """A digest of the input shards' names and contents: which crawl version this output came from
    (two crawls whose shards have the same names and sizes still differ)."""
    from tldr_tasks.content import shard_id

    digest = hashlib.sha256()
    for url in shard_urls:
        digest.update(f"{shard_id(url)}\n".encode())
    return digest.hexdigest()[:16]


def account(assignments: Iterable[pa.RecordBatch], rejects: list[dict], selected: pa.Table,
            carved: pa.Table | None = None) -> dict:
    """Per-shard and total counts: input = kept + dropped + carved + rejected.

    Args:
        assignments: record batches with `key` and `shard` columns, one row per input sample; counted a
            batch at a time, so memory does not grow with the crawl.
        rejects: rows of cluster/rejects.parquet.
        selected: the kept samples' `key` and `shard` columns.
        carved: the ratio curve's validation split (`key`, `shard`; sample/holdout.parquet), or None (no
            `carved` count then).
    """
    # A batch's keys are looked up among the selected (carved) keys of the batch's own shards: a hash set of
    # those per batch, not of every selected key, keeps the cost linear in the crawl.
    kept_keys = _keys_by_shard(selected)
    carved_keys = _keys_by_shard(carved if carved is not None else selected.slice(0, 0))
    per_shard: dict[str, Counter] = defaultdict(Counter)
    for batch in assignments:
        kept = _member(batch, kept_keys)
        held = _member(batch, carved_keys)
        counts = pa.table({"shard": batch["shard"], "kept": kept, "carved": held}).group_by("shard").aggregate(
            [("kept", "sum"), ("carved", "sum"), ("kept", "count")])
        for shard, n_kept, n_carved, n in zip(*(counts[c].to_pylist()
                                                for c in ("shard", "kept_sum", "carved_sum", "kept_count"))):
            per_shard[shard]["kept"] += n_kept
            per_shard[shard]["carved"] += n_carved
            per_shard[shard]["dropped"] += n - n_kept - n_carved
    by_reason: Counter = Counter()
    for row in rejects:
        if row.get("key") is None:
            continue  # an unreadable shard: no samples could be counted; listed as a shard error
        per_shard[row["shard"]]["rejected"] += 1
        by_reason[row["reason"].split(":")[0]] += 1
    kinds = ("kept", "dropped", "rejected") if carved is None else ("kept", "dropped", "carved", "rejected")
    shards = {}
    for shard, counts in sorted(per_shard.items()):
        shards[shard] = {k: counts[k] for k in kinds}
        shards[shard]["input"] = sum(shards[shard].values())
    total = {k: sum(s[k] for s in shards.values()) for k in ("input", *kinds)}
    return {**{f"{k}_samples" if k == "input" else k: v for k, v in total.items()},
            "rejected_by_reason": dict(sorted(by_reason.items())), "per_shard": shards,
            "shard_errors": [r for r in rejects if r.get("key") is None]}


def _keys_by_shard(table: pa.Table) -> dict[str, pa.Array]:
    lists = table.group_by("shard").aggregate([("key", "list")])
    return dict(zip(lists["shard"].to_pylist(), (keys.values for keys in lists["key_list"])))


def _member(batch: pa.RecordBatch, keys_by_shard: dict[str, pa.Array]) -> pa.Array:
    """Whether each row's key is among `keys_by_shard` of its batch's shards."""
    none = pa.array([], pa.string())
    value_set = pa.concat_arrays([keys_by_shard.get(s, none) for s in pc.unique(batch["shard"]).to_pylist()])
    return pc.is_in(batch["key"], value_set=value_set)


def run(cfg: Config, io: StageIO) -> StageResult:
    manifest_url = storage.join(io.shards_dir, "manifest.json")
    if storage.exists(manifest_url):
        return StageResult(metrics=json.loads(storage.read_text(manifest_url))["metrics"],
                           outputs=[manifest_url], skipped=True)
    shard_urls = io.input_shards()
    # Columnar, never a dict per sample: selected holds ratio x N rows, assignments N (millions at scale).
    selected = storage.read_parquet(storage.join(io.sample_dir, "selected.parquet"))
    selected = selected.set_column(selected.schema.get_field_index("shard"), "shard",
                                   selected["shard"].cast(pa.string()))
    rejects = storage.read_parquet(storage.join(io.cluster_dir, "rejects.parquet")).to_pylist()
    # caption parts are named by their source shard's content
    part_urls = {stem: caption.output_url(io, stem) for stem in sorted(pc.unique(selected["shard"]).to_pylist())}
    # every caption at once, for the run-level decision only: the output shards read the parts they span
    gate = decide_captions(_captions_of(selected["key"], [_read_part(url) for url in part_urls.values()
                                                          if storage.exists(url)]), _repair(selected), cfg)
    collapsed = gate["collapse_check"]["collapsed"]

    selected = _output_order(selected, shard_urls, io.input)
    size = cfg.materialize.shard_size
    outputs = []
    by_url = {storage.shard_stem(u): u for u in shard_urls}
    captions: dict[str, pa.Table] = {}  # the caption parts of the source shards the last group spanned
    noise = ShippedNoise()
    for index, start in enumerate(tqdm(range(0, selected.num_rows, size), desc="materialize", unit="shard")):
        out_url = storage.join(io.shards_dir, f"{index:05d}.tar")
        outputs.append(out_url)
        if storage.exists(out_url):  # finished before a restart: its noise is read back
            for item in iter_raw_shard(out_url):
                if isinstance(item, RawSample):
                    noise.add(item.parts)
            continue
        group = selected.slice(start, size)
        stems = pc.unique(group["shard"]).to_pylist()  # in output order
        # groups follow the source shards: a part is read when its shard is first needed, dropped after
        captions = {s: captions[s] if s in captions else _read_part(part_urls[s]) for s in stems}
        rows = zip(group.to_pylist(), _captions_of(group["key"], list(captions.values())).to_pylist())
        samples = _samples([by_url[s] for s in stems], set(group["key"].to_pylist()))
        entries = [(row["key"], _output_parts(samples[row["key"]], row, cap,
                                              ship(cap, cfg, collapsed, bool(row.get("repair"))),
                                              cfg.caption.fusion)) for row, cap in rows]
        write_tar(out_url, entries)
        for _, parts in entries:
            noise.add(parts)

    assignments = storage.iter_parquet(storage.join(io.cluster_dir, "assignments.parquet"), ["key", "shard"],
                                       BATCH_ROWS)
    holdout_url = storage.join(io.sample_dir, "holdout.parquet")
    carved = storage.read_parquet(holdout_url) if storage.exists(holdout_url) else None
    if carved is not None:
        carved = carved.set_column(carved.schema.get_field_index("shard"), "shard", carved["shard"].cast(pa.string()))
    accounting = account(assignments, rejects, selected.select(["key", "shard"]), carved)
    curve_url = storage.join(io.sample_dir, "curve.json")
    curve = json.loads(storage.read_text(curve_url)) if storage.exists(curve_url) else None
    # the ratio is a share of what could be selected: the validation split is not
    selectable = accounting["input_samples"] - accounting["rejected"] - accounting.get("carved", 0)
    metrics = {"input_samples": accounting["input_samples"], "kept": accounting["kept"],
               "dropped": accounting["dropped"], "carved": accounting.get("carved", 0),
               "rejected": accounting["rejected"],
               "ratio": accounting["kept"] / max(1, selectable),
               "output_shards": len(outputs), **gate["metrics"]}
    caption_noise = noise.report()
    if caption_noise is not None:
        metrics.update(shipped_noise=caption_noise["shipped"], original_noise=caption_noise["original"])
    manifest = {**accounting, "metrics": metrics, "ratio": metrics["ratio"], "fusion": cfg.caption.fusion,
                "captions": gate["captions"], "collapse_check": gate["collapse_check"],
                "caption_noise": caption_noise, **({} if caption_noise else {"caption_noise_note": noise.note()}),
                "alignment": sample_alignment_stats(io),
                # the ratio curve on the carved validation split and, with ratio auto, its choice (curve.py)
                "curve": curve,
                # input vs kept vs a random subset of the same size on label-free signals (trust.py)
                "trust": trust.measure(cfg, io),
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


class ShippedNoise:
    """The strict judge's count of noisy captions among the shipped samples, overall and per reason, for the
    shipped caption (KEY.txt) and the original one (KEY.json): what the gate changed. Fed one output sample's
    parts at a time, so memory does not grow with the output."""

    def __init__(self):
        self.samples = self.without_truth = 0
        self.by_reason: dict[str, Counter] = defaultdict(Counter)

    def add(self, parts: dict[str, bytes]) -> None:
        self.samples += 1
        meta = json.loads(parts["json"])
        truth = meta.get("truth")
        if truth is None:
            self.without_truth += 1
            return
        counts = self.by_reason[meta["caption_reason"]]
        counts["shipped"] += 1
        counts["noisy"] += not describes_exactly(parts["txt"].decode("utf-8"), truth)
        counts["original_noisy"] += not describes_exactly(meta["original_caption"], truth)

    def report(self) -> dict | None:
        """{"judge", "samples", "shipped", "original", "by_reason"} (shares of noisy captions, and per reason
        counts); None unless every shipped sample has ground truth: a share of some samples would mislead."""
        if not self.samples or self.without_truth:
            return None
        noisy = sum(c["noisy"] for c in self.by_reason.values())
        original = sum(c["original_noisy"] for c in self.by_reason.values())
        return {"judge": "strict", "samples": self.samples, "shipped": noisy / self.samples,
                "original": original / self.samples,
                "by_reason": {reason: dict(counts) for reason, counts in sorted(self.by_reason.items())}}

    def note(self) -> str:
        """Why report() is None."""
        if not self.samples:
            return "no sample was kept: caption noise is not measured"
        return (f"{self.without_truth} of {self.samples} kept samples have no ground truth (KEY.json \"truth\"; "
                "only the benchmark crawls carry it): caption noise is not measured")


def _captioner_version(io: StageIO) -> str | None:
    from tldr_tasks.models.captioner import MARKER, captioner_version

    return captioner_version(io.captioner_dir) if storage.exists(storage.join(io.captioner_dir, MARKER)) else None


def _repair(selected: pa.Table) -> pa.Array:
    """Per selected row, whether the selection kept it to be repaired (sample.misaligned: repair)."""
    if "repair" in selected.column_names:
        return selected["repair"].combine_chunks().fill_null(False)
    return pa.array([False] * selected.num_rows)


def decide_captions(captions: pa.Table, repair: pa.Array, cfg: Config) -> dict:
    """The gate's report on the captions of every kept sample (`captions`: caption.CAPTION_SCHEMA rows, in
    selected.parquet order; `repair`: its flag per row): the run-level collapse check, the count per reason
    (what `ship` decides) and the confidence distribution. A collapse is logged."""
    c = cfg.caption
    # two string columns as Python lists: the only per-sample objects held all at once
    check = fusion.collapse_check(captions["original"].to_pylist(), captions["generated"].to_pylist(),
                                  c.min_entropy_ratio)
    if check["collapsed"] and c.fusion != "original":
        log.warning("the generated captions collapsed (%d distinct for %d images, entropy %.2f of the originals' "
                    "< %s): shipping the original captions. Train the captioner longer, from a pretrained model "
                    "(captioner.init_from), or on more data.", check["distinct_generated"], check["samples"],
                    check["entropy_ratio"], c.min_entropy_ratio)
    reasons: Counter = Counter()
    for batch in captions.append_column("repair", repair).to_batches(max_chunksize=BATCH_ROWS):
        reasons.update(ship(row, cfg, check["collapsed"], row["repair"])[1] for row in batch.to_pylist())
    confidence = captions["confidence"].to_numpy()  # a null is NaN
    grounding = captions["grounding"].to_numpy()
    counts = {**dict.fromkeys(CAPTION_REASONS, 0), **reasons}  # and any reason fusion adds
    metrics = {f"captions_{reason.replace(':', '_')}": float(n) for reason, n in counts.items()}
    metrics.update(caption_collapsed=float(check["collapsed"]), caption_entropy_ratio=check["entropy_ratio"],
                   caption_confidence_mean=_mean(confidence), caption_grounding_mean=_mean(grounding))
    return {"captions": counts, "collapse_check": check, "metrics": metrics}


def ship(row: dict, cfg: Config, collapsed: bool, repair: bool) -> tuple[str, str]:
    """(text, reason): the caption the kept sample of caption-part row `row` ships (fusion.ship_caption). A pair
    sample.filter's repair passed ships the generated caption its selection scored."""
    c = cfg.caption
    return fusion.ship_caption(row["key"], row["original"], row["generated"], _score(row, "confidence"),
                               _score(row, "grounding"), mode=c.fusion, min_confidence=c.min_confidence,
                               min_grounding=c.min_grounding, seed=cfg.seed, collapsed=collapsed, repair=repair,
                               passed_filter=repair and cfg.sample.filter != "none")


def _read_part(url: str) -> pa.Table:
    """A caption part as caption.CAPTION_SCHEMA; a part written before the gate has no confidence or grounding
    (null)."""
    part, schema = storage.read_parquet(url), caption.CAPTION_SCHEMA
    return pa.Table.from_arrays([part[f.name].cast(f.type) if f.name in part.column_names
                                 else pa.nulls(part.num_rows, f.type) for f in schema], schema=schema)


def _captions_of(keys: pa.ChunkedArray, parts: list[pa.Table]) -> pa.Table:
    """The caption rows of `keys`, in their order, from the caption parts `parts`."""
    table = pa.concat_tables([caption.CAPTION_SCHEMA.empty_table(), *parts])
    index = pc.index_in(keys, value_set=table["key"])
    if index.null_count:
        missing = keys.filter(pc.is_null(index))
        raise ConfigError(f"{len(missing)} selected samples have no generated caption, e.g. {missing[0].as_py()} "
                          "(run the caption stage for every shard group first)")
    return table.take(index)


def _output_order(selected: pa.Table, shard_urls: list[str], input_url: str) -> pa.Table:
    """`selected` in output order, the input order (source shard, then key): deterministic shard contents."""
    order = pc.index_in(selected["shard"], value_set=pa.array([storage.shard_stem(u) for u in shard_urls]))
    if order.null_count:
        raise ValueError(f"selected.parquet names shards that are not in --input {redact(input_url)}: "
                         "materialize with the same --input the selection was made from")
    ordered = selected.append_column("order", order).sort_by([("order", "ascending"), ("key", "ascending")])
    return ordered.drop_columns(["order"])


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


def _samples(shard_urls: list[str], keys: set[str]) -> dict[str, Sample]:
    """The samples of `keys` from the shards `shard_urls` (the first of a key repeated)."""
    samples: dict[str, Sample] = {}
    for url in shard_urls:
        for item in iter_shard(url):
            if isinstance(item, Sample) and item.key in keys and item.key not in samples:
                samples[item.key] = item
    return samples


def _output_parts(sample: Sample, selected_row: dict, caption_row: dict, shipped: tuple[str, str],
                  fusion_mode: str) -> dict[str, bytes]:
    text, reason = shipped
    meta = {"original_caption": sample.caption, "generated_caption": caption_row["generated"],
            "confidence": _score(caption_row, "confidence"), "grounding": _score(caption_row, "grounding"),
            "alignment": selected_row.get("alignment"), "repair": bool(selected_row.get("repair")),
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
