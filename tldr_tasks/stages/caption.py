"""Stage `caption`: a generated caption for every selected image (beam search, KV cache), each by the
captioner of its cross-fitting fold, which never trained on it (tldr_tasks/folds.py).

    tldr-vlp run caption --input 'crawl/train/{00000..00007}.tar' --out runs/r1 \
        --shard-index 0 --num-shards 4

Reads `{sample_dir}/selected.parquet` (key, shard, cluster), takes this worker's source shards
(every num_shards-th of the sorted shard stems), decodes only the selected samples and writes
`{caption_dir}/{stem}.parquet` (key, original, generated, confidence, grounding) per source shard,
atomically. A shard whose parquet exists is skipped, so a restarted worker only does what is left.
A kept sample the selection already captioned (the filter's repair: `{sample_dir}/recaptioned.parquet`, made
with the same captioner and caption settings) keeps that caption, the one its selection scored.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from tldr_tasks import storage
from tldr_tasks.config import Config, ConfigError
from tldr_tasks.contract import StageIO, StageResult, my_parts

log = logging.getLogger(__name__)


def run(cfg: Config, io: StageIO, shard_index: int = 0, num_shards: int = 1) -> StageResult:
    """Caption the selected samples of this worker's source shards."""
    selected_url = storage.join(io.sample_dir, "selected.parquet")
    if not storage.exists(selected_url):
        raise ConfigError(f"{selected_url} not found (run the sample stage with the same --out first)")
    table = storage.read_parquet(selected_url, columns=["key", "shard"])
    keys_by_shard: dict[str, set[str]] = {}
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        keys_by_shard.setdefault(str(shard), set()).add(str(key))

    urls = {storage.shard_stem(u): u for u in io.input_shards()}
    unknown = sorted(set(keys_by_shard) - set(urls))
    if unknown:
        raise ValueError(f"selected.parquet names shards {unknown[:5]} that are not in --input {io.input}: "
                         "caption with the same --input the selection was made from")
    mine = my_parts(sorted(keys_by_shard), shard_index, num_shards)
    todo = [s for s in mine if not storage.exists(output_url(io, s))]
    if not todo:
        log.info("caption: all %d shard(s) of worker %d/%d already done", len(mine), shard_index, num_shards)
        return StageResult(metrics={"captions_written": 0.0, "shards_skipped": float(len(mine))},
                           outputs=[output_url(io, s) for s in mine], skipped=True)

    known = captioned_by_selection(io)
    captioners = Captioners(io)
    written, reused, seconds = 0, 0, 0.0
    for stem in todo:
        started = time.time()
        done = known.filter(pc.is_in(known["key"], pa.array(sorted(keys_by_shard[stem]), pa.string())))
        left = keys_by_shard[stem] - set(done["key"].to_pylist())
        columns = caption_shard(captioners.get(), urls[stem], left, cfg, captioners.device) if left else ([],) * 5
        seconds += time.time() - started
        write_captions(output_url(io, stem), *(list(a) + done[name].to_pylist()
                                               for a, name in zip(columns, CAPTION_SCHEMA.names)))
        written, reused = written + len(columns[0]), reused + done.num_rows
    return StageResult(
        metrics={"captions_written": float(written), "captions_per_second": written / seconds if seconds else 0.0,
                 "captions_reused": float(reused), "shards_done": float(len(todo)),
                 "shards_skipped": float(len(mine) - len(todo))},
        outputs=[output_url(io, s) for s in mine])


# A caption part's columns, typed so that parts concatenate.
CAPTION_SCHEMA = pa.schema([("key", pa.string()), ("original", pa.string()), ("generated", pa.string()),
                            ("confidence", pa.float64()), ("grounding", pa.float64())])


class Captioners:
    """Every cross-fitting fold's captioner (`load_fold_captioners`), loaded when first needed."""

    def __init__(self, io: StageIO):
        import torch

        self.folder = io.captioner_dir
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded: list | None = None

    def get(self) -> list:
        from tldr_tasks.models.captioner import load_fold_captioners

        if self.loaded is None:
            self.loaded = load_fold_captioners(self.folder, device=self.device)
        return self.loaded


