"""evaluate: train the same tiny CLIP on the full crawl, the TL;DR subset and a random subset of the
same size, and score each on a clean held-out split.

Arms (evaluate.arms):
    full            every accepted input sample, original captions.
    tldr            the compressed shards; each visit's caption is fusion.training_caption() with the
                    shards' own fusion mode.
    random          a seeded uniform subset of the accepted input, as large as the TL;DR set.
    tldr_<mode>     the compressed samples with captions fused by <mode> (concat, alternate,
                    generated, original): how fusion is measured rather than assumed.
Protocols (evaluate.protocols):
    compute_matched every arm gets evaluate.epochs * ceil(N_full / batch) optimizer steps (fixed compute,
                    as DataComp): compares data quality.
    epoch_matched   every arm trains evaluate.epochs epochs over its own data (the paper's protocol):
                    shows the cost saving. The full arm is the same run in both and is trained once.
Scores on the eval split: image->text and text->image R@1/5/10 (a hit is any retrieved item showing
the same scene: eval descriptions repeat), zero-shot colour/shape accuracy, training seconds. With
ground truth in KEY.json ("truth") it also measures the captioner's accuracy and the caption noise
before and after compression. Writes `evaluate/report.json` and `evaluate/retrieval.png`.

    tldr-vlp run evaluate --input crawl/train --eval-input crawl/eval --out runs/x
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from tldr_tasks import storage
from tldr_tasks.config import FUSIONS, Config
from tldr_tasks.fusion import training_caption
from tldr_tasks.stage_cli import stage_main
from tldr_tasks.stages.base import StageIO, StageResult

PROTOCOL_KEYS = {"compute_matched": "retrieval", "epoch_matched": "retrieval_epoch_matched"}
ARM_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1", "zero_shot_acc",
               "zero_shot_colour", "zero_shot_shape", "mean_r1_instance", "train_seconds", "steps", "samples")


@dataclass
class Split:
    """Decoded samples of one set of shards: images uint8 [N, S, S, 3] plus per-sample text and metadata."""

    images: np.ndarray
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # KEY.txt
    metas: list[dict] = field(default_factory=list)  # KEY.json

    def __len__(self) -> int:
        return len(self.keys)

    def truths(self) -> list[dict] | None:
        """Every sample's ground truth, or None when any sample lacks it (a real crawl)."""
        truths = [m.get("truth") for m in self.metas]
        return truths if truths and all(isinstance(t, dict) for t in truths) else None


@dataclass
class Arm:
    """One training set: the images and the caption a trainer sees on each visit."""

    name: str
    images: np.ndarray
    caption_for: Callable[[int, random.Random], str]
    truths: list[dict] | None = None


def read_split(urls: list[str], image_size: int, desc: str) -> Split:
    """Decode every accepted sample of `urls`, resizing images to `image_size` square when needed."""
    from PIL import Image

    from tldr_tasks.data.shards import Sample, iter_shard

    images, split = [], Split(images=np.zeros((0, image_size, image_size, 3), np.uint8))
    for url in tqdm(urls, desc=f"read {desc}", unit="shard", leave=False):
        for item in iter_shard(url):
            if not isinstance(item, Sample):
                continue  # rejected samples are accounted for by materialize; nothing to train on
            image = item.image
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            images.append(np.asarray(image, dtype=np.uint8))
            split.keys.append(item.key)
            split.captions.append(item.caption)
            split.metas.append(item.meta)
    if images:
        split.images = np.stack(images)
    return split


def compressed_captions(split: Split) -> tuple[list[str], list[str], list[str]]:
    """(original, generated, fusion mode) per compressed sample, from the KEY.json materialize wrote."""
    missing = [k for k, m in zip(split.keys, split.metas) if "original_caption" not in m]
    if missing:
        raise ValueError(f"{len(missing)} compressed samples (e.g. {missing[0]}) lack original_caption in KEY.json: "
                         "the shards were not written by `materialize`; rerun it")
    originals = [m["original_caption"] for m in split.metas]
    generated = [m.get("generated_caption", "") for m in split.metas]
    modes = [m.get("fusion", "concat") for m in split.metas]
    return originals, generated, modes


