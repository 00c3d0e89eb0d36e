"""A real-image benchmark crawl: emoji drawings from the npm `emoji-datasource-<vendor>` packages.

    tldr-vlp make-real-crawl --out crawl [--seed 0 --noise 0.3 --max-train N --max-eval 2000]

Every concept (one emoji incl. its skin tone, e.g. "waving hand sign with medium skin tone") is drawn
by four vendors (Apple, Google, Twitter, Facebook): near-duplicates of one concept, as in a web crawl,
made by people who never saw this project. Only concepts all four vendors draw are used (3,642 in
16.0.0). The selection is tested on drawings it never saw: the eval split is the held-out vendor's
(EVAL_VENDOR) drawings of a seeded sample of the concepts, the train split all concepts as the other
three vendors draw them. The clean caption is the metadata, e.g.

    "grinning face with big eyes, a face smiling emoji from the smileys & emotion set"

A `noise` share of train captions is planted the way the web has it (truth.noise names the kind):
  swap      (about half) the caption of another random concept, per sample
  template  (about a quarter) whole subcategories, all vendors, share one shop-style alt-text
  mislabel  (about a quarter) whole concepts carry one wrong caption on every drawing: the caption of
            a near miss from the same subcategory
Groups are whole while they fit; per-sample swaps fill the exact count round(noise * samples).

Sources: one pinned version of the four packages, each tarball checked against its pinned sha512
before use and cached (default ~/.cache/tldr-vlp/npm); only emoji.json and the 64-px PNGs are read,
straight out of the .tgz. The downloads are 99 MB (apple), 74 MB (google), 62 MB (twitter) and
103 MB (facebook): 339 MB once.

Layout (what synthetic.make_crawl writes, plus `truth` in every KEY.json):
    {out}/train/00000.tar, 00000.parquet, 00000_stats.json, ...
    {out}/eval/00000.tar, ...; eval/task.json   retrieval hits are eval items of the same "group"
    {out}/crawl.json      parameters, package versions and counts per noise kind
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tldr_tasks import storage
from tldr_tasks.config import ConfigError
from tldr_tasks.data.shards import encode_json, write_crawl_records, write_crawl_shard

PACKAGE_VERSION = "16.0.0"
VENDORS: tuple[str, ...] = ("apple", "google", "twitter", "facebook")
EVAL_VENDOR = "facebook"
# npm's `dist.integrity` of each tarball: a download that does not match is refused.
INTEGRITY: dict[str, str] = {
    "apple": "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
    "google": "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "twitter": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "facebook": "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
}
SOURCES: dict[str, tuple[str, str]] = {
    vendor: (f"https://registry.npmjs.org/emoji-datasource-{vendor}/-/emoji-datasource-{vendor}-{PACKAGE_VERSION}.tgz",
             INTEGRITY[vendor])
    for vendor in VENDORS
}
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "tldr-vlp", "npm")
DEFAULT_MAX_EVAL = 2000
NOISE_KINDS: tuple[str, ...] = ("none", "swap", "template", "mislabel")
# Shop-style alt-text: one per templated subcategory, shared by all its images.
TEMPLATES: tuple[str, ...] = (
    "free emoji icon png download", "sticker pack {n} - best price", "{n} cute stickers for whatsapp and telegram",
    "emoji vector illustration, stock image {n}", "download free icons - pack {n}",
    "buy now: emoji keychain collection {n}",
)

SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}


def skin_phrase(key: str) -> str:
    """' with medium skin tone' for '1F3FD'; two tones (couples, handshakes) for '1F3FB-1F3FF'."""
    tones = [SKIN_TONES[part] for part in key.upper().split("-") if part in SKIN_TONES]
    if not tones:
        return ""
    if len(tones) == 1 or len(set(tones)) == 1:
        return f" with {tones[0]} skin tone"
    return f" with {tones[0]} and {tones[1]} skin tones"


def concept_name(emoji: dict, skin_key: str = "") -> str:
    """The clean lowercase Unicode name with the skin tone: 'waving hand sign with medium skin tone'."""
    return (emoji.get("name") or emoji["short_name"].replace("_", " ")).lower() + skin_phrase(skin_key)


def caption_for(emoji: dict, skin_key: str = "") -> str:
    """A natural description from the real metadata: name, skin tone, subcategory and category."""
    subcategory = (emoji.get("subcategory") or "").replace("-", " ")
    category = (emoji.get("category") or "").lower()
    text = concept_name(emoji, skin_key)
    if subcategory and category:
        article = "an" if subcategory[0] in "aeiou" else "a"
        text += f", {article} {subcategory} emoji from the {category} set"
    elif category:
        text += f", an emoji from the {category} set"
    return text


# What caption_for (and real_mixed's captions: "..., a 3d model from ...") put after the name. Names
# never contain ", a " or ", an ", so it cannot cut one.
_DESCRIPTION_TAIL = re.compile(r",\s+an?\s+[^;]*\b(?:emoji|model)\b[^;]*$")
_ARTICLE = re.compile(r"^(?:an?|the)\s+")


def describes_concept(caption: str, truth: dict) -> bool:
    """True iff one ';'-separated part of `caption` names exactly this concept: is its clean name
    (truth["name"], skin tone included), optionally after an article and before a ", a ... emoji ..."
    (or ", a ... model ...") description. Case and spacing do not matter.

    A whole name is compared, not a phrase search: "grinning face with big eyes" does not name
    "grinning face", and "kiss, a family emoji ..." does not name "family" (subcategory words are
    often emoji names). Clean captions pass; swaps, templates and mislabels fail. Like
    synthetic.names_scene, "wrong caption; right caption" passes.
    """
    name = truth.get("name")
    if not caption or not name:
        return False
    for part in caption.lower().split(";"):
        slot = _DESCRIPTION_TAIL.sub("", " ".join(part.split())).strip(" .")
        if name in (slot, _ARTICLE.sub("", slot)):
            return True
    return False


def eval_task() -> dict:
    """eval/task.json: retrieval hits are eval items of the same group (the concept's name, so
    concepts with one name, e.g. the two "man in tuxedo", are hits for each other); no zero-shot."""
    return {"hit": "group"}


# ---------------------------------------------------------------------------------------------- sources


class IntegrityError(ValueError):
    """A tarball's sha512 (or sha256) is not the pinned one: it is not used."""