def captioned_by_selection(io: StageIO):
    """The captions the selection made (`{sample_dir}/recaptioned.parquet`: the filter's repair), or an empty
    table."""
    url = storage.join(io.sample_dir, "recaptioned.parquet")
    if storage.exists(url):
        return storage.read_parquet(url, columns=CAPTION_SCHEMA.names)
    return CAPTION_SCHEMA.empty_table()


def caption_rows(cfg: Config, io: StageIO, keys, stems, desc: str):
    """The caption part rows (CAPTION_SCHEMA) of the samples `keys` (distinct) of the source shards `stems` (one per
    key), in the order of `keys`, each captioned by its own fold's captioner, as the caption stage does."""
    by_stem: dict[str, set[str]] = {}
    for key, stem in zip(keys, stems):
        by_stem.setdefault(str(stem), set()).add(str(key))
    urls = {storage.shard_stem(u): u for u in io.input_shards()}
    captioners = Captioners(io)
    columns: list[list] = [[] for _ in CAPTION_SCHEMA.names]
    for stem in sorted(by_stem):
        log.info("%s: %s, %d samples", desc, stem, len(by_stem[stem]))
        for out, values in zip(columns, caption_shard(captioners.get(), urls[stem], by_stem[stem], cfg,
                                                      captioners.device)):
            out.extend(values)
    table = pa.table(dict(zip(CAPTION_SCHEMA.names, columns)), schema=CAPTION_SCHEMA)
    row = {key: i for i, key in enumerate(columns[0])}  # shard order -> the order asked for
    return table.take(pa.array([row[str(key)] for key in keys], pa.int64()))


def output_url(io: StageIO, stem: str) -> str:
    """The caption part of a source shard's content, `{stem}-{md5}.parquet` (tldr_tasks.content): a
    re-landed shard of the same name is captioned again, never given the old content's captions."""
    from tldr_tasks import content

    url = next(u for u in io.input_shards() if storage.shard_stem(u) == stem)
    return storage.join(io.caption_dir, f"{content.shard_id(url)}.parquet")


def caption_shard(captioners: list, shard_url: str, keys: set[str], cfg: Config, device: str):
    """(keys, originals, generated captions, confidences, groundings) for the `keys` of one shard, in shard
    order. `captioners`: [(model, tokenizer)] per cross-fitting fold (`load_fold_captioners`); each sample is
    captioned by its own fold's captioner, which never trained on it (one pass over the shard per fold).
    Raises when a selected key is missing or unreadable: the selection and the input disagree."""
    from tqdm import tqdm

    from tldr_tasks.data.shards import RawSample, Sample, iter_raw_shard
    from tldr_tasks.folds import fold_of

    rows: list[tuple] = []  # (position in the shard, key, original, caption, confidence, grounding)
    with tqdm(total=len(keys), desc=f"caption {storage.shard_stem(shard_url)}", unit="img",
              file=sys.stderr, disable=None) as progress:
        for fold, (model, tokenizer) in enumerate(captioners):
            wanted = {k for k in keys if fold_of(k, len(captioners)) == fold}
            found: list[tuple[int, str, str]] = []

            def selected_images(wanted=wanted, found=found):
                # Only this fold's selected samples are decoded: the rest of the shard is read, never decoded.
                for position, raw in enumerate(iter_raw_shard(shard_url)):
                    item = raw.decode() if isinstance(raw, RawSample) and raw.key in wanted else None
                    if isinstance(item, Sample):
                        found.append((position, item.key, item.caption))
                        yield item.image

            if wanted:
                outputs = caption_images(model, tokenizer, selected_images(), cfg.caption, device, progress)
                rows += [(*sample, *scores) for sample, *scores in zip(found, *outputs)]
    rows.sort(key=lambda row: row[0])
    missing = keys - {row[1] for row in rows}
    if missing:
        raise ValueError(f"{len(missing)} selected key(s) of {shard_url} are missing or unreadable there "
                         f"(e.g. {sorted(missing)[:3]}): the input changed since the selection was made")
    return tuple([row[i] for row in rows] for i in range(1, 6))


