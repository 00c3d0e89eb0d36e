"""evaluate: train the same evaluation model on the full crawl, the TL;DR subset and baselines, and score
each on a clean held-out validation split (every default is chosen there) and test split (reported).
The model is `evaluate.preset`: a from-scratch CLIP size (models/clip.py) or one on pretrained towers
(models/towers_clip.py: towers-locked, towers-lit), whose locked image tower's features stand in for the
pixels (`spool`: computed once per shard content, kept in the embed cache); arms, budgets and scores are the
same for every preset.

Arms (evaluate.arms):
    full              every accepted input sample, original captions.
    tldr              the compressed shards exactly as a client reads them: KEY.txt.
    random            a seeded uniform subset of the accepted input, as large as the TL;DR set,
                      original captions (the paper's baseline).
    tldr_original     the TL;DR selection with the original captions: what selection alone does.
    random_generated  the random subset with captions from the run's captioner, shipped by the same
                      rule as the TL;DR set (fusion, gate, collapse check): what captions alone do.
    tldr_<fusion>     the TL;DR selection shipped with another caption.fusion (mix, generated, concat),
                      decided by the same fusion.ship_caption: how a fusion would do before it ships.
    oracle_clean      a seeded subset of the input's truly clean pairs (ground truth `truth.noise` is
                      "none"), as large as the TL;DR set: the ceiling of a benchmark crawl.
Budgets (evaluate.budgets): `compute` trains every arm evaluate.epochs * ceil(N_full / batch) optimizer
steps (compute-matched, as DataComp: compares data quality); `epochs` trains evaluate.epochs of the
arm's own data (the paper's protocol), reported as `<arm>_epochs`. Every arm is scored on both splits
at evaluate.curve_points of its budget too: time_to_accuracy is the share of the full arm's steps an
arm needs to reach 95% of the full arm's best mean R@1, linearly interpolated between checkpoints (from
R@1 0 at step 0). Every arm of one input trains with one tokenizer, learnt from the input's captions,
and one initialisation (cfg.seed): arms differ in their data only.
Scores: image->text and text->image R@1/5/10 (a hit is any retrieved item showing the same scene:
eval descriptions repeat), zero-shot colour/shape accuracy, training seconds. With ground truth in
KEY.json ("truth") it also measures the caption noise of the input, of what each arm trains on and of
what ships, and the captioner's accuracy on the held-out images, head and tail scenes apart.
Writes `evaluate/report.json` and `evaluate/retrieval.png` (bars and learning curves).
Every input is read once as a stream into local scratch files ($TMPDIR, data/spool.py) and trained
from there by index: memory does not hold the decoded crawl, and the batches are the in-memory ones.

    tldr-vlp run evaluate --input crawl/train --eval-input crawl/eval --out runs/x
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io as _io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from tldr_tasks import storage
from tldr_tasks.config import FUSIONS, Config, ConfigError
from tldr_tasks.contract import StageIO, StageResult
from tldr_tasks.data.spool import Pixels, Split, write_spool
from tldr_tasks.data.truth import describes_exactly, noise_rate
from tldr_tasks.fusion import collapse_check, ship_caption

SPLITS = ("validation", "test")
TIME_TO_ACCURACY_SHARE = 0.95


def split_eval(split: Split) -> dict[str, Split]:
    """The held-out shards halved into validation and test by a hash of each key: stable whatever the
    shard layout, and the same items on every run."""
    parts = {name: [] for name in SPLITS}
    for i, key in enumerate(split.keys):
        parts[SPLITS[hashlib.sha256(key.encode()).digest()[0] % 2]].append(i)
    return {name: split.take(index) for name, index in parts.items()}


def compressed_fields(split: Split) -> dict[str, Sequence]:
    """original, generated, confidence, grounding per compressed sample (views of the KEY.json materialize wrote)."""
    originals = split.metas.field("original_caption")
    missing = next((k for k, o in zip(split.keys, originals) if o is None), None)
    if missing is not None:
        raise ValueError(f"compressed samples (e.g. {missing}) lack original_caption in KEY.json: "
                         "the shards were not written by `materialize`; rerun it")
    return {"original": originals, **{name: split.metas.field(field)
                                      for name, field in (("generated", "generated_caption"),
                                                          ("confidence", "confidence"), ("grounding", "grounding"),
                                                          ("repair", "repair"))}}


def random_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of `size` out of `n_total` (without replacement)."""
    if size > n_total:
        raise ValueError(f"the TL;DR set ({size}) is larger than the accepted input ({n_total}): "
                         "--input must be the crawl the compressed shards came from")
    return np.sort(np.random.default_rng([seed, 1]).choice(n_total, size=size, replace=False))