def random_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of `size` out of `n_total` (without replacement)."""
    if size > n_total:
        raise ValueError(f"the TL;DR set ({size}) is larger than the accepted input ({n_total}): "
                         "--input must be the crawl the compressed shards came from")
    return np.sort(np.random.default_rng([seed, 1]).choice(n_total, size=size, replace=False))


def build_arms(names: list[str], full: Split, tldr: Split, seed: int) -> dict[str, Arm]:
    """The training sets of `names` (see the module doc)."""
    originals, generated, modes = compressed_captions(tldr)
    arms: dict[str, Arm] = {}
    for name in names:
        if name == "full":
            arms[name] = Arm(name, full.images, lambda i, rng, c=full.captions: c[i], full.truths())
        elif name == "random":
            idx = random_subset(len(full), len(tldr), seed)
            captions = [full.captions[i] for i in idx]
            truths = full.truths()
            arms[name] = Arm(name, full.images[idx], lambda i, rng, c=captions: c[i],
                             [truths[i] for i in idx] if truths else None)
        elif name == "tldr" or name.startswith("tldr_"):
            mode = name.removeprefix("tldr_") if name != "tldr" else None
            if mode is not None and mode not in FUSIONS:
                raise ValueError(f"evaluate.arms: {name!r} names no fusion mode; use tldr_<{'|'.join(FUSIONS)}>")

            def caption_for(i, rng, mode=mode):
                return training_caption(originals[i], generated[i], mode or modes[i], rng)

            arms[name] = Arm(name, tldr.images, caption_for, tldr.truths())
        else:
            raise ValueError(f"evaluate.arms: unknown arm {name!r} (full, tldr, random or tldr_<fusion>)")
    return arms


def protocol_steps(protocol: str, n_arm: int, n_full: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of one arm: compute_matched = epochs * ceil(N_full / batch) for every arm,
    epoch_matched = epochs * ceil(N_arm / batch)."""
    from tldr_tasks.models.clip import epoch_batches

    if protocol == "compute_matched":
        return epochs * epoch_batches(n_full, batch_size)
    if protocol == "epoch_matched":
        return epochs * epoch_batches(n_arm, batch_size)
    raise ValueError(f"unknown protocol {protocol!r}: use compute_matched or epoch_matched")


def training_vocabulary(full: Split, tldr: Split) -> list[str]:
    """Every caption any arm can train on: the originals plus the generated captions (the fused forms
    add no words). Eval captions are excluded so held-out words stay unknown, as they would be."""
    originals, generated, _ = compressed_captions(tldr)
    return full.captions + originals + generated


# --- ground truth (the synthetic benchmark) ---------------------------------------------------------

def _synthetic():
    try:
        from tldr_tasks.data import synthetic
    except ImportError:
        return None
    return synthetic


def scene_groups(split: Split) -> list[str] | None:
    """The scene signature of every eval item (equal = same scene), or None without ground truth."""
    synthetic, truths = _synthetic(), split.truths()
    if synthetic is None or truths is None:
        return None
    return [synthetic.scene_signature(t) for t in truths]


def ground_truth_metrics(full: Split, tldr: Split, random_idx: np.ndarray) -> dict:
    """Caption accuracy, noise before/after compression and distinct scenes kept; {} without truth."""
    synthetic, full_truths, tldr_truths = _synthetic(), full.truths(), tldr.truths()
    if synthetic is None or full_truths is None or tldr_truths is None:
        return {}
    originals, generated, _ = compressed_captions(tldr)
    named = synthetic.names_scene

    def share(flags) -> float:
        flags = list(flags)
        return float(np.mean(flags)) if flags else float("nan")

    def scenes(truths) -> int:
        return len({json.dumps(t.get("scene"), sort_keys=True) for t in truths})

    return {
        "caption_accuracy": share(named(g, t) for g, t in zip(generated, tldr_truths)),
        "noise_rate_input": share(not named(c, t) for c, t in zip(full.captions, full_truths)),
        "noise_rate_output": share(not named(c, t) for c, t in zip(tldr.captions, tldr_truths)),
        "distinct_scenes": {"tldr": scenes(tldr_truths), "random": scenes([full_truths[i] for i in random_idx]),
                            "full": scenes(full_truths)},
    }


@dataclass
class ZeroShot:
    """Zero-shot "colour shape" classification of the eval split's one-object images: prompts per class
    in the eval split's held-out caption styles; a prediction scores colour and shape separately."""

    classes: list[tuple[str, str]]  # (colour, shape)
    prompts: list[list[str]]  # per class
    items: list[int]  # eval indices with exactly one object
    labels: list[int]  # class index per item