def _sri(algorithm: str, digest: bytes) -> str:
    return f"{algorithm}-" + base64.b64encode(digest).decode("ascii")


def sri_from_hex(algorithm: str, hexdigest: str) -> str:
    """'sha256-<base64>' from a hex digest (what Debian's Packages index publishes)."""
    return _sri(algorithm, bytes.fromhex(hexdigest))


def _algorithm(integrity: str) -> str:
    algorithm = integrity.split("-", 1)[0]
    if algorithm not in ("sha512", "sha256"):
        raise IntegrityError(f"integrity {integrity!r} is neither sha512-<base64> nor sha256-<base64>")
    return algorithm


def _file_sri(path: str, algorithm: str = "sha512") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return _sri(algorithm, digest.digest())


def fetch_tarball(url: str, integrity: str, cache_dir: str) -> str:
    """The local path of the archive at `url`, downloaded into `cache_dir` once and checked against
    `integrity` (npm's "sha512-<base64>", or "sha256-<base64>" for a Debian package) on every use.
    Raises IntegrityError on a mismatch."""
    from tqdm import tqdm

    algorithm = _algorithm(integrity)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, posixpath.basename(urllib.parse.urlparse(url).path))
    if os.path.exists(path):
        got = _file_sri(path, algorithm)
        if got != integrity:
            raise IntegrityError(f"cached {path} has {algorithm} {got}, not the pinned {integrity}: refusing it "
                                 "(delete it to download it again)")
        return path
    digest = hashlib.new(algorithm)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            size = response.headers.get("Content-Length")
            with tqdm(total=int(size) if size else None, desc=posixpath.basename(path), unit="B", unit_scale=True,
                      file=sys.stderr, disable=None) as progress:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                    progress.update(len(block))
        got = _sri(algorithm, digest.digest())
        if got != integrity:
            raise IntegrityError(f"{url} has {algorithm} {got}, not the pinned {integrity}: refusing it")
        os.chmod(tmp, 0o644)  # mkstemp makes files private; the cache is meant to be shared
        os.replace(tmp, path)  # only a verified, complete download enters the cache
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@dataclass
class Package:
    """What is read from one vendor's tarball."""

    name: str
    version: str
    emojis: list[dict]
    images: dict[str, bytes]  # 64-px PNG file name -> bytes


