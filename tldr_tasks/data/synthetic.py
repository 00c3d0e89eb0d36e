"""The synthetic benchmark crawl: a web crawl in miniature, with its ground truth kept beside it.

    tldr-vlp make-crawl --out crawl [--samples 8000 --eval-samples 1000 --noise 0.3 --seed 0]

Scenes of 1-3 coloured shapes on a jittered background. `prototypes` distinct scenes have
Zipf-distributed popularity and every sample is a jittered copy of its prototype, so the crawl is
redundant (many near-duplicates) like a real one. A `noise` share of train captions is web noise.
`noise_mode=iid`: each noisy caption on its own: another sample's caption (swap), one wrong attribute,
alt-text junk or empty. `noise_mode=correlated`, at the same total share, as the web has it: whole
scenes (every near-duplicate copy) carry one consistent wrong label (`mislabel`: one object's colour or
shape changed, the same for all copies) or one shop's boilerplate alt-text (`template`), beside
per-sample near misses (`wrong_attribute`); inside such a cluster the typical caption is the wrong one.
`noise_mode=incomplete`, at the same total share, alt-text that names only part of the image: of the noisy
captions 40% `partial_object` (a multi-object scene's caption naming only some of its objects), 20%
`background_only` (only the background named), 20% `product_name` (a brand and product code plus one
true colour or shape), and 10% each `swap` and `wrong_attribute` as in `iid`. Scenes of one object get no
partial caption; when too few samples show several objects, the rest of that share is `background_only`.
Every noisy caption, incomplete ones included, fails `describes_scene_exactly`.
The eval split is balanced over prototypes, clean, and captioned with templates the train split never
uses.

Layout (what img2dataset writes, plus `truth` in every KEY.json):
    {out}/train/00000.tar, 00000.parquet, 00000_stats.json, ...
    {out}/eval/00000.tar, ...; eval/task.json   the evaluation task (hits, zero-shot classes, prompts)
    {out}/crawl.json      parameters and counts per noise type
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import re
import sys

import numpy as np
from PIL import Image, ImageDraw

from tldr_tasks import storage
from tldr_tasks.config import NOISE_MODES, CrawlConfig
from tldr_tasks.data.shards import encode_json, write_crawl_records, write_crawl_shard

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
# Object colours are far apart in RGB and from every background, so colour is learnable at 64 px.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 175, 45), "blue": (35, 70, 235), "yellow": (245, 225, 35),
    "purple": (145, 40, 190), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "brown": (115, 85, 60), "slate": (70, 85, 100),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
NOISE_TYPES: tuple[str, ...] = ("none", "swap", "wrong_attribute", "junk", "empty", "mislabel", "template",
                                "partial_object", "background_only", "product_name")
# The kinds each crawl.noise_mode plants, in the order crawl.json counts them.
MODE_NOISE_TYPES: dict[str, tuple[str, ...]] = {
    "iid": NOISE_TYPES[:5],
    "correlated": ("none", "mislabel", "template", "wrong_attribute"),
    "incomplete": ("none", "partial_object", "background_only", "product_name", "swap", "wrong_attribute"),
}
# Correlated noise (crawl.noise_mode=correlated): a shop's boilerplate alt-text on all its products.
SHOP_TEMPLATES: tuple[str, ...] = (
    "best price shapes store item", "free shipping on all orders | shapeshop", "product image - click to zoom",
    "new arrival sale limited offer", "stock photo preview watermark",
)
# Incomplete captions (crawl.noise_mode=incomplete): alt-text that names only the setting, or a product
# listing's title. No brand or item word is a colour or a shape, so none forms a "colour shape" phrase.
BACKGROUND_ONLY_CAPTIONS: tuple[str, ...] = ("{bg} background", "plain {bg} backdrop", "abstract {bg} wallpaper",
                                             "{bg} texture")
PRODUCT_BRANDS: tuple[str, ...] = ("Geomart", "ShapeCraft", "Polygonia", "Tangrammy", "Formwerk")
PRODUCT_ITEMS: tuple[str, ...] = ("sticker", "decal", "wall print", "fridge magnet")

# Object extent as a share of the image side: small is 16 px and large 26 px at 64 px.
_SIZE_FRACTION = {"small": 0.25, "large": 0.40}
_ONE_OBJECT_CENTRES = {"left": (0.30, 0.5), "right": (0.70, 0.5), "top": (0.5, 0.30), "bottom": (0.5, 0.70),
                       "center": (0.5, 0.5)}
_TWO_OBJECT_LAYOUTS = ((("left", (0.27, 0.5)), ("right", (0.73, 0.5))),
                       (("top", (0.5, 0.27)), ("bottom", (0.5, 0.73))))
_THREE_OBJECT_LAYOUT = (("left", (0.18, 0.5)), ("center", (0.5, 0.5)), ("right", (0.82, 0.5)))
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
_COUNT_WORD = {1: "one", 2: "two", 3: "three"}

JUNK_CAPTIONS: tuple[str, ...] = (
    "IMG_{n}.JPG", "DSC_{n}.jpg", "click to enlarge", "image", "untitled", "thumbnail", "photo",
    "stock image {n}", "free download", "screenshot {n}", "no description available", "placeholder",
)

# The train split uses TRAIN_TEMPLATES, the eval split only EVAL_TEMPLATES. In every template the
# colour directly precedes the shape ("red circle"), so `names_scene` can check any caption.


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cs(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _t_list(objs, bg):
    return _join([_with_article(_cs(o)) for o in objs])


def _t_photo(objs, bg):
    return "photo of " + _join([f"{_with_article(o['size'] + ' ' + _cs(o))} {_POSITION_PHRASE[o['position']]}"
                                for o in objs])


def _t_background(objs, bg):
    return ", ".join(_cs(o) for o in objs) + f" on a {bg} background"


def _t_count(objs, bg):
    noun = "shape" if len(objs) == 1 else "shapes"
    return f"{_COUNT_WORD[len(objs)]} {noun}: " + _join([_cs(o) for o in objs])


def _t_there_is(objs, bg):
    return "there is " + _join([f"{_with_article(o['size'] + ' ' + _cs(o))} {_POSITION_PHRASE[o['position']]}"
                                for o in objs])


def _t_clipart(objs, bg):
    return "clipart of " + _join([_cs(o) for o in objs]) + ", simple flat icon"


def _e_showing(objs, bg):
    return "an image showing " + " next to ".join(_with_article(_cs(o)) for o in objs)


def _e_backdrop(objs, bg):
    return " with ".join(f"the {_cs(o)}" for o in objs) + f" against a {bg} backdrop"


def _e_drawn(objs, bg):
    return "drawing: " + "; ".join(f"{o['size']} {_cs(o)} placed {_POSITION_PHRASE[o['position']]}" for o in objs)


TRAIN_TEMPLATES = (_t_list, _t_photo, _t_background, _t_count, _t_there_is, _t_clipart)
EVAL_TEMPLATES = (_e_showing, _e_backdrop, _e_drawn)


def scene_signature(truth: dict) -> str:
    """Canonical string of the scene's sorted "colour shape" pairs: what captions describe.

    Two eval items with the same signature count as the same scene for retrieval.
    """
    return "|".join(sorted(_cs(o) for o in truth["objects"]))


def names_scene(caption: str, truth: dict) -> bool:
    """True iff every object's "colour shape" phrase appears in `caption` (case-insensitive,
    whole words). "wrong caption; correct caption" is True; junk, empty and wrong captions are False."""
    objects = truth.get("objects") or []
    if not caption or not objects:
        return False
    return all(re.search(rf"\b{re.escape(o['colour'])}\s+{re.escape(o['shape'])}\b", caption, re.IGNORECASE)
               for o in objects)


def describes_scene_exactly(caption: str, truth: dict) -> bool:
    """True iff the "colour shape" phrases of `caption` are exactly the scene's: every object named and
    no object that is not there. Stricter than names_scene: "wrong caption; right caption" is False."""
    objects = truth.get("objects") or []
    if not caption or not objects:
        return False
    named = {f"{m.group(1).lower()} {m.group(2).lower()}" for m in _PHRASE.finditer(caption)}
    return named == {_cs(o) for o in objects}


_PHRASE = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b", re.IGNORECASE)


ZERO_SHOT_CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


def zero_shot_class(obj: dict) -> int:
    """The zero-shot class index of a one-object scene's object."""
    return ZERO_SHOT_CLASSES.index((obj["colour"], obj["shape"]))