def zero_shot_task(eval_split: Split) -> ZeroShot | None:
    """The zero-shot task on the eval split, or None without synthetic ground truth."""
    synthetic, truths = _synthetic(), eval_split.truths()
    if synthetic is None or truths is None or not all("objects" in t for t in truths):
        return None
    classes = [(c, s) for c in synthetic.COLOURS for s in synthetic.SHAPES]
    prompts = []
    for colour, shape in classes:
        variants = [[{"colour": colour, "shape": shape, "size": size, "position": position}]
                    for size in synthetic.SIZES for position in synthetic.POSITIONS]
        prompts.append(sorted({template(objects, background) for template in synthetic.EVAL_TEMPLATES
                               for objects in variants for background in synthetic.BACKGROUNDS}))
    index = {pair: i for i, pair in enumerate(classes)}
    items = [i for i, t in enumerate(truths) if len(t["objects"]) == 1
             and (t["objects"][0]["colour"], t["objects"][0]["shape"]) in index]
    labels = [index[(truths[i]["objects"][0]["colour"], truths[i]["objects"][0]["shape"])] for i in items]
    return ZeroShot(classes, prompts, items, labels) if items else None


# --- training and scoring ---------------------------------------------------------------------------

def score(model, tokenizer, eval_split: Split, groups, zero_shot: ZeroShot | None) -> dict[str, float]:
    """Retrieval R@k in percent on the eval split (scene-level hits when `groups` is given;
    `mean_r1_instance` counts exact pairs only) and zero-shot accuracy in percent: colour, shape and
    their mean `zero_shot_acc` (NaN without ground truth)."""
    from tldr_tasks.models import clip

    image_emb = clip.embed_images(model, eval_split.images)
    text_emb = clip.embed_texts(model, tokenizer, eval_split.captions)
    metrics = clip.retrieval_metrics(image_emb, text_emb, groups, groups)
    # exact-pair hits too: lower, since several eval items share a description
    metrics["mean_r1_instance"] = clip.retrieval_metrics(image_emb, text_emb, ks=(1,))["mean_r1"]
    metrics.update(zero_shot_acc=float("nan"), zero_shot_colour=float("nan"), zero_shot_shape=float("nan"))
    if zero_shot is not None:
        class_emb = clip.class_embeddings(model, tokenizer, zero_shot.prompts)
        predicted = (image_emb[zero_shot.items] @ class_emb.t()).argmax(dim=1).tolist()
        for name, part in (("zero_shot_colour", 0), ("zero_shot_shape", 1)):
            metrics[name] = 100.0 * float(np.mean([zero_shot.classes[p][part] == zero_shot.classes[y][part]
                                                   for p, y in zip(predicted, zero_shot.labels)]))
        metrics["zero_shot_acc"] = (metrics["zero_shot_colour"] + metrics["zero_shot_shape"]) / 2
    return metrics