def read_package(path: str, vendor: str) -> Package:
    """package.json, emoji.json and img/<vendor>/64/*.png of an emoji-datasource tarball, in one pass
    over the .tgz (nothing is extracted)."""
    meta, emojis, images = {}, None, {}
    image_dir = f"img/{vendor}/64/"
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            inner = member.name.split("/", 1)[-1]  # npm puts everything under package/
            if not member.isfile():
                continue
            if inner == "package.json":
                meta = json.loads(tar.extractfile(member).read())
            elif inner == "emoji.json":
                emojis = json.loads(tar.extractfile(member).read())
            elif inner.startswith(image_dir) and inner.endswith(".png") and "/" not in inner[len(image_dir):]:
                images[inner[len(image_dir):]] = tar.extractfile(member).read()
    if emojis is None:
        raise ValueError(f"{path} has no emoji.json: not an emoji-datasource package")
    return Package(meta.get("name", ""), meta.get("version", ""), emojis, images)


# ---------------------------------------------------------------------------------------------- concepts


@dataclass(frozen=True)
class Concept:
    id: int
    name: str
    caption: str
    subcategory: str
    image: str  # the PNG file name, the same in every vendor's package


def concepts_of(emojis: list[dict], packages: dict[str, Package]) -> list[Concept]:
    """Every emoji and skin-tone variant that every vendor draws (flag set and PNG present), in the
    dataset's sort order; its id is its index."""
    found = []
    for emoji in sorted(emojis, key=lambda e: e.get("sort_order", 0)):
        variants = [("", emoji)] + sorted((emoji.get("skin_variations") or {}).items())
        for key, variant in variants:
            if all(variant.get(f"has_img_{v}") and variant["image"] in p.images for v, p in packages.items()):
                found.append((concept_name(emoji, key), caption_for(emoji, key), emoji.get("subcategory") or "",
                              variant["image"]))
    return [Concept(i, *fields) for i, fields in enumerate(found)]


def _truth(concept: Concept, vendor: str, noise: str) -> dict:
    return {"scene": concept.id, "name": concept.name, "vendor": vendor, "noise": noise,
            "description": concept.caption}


def _other_caption(concept: Concept, candidates: list[Concept], rng: np.random.Generator) -> str:
    """The clean caption of a random candidate that does not describe `concept` (never its name)."""
    truth = {"name": concept.name}
    for _ in range(100):
        other = candidates[int(rng.integers(len(candidates)))]
        if not describes_concept(other.caption, truth):
            return other.caption
    wrong = [c for c in candidates if not describes_concept(c.caption, truth)]
    return wrong[int(rng.integers(len(wrong)))].caption


def plant_noise(items: list[tuple[Concept, object]], concepts: list[Concept], share: float,
                rng: np.random.Generator, templates: tuple[str, ...] = TEMPLATES) -> tuple[list[str], list[str]]:
    """(noise kind, caption) per train item (a concept and its image: a vendor, a variant): exactly
    round(share * n) noisy, a quarter each in whole templated subcategories (one of `templates`, `{n}`
    a number) and whole mislabelled concepts while they fit, swaps for the rest."""
    n = len(items)
    noisy = int(round(share * n))
    kinds = ["none"] * n
    captions = [concept.caption for concept, _ in items]

    def groups(key) -> list[list[int]]:
        by: dict = {}
        for i, (concept, _) in enumerate(items):
            if kinds[i] == "none":
                by.setdefault(key(concept), []).append(i)
        return [by[k] for k in sorted(by)]

    budget = int(round(noisy / 4))
    subcategory_groups = groups(lambda c: c.subcategory)
    for j in rng.permutation(len(subcategory_groups)):
        members = subcategory_groups[j]
        if len(members) <= budget:
            text = templates[int(rng.integers(len(templates)))].format(n=int(rng.integers(2, 100)))
            for i in members:
                kinds[i], captions[i] = "template", text
            budget -= len(members)

    by_subcategory: dict[str, list[Concept]] = {}
    for concept in concepts:
        by_subcategory.setdefault(concept.subcategory, []).append(concept)
    budget = int(round(noisy / 4))
    concept_groups = groups(lambda c: c.id)
    for j in rng.permutation(len(concept_groups)):
        members = concept_groups[j]
        if len(members) <= budget:
            concept = items[members[0]][0]
            # A near miss: another concept of the same subcategory, if there is one with another name.
            near = [c for c in by_subcategory[concept.subcategory] if c.name != concept.name]
            text = _other_caption(concept, near or concepts, rng)
            for i in members:
                kinds[i], captions[i] = "mislabel", text
            budget -= len(members)

    clean = [i for i in range(n) if kinds[i] == "none"]
    swapped = rng.permutation(clean)[: noisy - (n - len(clean))]
    for i in sorted(int(i) for i in swapped):
        kinds[i], captions[i] = "swap", _other_caption(items[i][0], concepts, rng)
    return kinds, captions