def shipped_captions(keys: Sequence[str], originals: Sequence[str], generated: Sequence[str | None],
                     confidence: Sequence[float | None], grounding: Sequence[float | None], cfg: Config,
                     fusion: str, repair: Sequence[bool | None] | None = None) -> list[str]:
    """What materialize would write to KEY.txt for these samples with caption.fusion = `fusion`
    (a missing generated caption is empty, a missing score NaN, as in KEY.json; `repair`: the selection's
    flag per sample, None: none)."""
    c = cfg.caption
    generated = [g or "" for g in generated]
    collapsed = collapse_check(list(originals), generated, c.min_entropy_ratio)["collapsed"]
    nan = float("nan")
    repair = repair if repair is not None else [False] * len(keys)
    return [ship_caption(k, o, g, nan if conf is None else conf, nan if ground is None else ground, mode=fusion,
                         min_confidence=c.min_confidence, min_grounding=c.min_grounding, seed=cfg.seed,
                         collapsed=collapsed, repair=bool(r),
                         passed_filter=bool(r) and cfg.sample.filter != "none")[0]
            for k, o, g, conf, ground, r in zip(keys, originals, generated, confidence, grounding, repair)]


def generate(io: StageIO, cfg: Config, images, desc: str,
             keys: Sequence[str] | None = None) -> tuple[list[str], list[float], list[float]]:
    """Captions, confidences and groundings for uint8 images (an array or a spool's Pixels), as the caption
    stage makes them (`caption.caption_images`). With `keys` (crawl samples), each image is captioned by its
    cross-fitting fold's captioner, which never trained on it; without (held-out images, which no
    captioner trained on), by fold 0's."""
    import torch
    from PIL import Image

    from tldr_tasks.folds import fold_of
    from tldr_tasks.models.captioner import captioner_version
    from tldr_tasks.stages.caption import caption_images

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = getattr(images, "pixels", None) or images  # a towers preset's feature rows carry their pixels
    captioners = _loaded_captioners(io.captioner_dir, captioner_version(io.captioner_dir), device)
    folds = np.array([fold_of(k, len(captioners)) for k in keys] if keys is not None else [0] * len(images))
    captions, confidence, grounding = [""] * len(images), [float("nan")] * len(images), [float("nan")] * len(images)
    step = cfg.caption.batch_size  # read a batch's rows at once (a spool's Pixels reads them in one go)
    with tqdm(total=len(images), desc=f"caption {desc}", unit="img", leave=False) as progress:
        for fold, (model, tokenizer) in enumerate(captioners):
            rows = np.flatnonzero(folds == fold)
            decoded = (Image.fromarray(a) for start in range(0, len(rows), step)
                       for a in images[rows[start:start + step]])
            for i, *values in zip(rows, *caption_images(model, tokenizer, decoded, cfg.caption, device, progress)):
                captions[i], confidence[i], grounding[i] = values
    return captions, confidence, grounding


@functools.lru_cache(maxsize=1)
def _loaded_captioners(url: str, version: str, device: str):
    """Every fold's captioner at `url`, loaded once for the evaluation's calls to `generate`; keyed by its
    weights' version too, so a folder retrained in the same process is loaded again."""
    from tldr_tasks.models.captioner import load_fold_captioners

    return load_fold_captioners(url, device=device)


@dataclass
class Arm:
    """One training set: images and the one caption per sample a trainer reads."""

    name: str
    images: Pixels  # uint8 [N, S, S, 3]
    captions: Sequence[str]
    truths: Sequence[dict] | None = None