def caption_images(model, tokenizer, images: Iterable, c, device: str,
                   progress=None) -> tuple[list[str], list[float], list[float]]:
    """(beam-search captions, confidences, groundings) of PIL images, `c.batch_size` at a time, with `c` a
    CaptionConfig: the one way the caption stage and the evaluation caption. Grounding compares the
    images of a batch with each other, so the same images in the same order get the same scores.
    `progress`, a tqdm bar, advances by each batch's images."""
    from tldr_tasks.preprocess import image_to_tensor

    captions: list[str] = []
    confidence: list[float] = []
    grounding: list[float] = []
    images = iter(images)
    while batch := list(itertools.islice(images, c.batch_size)):
        pixels = image_to_tensor(batch, model.image_size).to(device)
        for out, values in zip((captions, confidence, grounding), caption_batch(model, tokenizer, pixels, c)):
            out.extend(values)
        if progress is not None:
            progress.update(len(batch))
    return captions, confidence, grounding


def caption_batch(model, tokenizer, pixels, c) -> tuple[list[str], list[float], list[float]]:
    """(beam-search captions, confidences, groundings) of a batch of images (FloatTensor [B, 3, S, S]
    from `image_to_tensor`), with `c` a CaptionConfig's beams and lengths; the encoder runs once for all three."""
    import torch

    with torch.inference_mode():
        quantized = model.encode(pixels).quantized
        captions = model.captions_from(quantized, tokenizer, num_beams=c.num_beams, min_new_tokens=c.min_new_tokens,
                                       max_new_tokens=c.max_new_tokens)
        return captions, *caption_confidence(model, tokenizer, quantized, captions)


def caption_confidence(model, tokenizer, quantized, captions: list[str]) -> tuple[list[float], list[float]]:
    """Two scores per caption (NaN for an empty one), both teacher-forced:
    confidence  the mean token log-probability of the caption given its image (length-normalised);
    grounding   confidence minus the same given the image half a batch away: how much the image, not
                the language model alone, explains the caption. A collapsed or undertrained
                captioner writes fluent, confident captions that fit any image: grounding ~0. (Half a
                batch, not the next image: shards in key order put near-duplicates side by side.)
    The gate in fusion.ship_caption reads both. `quantized` holds the images' quantised tokens
    (`model.encode(pixels).quantized`)."""
    import torch

    from tldr_tasks.preprocess import tokenize_captions

    confidence = [float("nan")] * len(captions)
    grounding = [float("nan")] * len(captions)
    rows = [i for i, text in enumerate(captions) if text.strip()]
    if rows:
        ids, mask = tokenize_captions(tokenizer, [captions[i] for i in rows], model.arch["max_tokens"])
        ids, mask = ids.to(quantized.device), mask.to(quantized.device)
        own = quantized[rows]
        with torch.inference_mode():
            given_own = -model.caption_loss(own, ids, mask).float().cpu()
            given_other = -model.caption_loss(own.roll(max(1, len(rows) // 2), dims=0), ids, mask).float().cpu()
        for j, i in enumerate(rows):
            confidence[i] = float(given_own[j])
            if len(rows) > 1:  # a lone caption has no other image to compare with
                grounding[i] = float(given_own[j] - given_other[j])
    return confidence, grounding


def write_captions(url: str, keys: list[str], originals: list[str], captions: list[str],
                   confidence: list[float], grounding: list[float]) -> None:
    storage.write_parquet(url, pa.table(dict(zip(CAPTION_SCHEMA.names, (keys, originals, captions, confidence,
                                                                        grounding))), schema=CAPTION_SCHEMA))