# ---------------------------------------------------------------------------------------------- writing


def render(image: bytes, size: int) -> tuple[bytes, tuple[int, int]]:
    """The (RGBA) image composited on white, resized to size x size, as PNG; and its original size."""
    with Image.open(io.BytesIO(image)) as img:
        rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    if canvas.size != (size, size):  # after compositing, so transparent pixels' colours cannot bleed in
        canvas = canvas.resize((size, size), Image.LANCZOS)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue(), rgba.size


def _key_digits(shard_size: int) -> int:
    return max(4, len(str(shard_size - 1)))


@dataclass(frozen=True)
class SplitWriter:
    """How one real crawl writes a split: where its images come from and what its truth says.

    image_of(item) -> the source image bytes; truth_of(item, noise kind) -> KEY.json's truth;
    group_of(item) -> the eval item's "group" (what eval/task.json's hits read); host names the
    crawl in the placeholder URLs (https://<host>/<split>/<key>.png)."""

    image_of: Callable[[Any], bytes]
    truth_of: Callable[[Any, str], dict]
    group_of: Callable[[Any], str]
    host: str
    image_size: int
    shard_size: int


def write_split(out_url: str, split: str, items: list, kinds: list[str], captions: list[str], writer: SplitWriter,
                first_shard: int, progress) -> list[str]:
    """Write `items` with their captions as `split`'s shards (keys numbered from `first_shard`, as the
    synthetic crawl numbers them); the shard URLs."""
    shard_size, image_size = writer.shard_size, writer.image_size
    digits = _key_digits(shard_size)
    shard_urls = []
    for shard_offset, start in enumerate(range(0, len(items), shard_size)):
        shard_number = first_shard + shard_offset
        samples, rows = [], []
        for i in range(start, min(start + shard_size, len(items))):
            key = f"{shard_number:05d}{i - start:0{digits}d}"
            image_bytes, (width, height) = render(writer.image_of(items[i]), image_size)
            meta = {
                "url": f"https://{writer.host}/{split}/{key}.png", "key": key, "caption": captions[i],
                "status": "success", "error_message": None, "width": image_size, "height": image_size,
                "original_width": width, "original_height": height, "exif": None,
                "sha256": hashlib.sha256(image_bytes).hexdigest(),
                "truth": writer.truth_of(items[i], kinds[i]),
            }
            if split == "eval":  # what eval/task.json's hits read
                meta["group"] = writer.group_of(items[i])
            samples.append((key, {"png": image_bytes, "txt": captions[i].encode("utf-8"), "json": encode_json(meta)}))
            rows.append(meta)
            progress.update(1)
        url = storage.join(out_url, split, f"{shard_offset:05d}.tar")
        write_crawl_shard(url, samples, rows)
        shard_urls.append(url)
    return shard_urls


def check_params(noise: float, image_size: int, shard_size: int, max_train: int | None,
                 max_eval: int | None) -> None:
    """The parameters every real crawl shares; ConfigError names the one to change."""
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"noise is {noise}: it is a share of train captions, from 0 to 1")
    if image_size < 8:
        raise ConfigError(f"image_size is {image_size}: use at least 8 pixels")
    if shard_size < 1:
        raise ConfigError(f"shard_size is {shard_size}: use at least 1 sample per shard")
    for name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} is {value}: use at least 1, or None")


def _validate(noise: float, image_size: int, shard_size: int, max_train: int | None, max_eval: int | None,
              sources: dict[str, tuple[str, str]]) -> None:
    check_params(noise, image_size, shard_size, max_train, max_eval)
    if EVAL_VENDOR not in sources or len(sources) < 2:
        raise ConfigError(f"sources are {sorted(sources)}: they need {EVAL_VENDOR!r} (held out) and a train vendor")