def build_arms(names: list[str], full: Split, tldr: Split, cfg: Config, io: StageIO) -> dict[str, Arm]:
    """The training sets of `names` (see the module doc)."""
    fields = functools.cache(lambda: compressed_fields(tldr))  # what the tldr_<fusion> arms re-decide
    idx = random_subset(len(full), len(tldr), cfg.seed)
    arms: dict[str, Arm] = {}
    for name in names:
        if name == "full":
            arms[name] = Arm(name, full.images, full.captions, full.truths())
        elif name == "tldr":
            arms[name] = Arm(name, tldr.images, tldr.captions, tldr.truths())
        elif name == "tldr_original":
            arms[name] = Arm(name, tldr.images, fields()["original"], tldr.truths())
        elif name.startswith("tldr_"):
            mode = name.removeprefix("tldr_")
            if mode not in FUSIONS:
                raise ValueError(f"evaluate.arms: {name!r} names no fusion mode; use tldr_<{'|'.join(FUSIONS)}>")
            f = fields()
            captions = shipped_captions(tldr.keys, f["original"], f["generated"], f["confidence"], f["grounding"],
                                        cfg, mode, f["repair"])
            arms[name] = Arm(name, tldr.images, captions, tldr.truths())
        elif name == "oracle_clean":
            truths = full.truths()
            if truths is None:
                raise ValueError("evaluate.arms: oracle_clean needs ground truth (KEY.json `truth`), which only "
                                 "benchmark crawls have; drop it from evaluate.arms")
            clean = np.flatnonzero([t.get("noise") == "none" for t in truths])
            subset = full.take(clean[random_subset(len(clean), min(len(tldr), len(clean)), cfg.seed)])
            arms[name] = Arm(name, subset.images, subset.captions, subset.truths())
        elif name in ("random", "random_generated"):
            subset = full.take(idx)
            captions = subset.captions
            if name == "random_generated":
                generated, confidence, grounding = generate(io, cfg, subset.images, "random subset", subset.keys)
                captions = shipped_captions(subset.keys, subset.captions, generated, confidence, grounding, cfg,
                                            cfg.caption.fusion)
            arms[name] = Arm(name, subset.images, captions, subset.truths())
        else:
            raise ValueError(f"evaluate.arms: unknown arm {name!r} (full, tldr, random, random_generated, "
                             "oracle_clean or tldr_<fusion>)")
    return arms


def training_steps(n: int, epochs: int, batch_size: int) -> int:
    """epochs * ceil(n / batch) optimizer steps: every arm's budget with n = N_full (compute-matched),
    or an arm's own with n = its size (epoch-matched)."""
    from tldr_tasks.models.clip import epoch_batches

    return epochs * epoch_batches(n, batch_size)


def curve_steps(steps: int, points: list[float]) -> list[int]:
    """The learning curve's step counts: the fractions `points` of `steps`, then `steps` itself."""
    return sorted({max(1, round(p * steps)) for p in points if 0 < p < 1} | {steps})


def time_to_accuracy(curves: dict[str, list[list[float]]], full_steps: int,
                     share: float = TIME_TO_ACCURACY_SHARE) -> dict[str, float | None]:
    """Per arm: the first step at which its mean R@1 reaches `share` of the full arm's best, as a share
    of the full arm's steps; None when it never does (or there is no full arm)."""
    if "full" not in curves:
        return {}
    target = share * max(r1 for _, r1 in curves["full"])
    return {arm: crossing(curve, target) / full_steps if crossing(curve, target) is not None else None
            for arm, curve in curves.items()}


def crossing(curve: list[list[float]], target: float) -> float | None:
    """The step at which a learning curve first reaches `target`, linearly interpolated between its
    checkpoints (the curve starts from R@1 0 at step 0); None when it never does."""
    previous_step, previous_r1 = 0.0, 0.0
    for step, r1 in curve:
        if r1 >= target:
            rise = r1 - previous_r1
            return previous_step + (step - previous_step) * ((target - previous_r1) / rise if rise > 0 else 1.0)
        previous_step, previous_r1 = step, r1
    return None