def _cache_url(io: StageIO, cfg: Config, arm: str, steps: int) -> str:
    """Finished trainings are kept per (arm, steps, settings) so a restarted evaluation resumes."""
    settings = json.dumps({"seed": cfg.seed, "evaluate": cfg.to_dict()["evaluate"], "steps": steps}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return storage.join(io.evaluate_dir, "arms", f"{arm}-{steps}-{digest}.json")


def plot(report: dict, url: str) -> None:
    """Grouped bar chart: mean R@1 per arm, one bar per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [(key, p) for p, key in PROTOCOL_KEYS.items() if report.get(key)]
    arms = list(dict.fromkeys(a for key, _ in protocols for a in report[key]))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(1, len(arms)), 3.6))
    width = 0.8 / max(1, len(protocols))
    for j, (key, protocol) in enumerate(protocols):
        values = [report[key].get(a, {}).get("mean_r1", np.nan) for a in arms]
        xs = np.arange(len(arms)) + (j - (len(protocols) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=protocol.replace("_", " "))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(arms)), arms)
    ax.set_ylabel("mean R@1 (%), scene-level")
    ax.set_title(f"retrieval on {report.get('eval_samples', '?')} held-out samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes_atomic(url, buffer.getvalue())


def flatten(report: dict) -> dict[str, float]:
    """report.json -> flat numeric metrics ("compute_matched.tldr.mean_r1", "caption_accuracy", ...)."""
    metrics: dict[str, float] = {}
    for protocol, key in PROTOCOL_KEYS.items():
        for arm, values in (report.get(key) or {}).items():
            for name, value in values.items():
                if value is not None and value == value:  # NaN/None (no zero-shot task) is not a metric
                    metrics[f"{protocol}.{arm}.{name}"] = float(value)
    for name in ("caption_accuracy", "noise_rate_input", "noise_rate_output", "eval_samples"):
        if report.get(name) is not None:
            metrics[name] = float(report[name])
    for arm, value in (report.get("distinct_scenes") or {}).items():
        metrics[f"distinct_scenes.{arm}"] = float(value)
    return metrics


def run(cfg: Config, io: StageIO) -> StageResult:
    report_url = storage.join(io.evaluate_dir, "report.json")
    plot_url = storage.join(io.evaluate_dir, "retrieval.png")
    if storage.exists(report_url):
        return StageResult(metrics=flatten(json.loads(storage.read_text(report_url))),
                           outputs=[report_url, plot_url], skipped=True)
    if not io.eval_input:
        raise ValueError("evaluate needs the clean held-out split: pass --eval-input (e.g. crawl/eval, "
                         "which `tldr-vlp make-crawl` writes beside crawl/train)")
    import torch

    from tldr_tasks.models import clip

    torch.set_num_threads(clip.available_cpus())
    ev = cfg.evaluate
    size = clip.load_preset(ev.preset)["image_size"]
    tldr_urls = storage.listdir(io.shards_dir, ".tar")
    if not tldr_urls:
        raise ValueError(f"no compressed shards in {io.shards_dir}: run `materialize` first")
    full = read_split(io.input_shards(), size, "input")
    tldr = read_split(tldr_urls, size, "compressed")
    eval_split = read_split(storage.expand_shards(io.eval_input), size, "eval")
    if len(full) < 2 or len(tldr) < 2 or len(eval_split) < 2:
        raise ValueError(f"too few samples to evaluate: input {len(full)}, compressed {len(tldr)}, "
                         f"eval {len(eval_split)} (need >= 2 each)")

    tokenizer = clip.CaptionTokenizer.train(training_vocabulary(full, tldr),
                                            max_tokens=clip.load_preset(ev.preset)["max_text_tokens"])
    arms = build_arms(list(ev.arms), full, tldr, cfg.seed)
    groups = scene_groups(eval_split)
    zero_shot = zero_shot_task(eval_split)

    results: dict[tuple[str, int], dict] = {}
    report: dict = {key: {} for key in PROTOCOL_KEYS.values()}
    for protocol in ev.protocols:
        for name, arm in arms.items():
            steps = protocol_steps(protocol, len(arm.images), len(full), ev.epochs, ev.batch_size)
            if (name, steps) not in results:  # e.g. the full arm: the same run under both protocols
                cache = _cache_url(io, cfg, name, steps)
                if storage.exists(cache):
                    results[(name, steps)] = json.loads(storage.read_text(cache))
                else:
                    model, seconds = clip.train_clip(arm.images, arm.caption_for, tokenizer, steps=steps,
                                                     batch_size=ev.batch_size, lr=ev.lr, seed=cfg.seed,
                                                     preset=ev.preset, desc=f"{protocol} {name}")
                    metrics = score(model, tokenizer, eval_split, groups, zero_shot)
                    metrics.update(train_seconds=round(seconds, 2), steps=steps, samples=len(arm.images))
                    storage.write_text_atomic(cache, json.dumps(metrics, sort_keys=True))
                    results[(name, steps)] = metrics
            report[PROTOCOL_KEYS[protocol]][name] = {k: results[(name, steps)][k] for k in ARM_METRICS}

    random_idx = random_subset(len(full), len(tldr), cfg.seed)
    truth = ground_truth_metrics(full, tldr, random_idx)
    report.update({
        "caption_accuracy": truth.get("caption_accuracy"),
        "noise_rate_input": truth.get("noise_rate_input"),
        "noise_rate_output": truth.get("noise_rate_output"),
        "distinct_scenes": truth.get("distinct_scenes", {}),
        "eval_samples": len(eval_split),
        "scene_level_hits": groups is not None,
        "fusion": sorted(set(compressed_captions(tldr)[2])),
        "tokenizer_vocab": tokenizer.vocab_size,
        "config": {"seed": cfg.seed, "evaluate": cfg.to_dict()["evaluate"]},
    })
    plot(report, plot_url)
    # the report is the completion marker: written last
    storage.write_text_atomic(report_url, json.dumps(_clean(report), indent=1, sort_keys=True))
    return StageResult(metrics=flatten(report), outputs=[report_url, plot_url])


def _clean(obj):
    """NaN -> None so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def main(argv=None):
    return stage_main("evaluate", argv)