def eval_task() -> dict:
    """The evaluation task that travels with the eval split (eval/task.json): retrieval hits are items
    of the same scene (KEY.json "group"); zero-shot "colour shape" classification of one-object images
    (KEY.json "label"), each class prompted in the eval split's held-out caption styles and scored per
    attribute."""
    prompts = []
    for colour, shape in ZERO_SHOT_CLASSES:
        variants = [[{"colour": colour, "shape": shape, "size": size, "position": position}]
                    for size in SIZES for position in POSITIONS]
        prompts.append(sorted({template(objects, background) for template in EVAL_TEMPLATES
                               for objects in variants for background in BACKGROUNDS}))
    return {"hit": "group",
            "zero_shot": {"attributes": ["colour", "shape"],
                          "classes": [{"colour": c, "shape": s} for c, s in ZERO_SHOT_CLASSES],
                          "prompts": prompts}}


# ---------------------------------------------------------------------------------------------- scenes


def _make_prototype(rng: np.random.Generator) -> dict:
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.40, 0.15]))
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:  # distinct (colour, shape) pairs, so a caption names every object
        pair = (COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))])
        if pair not in pairs:
            pairs.append(pair)
    if count == 1:
        position = POSITIONS[rng.integers(len(POSITIONS))]
        layout = [(position, _ONE_OBJECT_CENTRES[position])]
    elif count == 2:
        layout = list(_TWO_OBJECT_LAYOUTS[rng.integers(len(_TWO_OBJECT_LAYOUTS))])
    else:
        layout = list(_THREE_OBJECT_LAYOUT)
    objects = []
    for (colour, shape), (position, centre) in zip(pairs, layout):
        size = "small" if count == 3 else SIZES[rng.integers(len(SIZES))]  # three large ones would overlap
        objects.append({"shape": shape, "colour": colour, "size": size, "position": position,
                        "centre": centre})
    return {"objects": objects, "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))]}


def _prototype_id(proto: dict) -> tuple:
    return (proto["background"],) + tuple((o["shape"], o["colour"], o["size"], o["position"]) for o in proto["objects"])


def _make_prototypes(n: int, rng: np.random.Generator) -> list[dict]:
    protos, seen = [], set()
    attempts = 0
    while len(protos) < n:
        proto = _make_prototype(rng)
        attempts += 1
        if _prototype_id(proto) in seen and attempts < 50 * n:
            continue
        seen.add(_prototype_id(proto))
        protos.append(proto)
    return protos


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii)]
    raise ValueError(shape)