# --- ground truth (the synthetic benchmark) ---------------------------------------------------------

def load_task(eval_input: str) -> dict:
    """The evaluation task that comes with the held-out data: `task.json` beside its shards ({} when
    there is none: exact-pair hits, no zero-shot). See data/synthetic.py `eval_task` for the format."""
    shards = storage.expand_shards(eval_input)
    url = storage.join(shards[0].rsplit("/", 1)[0], "task.json") if shards else ""
    return json.loads(storage.read_text(url)) if url and storage.exists(url) else {}


def scene_groups(split: Split, task: dict) -> list[str] | None:
    """The group of every eval item (a retrieved item of the query's group is a hit) when the task
    says hits are judged by group; None: exact pairs only."""
    groups = list(split.metas.field("group")) if task.get("hit") == "group" else []
    return [str(g) for g in groups] if groups and None not in groups else None


def held_out_correct(io: StageIO, cfg: Config, eval_split: Split) -> list[bool]:
    """Whether the captioner's caption of every held-out image is exactly right; computed once per
    captioner, caption settings and held-out set in a process (a benchmark evaluates many selections
    with one captioner)."""
    from tldr_tasks.models.captioner import captioner_version

    keys = hashlib.sha256("\n".join(eval_split.keys).encode()).hexdigest()
    return _held_out_correct(io, cfg, eval_split, (captioner_version(io.captioner_dir), keys,
                                                   json.dumps(cfg.to_dict()["caption"], sort_keys=True)))


_HELD_OUT_CACHE: dict[tuple, list[bool]] = {}


def _held_out_correct(io: StageIO, cfg: Config, eval_split: Split, identity: tuple) -> list[bool]:
    if identity not in _HELD_OUT_CACHE:
        generated = generate(io, cfg, eval_split.images, "held-out")[0]
        _HELD_OUT_CACHE.clear()
        _HELD_OUT_CACHE[identity] = [describes_exactly(g, t) for g, t in zip(generated, eval_split.truths())]
    return _HELD_OUT_CACHE[identity]


def ground_truth_metrics(full: Split, arms: dict[str, Arm], eval_split: Split, io: StageIO, cfg: Config) -> dict:
    """Caption noise of the input, of every arm and of what ships; distinct scenes per arm; the
    captioner's accuracy on held-out images, head and tail scenes apart. {} without ground truth."""
    full_truths, eval_truths = full.truths(), eval_split.truths()
    if full_truths is None or eval_truths is None:
        return {}
    metrics: dict = {"noise_rate_input": noise_rate(full.captions, full_truths), "noise_rate": {},
                     "distinct_scenes": {}, "noise_types": {}}
    for name, arm in arms.items():
        if arm.truths is not None:
            metrics["noise_rate"][name] = noise_rate(arm.captions, arm.truths)
            metrics["distinct_scenes"][name] = len({t.get("scene") for t in arm.truths})
            # the planted kinds among the pairs an arm keeps (what its original captions are)
            kinds = [str(t.get("noise")) for t in arm.truths]
            metrics["noise_types"][name] = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    if "tldr" in metrics["noise_rate"]:
        metrics["noise_rate_output"] = metrics["noise_rate"]["tldr"]
    # Head: the most popular scenes that together make up half the crawl; tail: all others.
    counts: dict = {}
    for t in full_truths:
        counts[t.get("scene")] = counts.get(t.get("scene"), 0) + 1
    head, covered = set(), 0
    for scene, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        if covered >= len(full_truths) / 2:
            break
        head.add(scene)
        covered += count
    correct = held_out_correct(io, cfg, eval_split)
    in_head = [t.get("scene") in head for t in eval_truths]
    metrics["caption_accuracy"] = float(np.mean(correct))
    metrics["caption_accuracy_head"] = float(np.mean([c for c, h in zip(correct, in_head) if h] or [np.nan]))
    metrics["caption_accuracy_tail"] = float(np.mean([c for c, h in zip(correct, in_head) if not h] or [np.nan]))
    return metrics