def make_real_crawl(out_url: str, seed: int, noise: float = 0.3, image_size: int = 64, shard_size: int = 1000,
                    cache_dir: str | None = None, max_train: int | None = None, max_eval: int | None = None,
                    sources: dict[str, tuple[str, str]] | None = None) -> dict:
    """Write the real emoji crawl to `out_url` (train/, eval/, crawl.json) and return its stats.

    `max_train` caps the train split (None: every concept by every train vendor), `max_eval` the
    eval split (None: DEFAULT_MAX_EVAL), both by a seeded sample. `sources` maps vendor ->
    (tarball URL, sha512 integrity), SOURCES by default; tests pass file:// URLs of packages they
    make. Deterministic: the same arguments give byte-identical shards.
    """
    from tqdm import tqdm

    sources = SOURCES if sources is None else sources
    _validate(noise, image_size, shard_size, max_train, max_eval, sources)
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    packages = {vendor: read_package(fetch_tarball(url, integrity, cache_dir), vendor)
                for vendor, (url, integrity) in sources.items()}
    concepts = concepts_of(packages[EVAL_VENDOR].emojis, packages)
    if len({c.name for c in concepts}) < 2:  # a wrong caption needs another name
        raise ValueError(f"fewer than two emoji names are drawn by every vendor of {sorted(packages)}")
    train_vendors = [vendor for vendor in packages if vendor != EVAL_VENDOR]

    rng = np.random.default_rng(seed)
    n_eval = min(max_eval or DEFAULT_MAX_EVAL, len(concepts))
    eval_items = [(concepts[int(i)], EVAL_VENDOR) for i in rng.choice(len(concepts), size=n_eval, replace=False)]
    train_items = [(concept, vendor) for concept in concepts for vendor in train_vendors]
    if max_train is not None and max_train < len(train_items):
        train_items = [train_items[int(i)] for i in np.sort(rng.choice(len(train_items), max_train, replace=False))]
    train_items = [train_items[int(i)] for i in rng.permutation(len(train_items))]  # a crawl is not sorted
    kinds, captions = plant_noise(train_items, concepts, noise, np.random.default_rng((seed, 1)))

    writer = SplitWriter(image_of=lambda item: packages[item[1]].images[item[0].image],
                         truth_of=lambda item, kind: _truth(item[0], item[1], kind),
                         group_of=lambda item: item[0].name, host="real-emoji.invalid", image_size=image_size,
                         shard_size=shard_size)
    train_shards = -(-len(train_items) // shard_size)
    with tqdm(total=len(train_items) + len(eval_items), desc="make-real-crawl", unit="img", file=sys.stderr,
              disable=None) as progress:
        train_urls = write_split(out_url, "train", train_items, kinds, captions, writer, 0, progress)
        eval_urls = write_split(out_url, "eval", eval_items, ["none"] * n_eval, [c.caption for c, _ in eval_items],
                                writer, train_shards, progress)
    stats = {
        "kind": "real_emoji",
        "params": {"seed": seed, "noise": noise, "image_size": image_size, "shard_size": shard_size,
                   "max_train": max_train, "max_eval": max_eval, "eval_vendor": EVAL_VENDOR,
                   "train_vendors": train_vendors,
                   "packages": {vendor: {"name": packages[vendor].name, "version": packages[vendor].version,
                                         "url": url, "integrity": integrity}
                                for vendor, (url, integrity) in sources.items()}},
        "concepts": len(concepts),
        "train": {"samples": len(train_items), "shards": len(train_urls),
                  "noise": {kind: kinds.count(kind) for kind in NOISE_KINDS},
                  "templated_subcategories": len({c.subcategory for (c, _), k in zip(train_items, kinds)
                                                  if k == "template"}),
                  "mislabelled_concepts": len({c.id for (c, _), k in zip(train_items, kinds) if k == "mislabel"}),
                  "distinct_concepts": len({c.id for c, _ in train_items})},
        "eval": {"samples": n_eval, "shards": len(eval_urls), "distinct_concepts": len({c.id for c, _ in eval_items}),
                 "groups": len({c.name for c, _ in eval_items})},
        # Relative to the crawl folder, so the same crawl written elsewhere has the same crawl.json.
        "train_input": f"train/{{00000..{len(train_urls) - 1:05d}}}.tar",
        "eval_input": f"eval/{{00000..{len(eval_urls) - 1:05d}}}.tar",
        "templates": list(TEMPLATES),
    }
    write_crawl_records(out_url, eval_task(), stats)
    return stats