def _render(proto: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """One jittered copy of a prototype: shifted objects, shaded background, a little pixel noise."""
    scale = size / 64.0
    background = np.clip(np.array(BACKGROUND_RGB[proto["background"]]) + rng.integers(-15, 16, 3), 0, 255)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    for obj in proto["objects"]:
        extent = _SIZE_FRACTION[obj["size"]] * size * float(rng.uniform(0.92, 1.08))
        r = extent / 2
        cx = obj["centre"][0] * size + float(rng.uniform(-3, 3)) * scale
        cy = obj["centre"][1] * size + float(rng.uniform(-3, 3)) * scale
        fill = tuple(int(c) for c in np.clip(np.array(COLOUR_RGB[obj["colour"]]) + rng.integers(-12, 13, 3), 0, 255))
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            s = r * 0.88  # a square's area is larger than the circle's at the same extent
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif shape == "cross":
            arm = r / 3
            draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
            draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast; the noise makes PNG ~incompressible anyway
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- noise


def _noise_plan(n: int, share: float, rng: np.random.Generator) -> list[str]:
    """Exact counts per noise type (half swap, a third wrong attribute, the rest junk or empty)."""
    noisy = int(round(share * n))
    swap = int(round(noisy * 0.5))
    wrong = int(round(noisy / 3))
    rest = noisy - swap - wrong
    empty = rest // 3
    junk = rest - empty
    plan = ["swap"] * swap + ["wrong_attribute"] * wrong + ["junk"] * junk + ["empty"] * empty
    plan += ["none"] * (n - len(plan))
    return [plan[i] for i in rng.permutation(n)]


def _correlated_noise_plan(scene_ids: np.ndarray, share: float, protos: list[dict],
                           rng: np.random.Generator) -> tuple[list[str], dict[int, list[dict]], dict[int, str]]:
    """Exact counts at `share`: about half the noisy samples in whole mislabelled scenes, a third in
    whole templated scenes, the rest per-sample wrong attributes. Scenes are taken in a seeded order
    while they fit the remaining count. Returns the kind per sample, the wrong objects of every
    mislabelled scene and the boilerplate of every templated scene."""
    n = len(scene_ids)
    noisy = int(round(share * n))
    budget = {"mislabel": int(round(noisy * 0.5)), "template": int(round(noisy / 3))}
    counts = np.bincount(scene_ids, minlength=len(protos))
    kinds = np.full(n, "none", dtype=object)
    wrong_objects: dict[int, list[dict]] = {}
    boilerplate: dict[int, str] = {}
    for scene in rng.permutation(len(protos)):
        size = int(counts[scene])
        kind = next((k for k in ("mislabel", "template") if 0 < size <= budget[k]), None)
        if kind is None:
            continue
        budget[kind] -= size
        kinds[scene_ids == scene] = kind
        if kind == "mislabel":
            objects = [{k: v for k, v in o.items() if k != "centre"} for o in protos[scene]["objects"]]
            wrong_objects[int(scene)] = _wrong_attribute(objects, rng)
        else:
            boilerplate[int(scene)] = SHOP_TEMPLATES[int(rng.integers(len(SHOP_TEMPLATES)))]
    clean = np.flatnonzero(kinds == "none")
    rest = noisy - int((kinds != "none").sum())
    kinds[rng.choice(clean, rest, replace=False)] = "wrong_attribute"
    return kinds.tolist(), wrong_objects, boilerplate


def _incomplete_noise_plan(scene_ids: np.ndarray, share: float, protos: list[dict],
                           rng: np.random.Generator) -> list[str]:
    """Exact counts at `share`: 40% partial_object (only on samples of multi-object scenes; what does not
    fit there becomes background_only), 20% background_only, 20% product_name, 10% swap, 10% wrong
    attribute; the kind per sample."""
    n = len(scene_ids)
    noisy = int(round(share * n))
    multi = np.flatnonzero([len(protos[scene]["objects"]) > 1 for scene in scene_ids])
    partial = min(int(round(noisy * 0.4)), len(multi))
    # Cumulative cut points, so the counts add up to `noisy` whatever the rounding.
    cuts = [partial] + [int(round(noisy * f)) for f in (0.6, 0.8, 0.9)] + [noisy]
    background, product, swap, wrong = np.diff(cuts).tolist()
    kinds = np.full(n, "none", dtype=object)
    kinds[rng.choice(multi, partial, replace=False)] = "partial_object"
    others = rng.permutation(np.flatnonzero(kinds == "none"))[: noisy - partial]
    kinds[others] = (["background_only"] * background + ["product_name"] * product + ["swap"] * swap
                     + ["wrong_attribute"] * wrong)
    return kinds.tolist()


def _some_objects(objects: list[dict], rng: np.random.Generator) -> list[dict]:
    """A non-empty strict subset of a multi-object scene's objects, in scene order."""
    keep = np.sort(rng.choice(len(objects), int(rng.integers(1, len(objects))), replace=False))
    return [objects[j] for j in keep]


def _background_only(background: str, rng: np.random.Generator) -> str:
    return BACKGROUND_ONLY_CAPTIONS[int(rng.integers(len(BACKGROUND_ONLY_CAPTIONS)))].format(bg=background)


def _product_name(objects: list[dict], rng: np.random.Generator) -> str:
    """A shop listing's title: brand, item and code, then one true colour or shape of one object, never
    both, e.g. "Polygonia decal PO-4821 - red"."""
    brand = PRODUCT_BRANDS[int(rng.integers(len(PRODUCT_BRANDS)))]
    item = PRODUCT_ITEMS[int(rng.integers(len(PRODUCT_ITEMS)))]
    obj = objects[int(rng.integers(len(objects)))]
    attribute = obj["colour"] if rng.random() < 0.5 else obj["shape"]
    return f"{brand} {item} {brand[:2].upper()}-{int(rng.integers(1000, 10000))} - {attribute}"


def _wrong_attribute(objects: list[dict], rng: np.random.Generator) -> list[dict]:
    """The objects with one colour or shape changed to a value no object in the scene has."""
    present = {(o["colour"], o["shape"]) for o in objects}
    changed = [dict(o) for o in objects]
    target = changed[int(rng.integers(len(changed)))]
    attribute, values = ("colour", COLOURS) if rng.random() < 0.5 else ("shape", SHAPES)
    options = [v for v in values if v != target[attribute]
               and ((v, target["shape"]) if attribute == "colour" else (target["colour"], v)) not in present]
    target[attribute] = options[int(rng.integers(len(options)))]
    return changed


def _swap_caption(i: int, pairs: list[frozenset], descriptions: list[str], rng: np.random.Generator) -> str | None:
    """The clean caption of a random other sample whose caption does not name every object of this one
    (a different scene, and not a superset of it), so a swap is always a wrong caption."""
    def wrong(j: int) -> bool:
        return not pairs[i] <= pairs[j]

    for _ in range(100):
        other = int(rng.integers(len(pairs)))
        if wrong(other):
            return descriptions[other]
    others = [j for j in range(len(pairs)) if wrong(j)]
    return descriptions[others[int(rng.integers(len(others)))]] if others else None


def _junk(rng: np.random.Generator) -> str:
    template = JUNK_CAPTIONS[int(rng.integers(len(JUNK_CAPTIONS)))]
    return template.format(n=int(rng.integers(1000, 10000)))


# ---------------------------------------------------------------------------------------------- writing


def _key_digits(shard_size: int) -> int:
    return max(4, len(str(shard_size - 1)))


def _write_split(out_url: str, split: str, proto_ids: np.ndarray, protos: list[dict], cfg: CrawlConfig, seed: int,
                 first_shard: int, noise: list[str], rng: np.random.Generator, progress,
                 wrong_objects: dict | None = None, boilerplate: dict | None = None) -> list[str]:
    split_id = 0 if split == "train" else 1
    templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
    n = len(proto_ids)
    objects_of = [[{k: v for k, v in o.items() if k != "centre"} for o in protos[p]["objects"]] for p in proto_ids]
    template_ids = rng.integers(len(templates), size=n)
    descriptions = [templates[t](objs, protos[p]["background"])
                    for t, objs, p in zip(template_ids, objects_of, proto_ids)]
    pairs = [frozenset(_cs(o) for o in objs) for objs in objects_of]
    digits = _key_digits(cfg.shard_size)
    shard_urls = []
    for shard_offset, start in enumerate(range(0, n, cfg.shard_size)):
        shard_number = first_shard + shard_offset
        samples, rows = [], []
        for i in range(start, min(start + cfg.shard_size, n)):
            key = f"{shard_number:05d}{i - start:0{digits}d}"
            # Per-sample generator: an image depends only on (seed, split, index), not on shard size.
            sample_rng = np.random.default_rng((seed, split_id, i))
            image_bytes = _png(_render(protos[proto_ids[i]], cfg.image_size, sample_rng))
            kind = noise[i]
            background = protos[proto_ids[i]]["background"]
            if kind == "none":
                caption = descriptions[i]
            elif kind == "swap":
                caption = _swap_caption(i, pairs, descriptions, sample_rng)
                if caption is None:  # every sample shows the same scene: describe a changed one instead
                    caption = templates[template_ids[i]](_wrong_attribute(objects_of[i], sample_rng), background)
            elif kind == "wrong_attribute":
                caption = templates[template_ids[i]](_wrong_attribute(objects_of[i], sample_rng), background)
            elif kind == "mislabel":  # the scene's one wrong label, in this copy's own template
                caption = templates[template_ids[i]](wrong_objects[int(proto_ids[i])], background)
            elif kind == "template":
                caption = boilerplate[int(proto_ids[i])]
            elif kind == "partial_object":
                template = templates[template_ids[i]]
                if template is _t_count:  # "one shape: ..." would miscount a scene of two or three
                    template = _t_list
                caption = template(_some_objects(objects_of[i], sample_rng), background)
            elif kind == "background_only":
                caption = _background_only(background, sample_rng)
            elif kind == "product_name":
                caption = _product_name(objects_of[i], sample_rng)
            elif kind == "junk":
                caption = _junk(sample_rng)
            else:
                caption = ""
            meta = {
                "url": f"https://synthetic.invalid/{split}/{key}.png", "key": key, "caption": caption,
                "status": "success", "error_message": None, "width": cfg.image_size, "height": cfg.image_size,
                "original_width": cfg.image_size, "original_height": cfg.image_size, "exif": None,
                "sha256": hashlib.sha256(image_bytes).hexdigest(),
                "truth": {"objects": objects_of[i], "scene": int(proto_ids[i]),
                          "background": background, "noise": kind,
                          "description": descriptions[i]},
            }
            if split == "eval":  # what eval/task.json's hits and zero-shot labels read
                meta["group"] = scene_signature(meta["truth"])
                if len(objects_of[i]) == 1:
                    meta["label"] = zero_shot_class(objects_of[i][0])
            samples.append((key, {"png": image_bytes, "txt": caption.encode("utf-8"), "json": encode_json(meta)}))
            rows.append(meta)
            progress.update(1)
        url = storage.join(out_url, split, f"{shard_offset:05d}.tar")
        write_crawl_shard(url, samples, rows)
        shard_urls.append(url)
    return shard_urls


def make_crawl(out_url: str, cfg: CrawlConfig, seed: int) -> dict:
    """Write the synthetic crawl to `out_url` (train/, eval/, crawl.json) and return its stats.

    Deterministic: the same cfg and seed give byte-identical shards.
    """
    from tqdm import tqdm

    cfg.validate()
    rng = np.random.default_rng(seed)
    protos = _make_prototypes(cfg.prototypes, rng)
    ranks = rng.permutation(cfg.prototypes)  # which prototype is the most popular is random
    popularity = 1.0 / (ranks + 1.0) ** cfg.zipf
    train_ids = rng.choice(cfg.prototypes, size=cfg.samples, p=popularity / popularity.sum())
    # Eval is balanced: every prototype once before any twice.
    eval_ids = np.concatenate([rng.permutation(cfg.prototypes)
                               for _ in range(-(-cfg.eval_samples // cfg.prototypes))])[: cfg.eval_samples]
    wrong_objects, boilerplate = {}, {}
    if cfg.noise_mode == "correlated":  # its own generator: the i.i.d. crawl stays byte-identical
        train_noise, wrong_objects, boilerplate = _correlated_noise_plan(train_ids, cfg.noise, protos,
                                                                         np.random.default_rng((seed, 102)))
    elif cfg.noise_mode == "incomplete":  # its own generator too
        train_noise = _incomplete_noise_plan(train_ids, cfg.noise, protos, np.random.default_rng((seed, 103)))
    else:
        train_noise = _noise_plan(cfg.samples, cfg.noise, rng)
    train_shards = -(-cfg.samples // cfg.shard_size)
    with tqdm(total=cfg.samples + cfg.eval_samples, desc="make-crawl", unit="img", file=sys.stderr,
              disable=None) as progress:
        train_urls = _write_split(out_url, "train", train_ids, protos, cfg, seed, 0, train_noise,
                                  np.random.default_rng((seed, 100)), progress, wrong_objects, boilerplate)
        eval_urls = _write_split(out_url, "eval", eval_ids, protos, cfg, seed, train_shards,
                                 ["none"] * cfg.eval_samples, np.random.default_rng((seed, 101)), progress)
    noise_counts = {kind: train_noise.count(kind) for kind in MODE_NOISE_TYPES[cfg.noise_mode]}
    stats = {
        "params": {**dataclasses.asdict(cfg), "seed": seed},
        "train": {"samples": cfg.samples, "shards": len(train_urls), "noise": noise_counts,
                  "distinct_scenes": int(len(set(train_ids.tolist())))},
        "eval": {"samples": cfg.eval_samples, "shards": len(eval_urls),
                 "distinct_scenes": int(len(set(eval_ids.tolist())))},
        # Relative to the crawl folder, so the same crawl written elsewhere has the same crawl.json.
        "train_input": f"train/{{00000..{len(train_urls) - 1:05d}}}.tar",
        "eval_input": f"eval/{{00000..{len(eval_urls) - 1:05d}}}.tar",
        "shapes": list(SHAPES), "colours": list(COLOURS),
        "train_templates": [t.__name__ for t in TRAIN_TEMPLATES],
        "eval_templates": [t.__name__ for t in EVAL_TEMPLATES],
    }
    write_crawl_records(out_url, eval_task(), stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    defaults = CrawlConfig()
    parser = argparse.ArgumentParser(prog="tldr-vlp make-crawl",
                                     description="Write the synthetic benchmark crawl (train + clean eval split).")
    parser.add_argument("--out", required=True, help="output folder URL")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="train samples")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples, help="clean eval samples")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="share of noisy train captions")
    parser.add_argument("--noise-mode", choices=NOISE_MODES, default=defaults.noise_mode,
                        help="iid: each noisy caption on its own; correlated: whole scenes share one wrong caption; "
                             "incomplete: captions naming only part of the image")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--prototypes", type=int, default=defaults.prototypes, help="distinct scenes")
    parser.add_argument("--zipf", type=float, default=defaults.zipf, help="Zipf exponent of scene popularity")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = CrawlConfig(samples=args.samples, eval_samples=args.eval_samples, image_size=args.image_size,
                      noise=args.noise, noise_mode=args.noise_mode, prototypes=args.prototypes, zipf=args.zipf,
                      shard_size=args.shard_size)
    from tldr_tasks.config import ConfigError

    try:
        stats = make_crawl(args.out, cfg, args.seed)
    except ConfigError as err:
        parser.error(str(err))
    print(json.dumps({"out": args.out, "train_input": storage.join(args.out, stats["train_input"]),
                      "eval_input": storage.join(args.out, stats["eval_input"]),
                      "noise": stats["train"]["noise"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