@dataclass
class ZeroShot:
    """Zero-shot classification of the eval items that carry a "label" (KEY.json): one prompt set per
    class; a prediction is scored per attribute of the class (e.g. colour and shape)."""

    classes: list[dict]  # attribute -> value, one per class
    attributes: list[str]
    prompts: list[list[str]]  # per class
    items: list[int]  # eval indices with a label
    labels: list[int]  # class index per item


def zero_shot_task(eval_split: Split, task: dict) -> ZeroShot | None:
    """The task's zero-shot classification on the eval split, or None when it has none."""
    spec = task.get("zero_shot")
    if not spec:
        return None
    labelled = [(i, label) for i, label in enumerate(eval_split.metas.field("label")) if isinstance(label, int)]
    items, labels = [i for i, _ in labelled], [label for _, label in labelled]
    return ZeroShot(spec["classes"], spec["attributes"], spec["prompts"], items, labels) if items else None


# --- training and scoring ---------------------------------------------------------------------------

def score(model, tokenizer, eval_split: Split, groups, zero_shot: ZeroShot | None) -> dict[str, float]:
    """Retrieval R@k in percent on the eval split (group-level hits when `groups` is given;
    `mean_r1_instance` counts exact pairs only) and zero-shot accuracy in percent per attribute
    (`zero_shot_<attribute>`) and their mean `zero_shot_acc` (NaN without a zero-shot task)."""
    from tldr_tasks.models import clip

    image_emb = clip.embed_images(model, eval_split.images)
    text_emb = clip.embed_texts(model, tokenizer, eval_split.captions)
    metrics = clip.retrieval_metrics(image_emb, text_emb, groups, groups)
    # exact-pair hits too: lower, since several eval items share a description
    metrics["mean_r1_instance"] = clip.retrieval_metrics(image_emb, text_emb, ks=(1,))["mean_r1"]
    metrics["zero_shot_acc"] = float("nan")
    if zero_shot is not None:
        class_emb = clip.class_embeddings(model, tokenizer, zero_shot.prompts)
        for attribute in zero_shot.attributes:  # a prediction is right on the attributes it gets right
            metrics[f"zero_shot_{attribute}"] = clip.zero_shot_accuracy(
                image_emb[zero_shot.items], class_emb, zero_shot.labels, [c[attribute] for c in zero_shot.classes])
        metrics["zero_shot_acc"] = float(np.mean([metrics[f"zero_shot_{a}"] for a in zero_shot.attributes]))
    return metrics


def _cache_url(io: StageIO, cfg: Config, arm: Arm, steps: int, tokenizer, task: dict) -> str:
    """Finished trainings are kept by what they trained on and are scored by (settings, tokenizer, task,
    images, captions): a restarted
    evaluation resumes, and two arms with the same data (the shards' own fusion re-decided, or every
    fusion of a collapsed run) train once."""
    digest = hashlib.sha256(json.dumps({"seed": cfg.seed, "evaluate": cfg.to_dict()["evaluate"], "steps": steps},
                                       sort_keys=True).encode())
    digest.update(tokenizer.to_json().encode())
    digest.update(json.dumps(task, sort_keys=True).encode())
    for chunk in arm.images.chunks():  # the images' bytes, then the captions joined by newlines
        digest.update(np.ascontiguousarray(chunk).tobytes())
    for i, caption in enumerate(arm.captions):
        digest.update(("\n" if i else "").encode() + caption.encode())
    return storage.join(io.evaluate_dir, "arms", f"{steps}-{digest.hexdigest()[:16]}.json")


def train_and_score(arm: Arm, tokenizer, splits: dict[str, Split], steps: int, cfg: Config, task: dict) -> dict:
    """Train one arm and score it on every split, at the curve points and at the end."""
    from tldr_tasks.models import clip

    ev = cfg.evaluate
    tasks = {name: (scene_groups(split, task), zero_shot_task(split, task)) for name, split in splits.items()}
    curve: dict[str, list[list[float]]] = {name: [] for name in splits}

    def on_checkpoint(step, model):
        for name, split in splits.items():  # the curve needs R@1 only: no zero-shot prompts (~4k texts)
            curve[name].append([step, score(model, tokenizer, split, tasks[name][0], None)["mean_r1"]])

    model, seconds = clip.train_clip(arm.images, arm.captions, tokenizer, steps=steps, batch_size=ev.batch_size,
                                     lr=ev.lr, seed=cfg.seed, preset=ev.preset, desc=arm.name,
                                     checkpoints=curve_steps(steps, ev.curve_points)[:-1],
                                     on_checkpoint=on_checkpoint)
    result = {"steps": steps, "samples": len(arm.images), "train_seconds": round(seconds, 2)}
    for name, split in splits.items():
        metrics = score(model, tokenizer, split, *tasks[name])
        result[name] = metrics
        curve[name].append([steps, metrics["mean_r1"]])
    result["curve"] = curve
    return result


def plot(report: dict, url: str) -> None:
    """Left: test mean R@1 per arm; right: every arm's test learning curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(4 + 1.6 * max(1, len(arms)), 3.8))
    values = [arms[a]["test"]["mean_r1"] for a in arms]
    drawn = bars.bar(range(len(arms)), values, color=[f"C{i}" for i in range(len(arms))])
    bars.bar_label(drawn, fmt="%.1f", fontsize=7)
    bars.set_xticks(range(len(arms)), list(arms), rotation=20, fontsize=8)
    bars.set_ylabel("mean R@1 (%), scene-level, test split")
    for i, (name, arm) in enumerate(arms.items()):
        steps, r1 = zip(*arm["curve"]["test"])
        curves.plot(steps, r1, marker="o", color=f"C{i}", label=name)
    curves.set_xlabel("optimizer steps")
    curves.set_ylabel("mean R@1 (%), test split")
    curves.legend(fontsize=7)
    fig.suptitle(f"{report['splits']['test']} held-out test items, {report['steps']} steps per arm", fontsize=9)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes_atomic(url, buffer.getvalue())


def flatten(report: dict) -> dict[str, float]:
    """report.json -> flat numeric metrics ("test.tldr.mean_r1", "noise_rate.tldr", ...)."""
    metrics: dict[str, float] = {}
    for arm, values in report.get("arms", {}).items():
        for split in SPLITS:
            for name, value in values.get(split, {}).items():
                if value is not None and value == value:  # NaN/None (no zero-shot task) is not a metric
                    metrics[f"{split}.{arm}.{name}"] = float(value)
        metrics[f"train_seconds.{arm}"] = float(values["train_seconds"])
    for group in ("noise_rate", "distinct_scenes", "time_to_accuracy"):
        for arm, value in (report.get(group) or {}).items():
            if value is not None:
                metrics[f"{group}.{arm}"] = float(value)
    for name in ("caption_accuracy", "caption_accuracy_head", "caption_accuracy_tail", "noise_rate_input",
                 "noise_rate_output"):
        if report.get(name) is not None:
            metrics[name] = float(report[name])
    return metrics


def run(cfg: Config, io: StageIO) -> StageResult:
    report_url = storage.join(io.evaluate_dir, "report.json")
    plot_url = storage.join(io.evaluate_dir, "retrieval.png")
    if storage.exists(report_url):
        return StageResult(metrics=flatten(json.loads(storage.read_text(report_url))),
                           outputs=[report_url, plot_url], skipped=True)
    if not io.eval_input:
        raise ConfigError("evaluate needs the clean held-out split (pass --eval-input, e.g. crawl/eval, "
                          "which `tldr-vlp make-crawl` writes beside crawl/train)")
    from tldr_tasks.models import clip

    tldr_urls = storage.listdir(io.shards_dir, ".tar")
    if not tldr_urls:
        raise ConfigError(f"no compressed shards in {io.shards_dir} (run `tldr-vlp run materialize` first)")
    # The decoded inputs go to local scratch files ($TMPDIR; an emptyDir in a pod), not to memory.
    with clip.torch_threads(clip.available_cpus()), tempfile.TemporaryDirectory(prefix="tldr-evaluate-") as scratch:
        report = evaluate_spooled(cfg, io, tldr_urls, scratch)
    plot(report, plot_url)
    # the report is the completion marker: written last
    storage.write_text_atomic(report_url, json.dumps(_clean(report), indent=1, sort_keys=True))
    return StageResult(metrics=flatten(report), outputs=[report_url, plot_url])


def spool(urls: list[str], cfg: Config, io: StageIO, folder: str, desc: str) -> Split:
    """The shards `urls` decoded once to `folder` at the preset's image size. For a pretrained-towers preset
    its `images` are the image tower's features instead (cached per shard content below io.embed_dir and
    reused by every arm, seed and rerun; towers_clip.cached_features), with the pixels (at the captioner's
    size) taken along for the captioner (`generate`)."""
    from tldr_tasks.models import clip

    preset = clip.load_preset(cfg.evaluate.preset)
    if preset.get("kind") != "towers":
        return write_spool(urls, preset["image_size"], folder, desc)
    from tldr_tasks.models.towers_clip import Rows, cached_features

    split = write_spool(urls, cfg.captioner.image_size, folder, desc)  # the pixels the captioner reads
    keys, features, _, _ = cached_features(urls, preset, io.embed_dir, desc)
    if keys != list(split.keys):
        raise ValueError(f"the tower features of {desc} do not match its samples: a shard changed while being read")
    return dataclasses.replace(split, images=Rows(features, split.images))


def evaluate_spooled(cfg: Config, io: StageIO, tldr_urls: list[str], scratch: str) -> dict:
    """The report: every input spooled once to `scratch`, every arm trained and scored."""
    from tldr_tasks.models import clip

    ev = cfg.evaluate
    full = spool(io.input_shards(), cfg, io, f"{scratch}/input", "input")
    tldr = spool(tldr_urls, cfg, io, f"{scratch}/compressed", "compressed")
    held_out = spool(storage.expand_shards(io.eval_input), cfg, io, f"{scratch}/eval", "eval")
    task = load_task(io.eval_input)
    splits = split_eval(held_out)
    if len(full) < 2 or len(tldr) < 2 or min(len(s) for s in splits.values()) < 2:
        raise ValueError(f"too few samples to evaluate: input {len(full)}, compressed {len(tldr)}, "
                         + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " (need >= 2 each)")

    arms = build_arms(list(ev.arms), full, tldr, cfg, io)
    # One tokenizer for every arm and every evaluation of this input (a benchmark's selections too):
    # learnt from the input's captions alone, so the arms share vocabulary, text embedding and
    # initialisation and differ only in their data (held-out words, and new words of generated
    # captions, stay unknown).
    tokenizer = clip.make_tokenizer(ev.preset, iter(full.captions))
    steps = training_steps(len(full), ev.epochs, ev.batch_size)
    results: dict[str, dict] = {}
    for budget in ev.budgets:
        for name, arm in arms.items():
            arm_steps = steps if budget == "compute" else training_steps(len(arm.images), ev.epochs, ev.batch_size)
            label = name if budget == "compute" else f"{name}_{budget}"
            cache = _cache_url(io, cfg, arm, arm_steps, tokenizer, task)
            if storage.exists(cache):
                results[label] = json.loads(storage.read_text(cache))
            else:
                results[label] = train_and_score(arm, tokenizer, splits, arm_steps, cfg, task)
                storage.write_text_atomic(cache, json.dumps(results[label], sort_keys=True))

    report: dict = {"arms": results, "steps": steps, "splits": {k: len(v) for k, v in splits.items()},
                    "scene_level_hits": scene_groups(held_out, task) is not None, "task": task.get("hit", "item"),
                    "time_to_accuracy": time_to_accuracy({a: r["curve"]["test"] for a, r in results.items()
                                                          if a in arms}, steps),
                    "fusion": cfg.caption.fusion, "tokenizer_vocab": tokenizer.vocab_size,
                    "config": {"seed": cfg.seed, "evaluate": cfg.to_dict()["evaluate"]}}
    report.update(ground_truth_metrics(full, arms, splits["validation"], io, cfg))
    return report


def _clean(obj):
    """NaN -> None so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
