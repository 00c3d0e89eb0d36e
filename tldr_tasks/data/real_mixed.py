"""A second real-image benchmark crawl: 3D-rendered emoji and rendered furniture, from registry packages.

    tldr-vlp make-real-crawl --source mixed --out crawl [--seed 0 --noise 0.3 --max-train N --max-eval N]

Two domains no one here made, with the redundancy they have by nature, not planted:
  emoji      npm @lobehub/fluent-emoji-3d (Microsoft's Fluent Emoji, 3D style, 256-px WebP), named by
             npm emoji-datasource's emoji.json: an emoji with skin tones is rendered six times (the
             default yellow and five tones), six near-duplicates of one concept;
  furniture  Debian sweethome3d-furniture (the Sweet Home 3D catalogues of Scopia, Kator Legaz,
             Reallusion and BlendSwap, 128-px icons rendered from the 3D models): many models share
             a name ("chair" 25 times, "armchair" 11), look-alikes from different hands.
A concept is one name in one domain; every image of it (skin tone, model) is a variant, and the variants
of a name share the eval `group`. The clean caption is one per concept, from the metadata:

    "waving hand, a 3d rendered hand fingers open emoji from the people & body set"
    "chair, a 3d model from the kitchen furniture catalog: seat"     (name, room, the tags all its models share)

The selection never sees the held-out concepts: a seeded sample of names (EVAL_SHARE of the images,
capped by max_eval) is the eval split with every variant, the train split is every other name's
variants. The benchmark's evaluation halves the eval split into validation and test by key hash.
Planted noise is real_emoji's (real_crawl.plant_noise: swaps, shop-style templates on whole
subcategories - an emoji subcategory or a furniture room -, one near-miss caption on every variant of
a concept), with alt-text fitting both domains (TEMPLATES), so real_crawl's judge works unchanged.

Sources (SOURCES): one pinned version of each archive, checked against its pinned digest before use
(npm's sha512 integrity; the sha256 of Debian's Packages index) and cached with the emoji crawl's
(default ~/.cache/tldr-vlp/npm). Images are read straight out of the archives (.tgz; the .deb's
data.tar.xz and the .sh3f zip catalogues inside it): nothing is extracted. Downloads: 16 MB
(fluent-emoji-3d), 25 MB (emoji-datasource), 120 MB (sweethome3d-furniture).

Layout: real_crawl's (train/, eval/ with task.json {"hit": "group"}, crawl.json, `truth` in KEY.json).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tldr_tasks.config import ConfigError
from tldr_tasks.data.real_crawl import (
    DEFAULT_CACHE_DIR,
    NOISE_KINDS,
    Concept,
    SplitWriter,
    check_params,
    describes_concept,
    eval_task,
    fetch_tarball,
    plant_noise,
    skin_phrase,
    sri_from_hex,
    write_split,
)
from tldr_tasks.data.shards import write_crawl_records

KIND = "real_mixed"
DOMAINS: tuple[str, ...] = ("emoji", "furniture")
# name -> (URL, integrity). npm's dist.integrity; Debian bookworm's Packages SHA256 of the .deb.
SOURCES: dict[str, tuple[str, str]] = {
    "fluent_emoji_3d": (
        "https://registry.npmjs.org/@lobehub/fluent-emoji-3d/-/fluent-emoji-3d-1.1.0.tgz",
        "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g=="),
    "emoji_datasource": (
        "https://registry.npmjs.org/emoji-datasource/-/emoji-datasource-16.0.0.tgz",
        "sha512-/qHKqK5Nr3+8zhgO6kHmF43Fm5C8HNn0AaFRIpgw8HF3+uF0Vfc8jgLI1ZQS5ba1vBzksS8NBCjHejwLb2D/Sg=="),
    "sweethome3d_furniture": (
        "https://deb.debian.org/debian/pool/main/s/sweethome3d-furniture/sweethome3d-furniture_1.8-1_all.deb",
        sri_from_hex("sha256", "3ccb90c63f9525e887a767b9cd5c8b6933b8b6b2973a615a5359ee68a2118668")),
}
LICENCES = {
    "fluent_emoji_3d": "MIT (package.json; Microsoft's Fluent Emoji are MIT)",
    "emoji_datasource": "MIT (names only)",
    "sweethome3d_furniture": "CC-BY-3.0 (Scopia, BlendSwap-CC-BY), CC-BY-3.0-US (Kator Legaz, Reallusion), "
                             "CC0 (BlendSwap-CC-0): debian/copyright; attribution in every truth.source",
}
# Tags that name where a model comes from, not what it is (on every BlendSwap piece, on 47 of Scopia's).
PROVENANCE_TAGS = frozenset({"blend swap", "scpts"})
EVAL_SHARE = 0.2  # of the images: the held-out names' variants
DEFAULT_MAX_EVAL = 2000
# Shop-style alt-text that fits an emoji and a piece of furniture alike.
TEMPLATES: tuple[str, ...] = (
    "free 3d icon png download", "3d render pack {n} - best price", "{n} cute 3d stickers for your app",
    "vector illustration, stock image {n}", "download free 3d assets - pack {n}",
    "buy now: home decor collection {n}",
)


@dataclass(frozen=True)
class Variant:
    """One image of a concept: its domain, which variant it is (a skin tone, a model id) and its bytes."""

    domain: str
    label: str
    source: str  # the package and, for furniture, the catalogue (attribution)
    image: bytes


# ---------------------------------------------------------------------------------------------- emoji


def read_fluent(fluent_path: str, names_path: str) -> list[tuple[str, str, str, list[Variant]]]:
    """(name, caption, subcategory, variants) per emoji that fluent-emoji-3d renders, in emoji.json's
    sort order; the variants are its default rendering and its skin tones, found by code point."""
    images: dict[str, bytes] = {}
    with tarfile.open(fluent_path, "r:gz") as tar:
        for member in tar:
            inner = member.name.split("/", 1)[-1]
            if member.isfile() and inner.startswith("assets/") and inner.endswith(".webp"):
                images[posixpath.basename(inner)[: -len(".webp")].lower()] = tar.extractfile(member).read()
    emojis = None
    with tarfile.open(names_path, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.split("/", 1)[-1] == "emoji.json":
                emojis = json.loads(tar.extractfile(member).read())
    if emojis is None:
        raise ValueError(f"{names_path} has no emoji.json: not the emoji-datasource package")

    def image_of(entry: dict) -> bytes | None:
        for field in ("unified", "non_qualified"):
            if entry.get(field) and entry[field].lower() in images:
                return images[entry[field].lower()]
        return None

    source = f"fluent-emoji-3d ({posixpath.basename(fluent_path)})"
    found = []
    for emoji in sorted(emojis, key=lambda e: e.get("sort_order", 0)):
        variants = []
        for key, entry in [("", emoji)] + sorted((emoji.get("skin_variations") or {}).items()):
            image = image_of(entry)
            if image is not None:
                variants.append(Variant("emoji", skin_phrase(key).strip() or "default", source, image))
        if variants:
            name = (emoji.get("name") or emoji["short_name"].replace("_", " ")).lower()
            subcategory = (emoji.get("subcategory") or "").replace("-", " ")
            category = (emoji.get("category") or "").lower()
            article = "an" if subcategory[:1] in tuple("aeiou") else "a"
            caption = f"{name}, {article} 3d rendered {subcategory} emoji from the {category} set".replace("  ", " ")
            found.append((name, caption, f"emoji:{subcategory}", variants))
    return found


# ---------------------------------------------------------------------------------------------- furniture


def deb_data(path: str) -> tarfile.TarFile:
    """The data.tar.* of a Debian package (an `ar` archive), opened in memory."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size)
            f.read(size % 2)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    raise ValueError(f"{path} has no data.tar member")


def _properties(text: str) -> dict[str, str]:
    """A Java .properties file (ISO-8859-1 with \\uXXXX escapes; no continuation lines in these)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), value.strip())
    return out


def read_catalog(data: bytes, catalog: str) -> list[tuple[str, str, list[str], str, str, bytes]]:
    """(name, category, tags, model id, creator, icon PNG) of every piece in one Sweet Home 3D .sh3f
    catalogue; provenance tags (PROVENANCE_TAGS) are dropped."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        props = _properties(z.read("PluginFurnitureCatalog.properties").decode("latin-1"))
        members = set(z.namelist())
        pieces = []
        for index in sorted(int(k.split("#")[1]) for k in props if re.fullmatch(r"name#\d+", k)):
            icon = props.get(f"icon#{index}", "").lstrip("/")
            if icon not in members:
                continue
            tags = [t.strip().lower() for t in props.get(f"tags#{index}", "").split(",")
                    if t.strip() and t.strip().lower() not in PROVENANCE_TAGS]
            pieces.append((" ".join(props[f"name#{index}"].split()).lower().replace(";", ","),
                           props.get(f"category#{index}", "miscellaneous").lower(), tags,
                           props.get(f"id#{index}", f"{catalog}#{index}"), props.get(f"creator#{index}", ""),
                           z.read(icon)))
    return pieces


def read_furniture(deb_path: str) -> list[tuple[str, str, str, list[Variant]]]:
    """(name, caption, subcategory, variants) per furniture name over every catalogue of the package,
    by first appearance; the room is the name's most common category, the tags those all its models share."""
    by_name: dict[str, list[tuple[str, list[str], Variant]]] = {}
    package = posixpath.basename(deb_path)
    with deb_data(deb_path) as tar:
        for member in sorted((m for m in tar if m.isfile() and m.name.endswith(".sh3f")), key=lambda m: m.name):
            catalog = posixpath.basename(member.name)[: -len(".sh3f")]
            for name, category, tags, model, creator, icon in read_catalog(tar.extractfile(member).read(), catalog):
                source = f"{package}:{catalog}" + (f" by {creator}" if creator else "")  # CC-BY's attribution
                by_name.setdefault(name, []).append((category, tags, Variant("furniture", model, source, icon)))
    found = []
    for name, pieces in by_name.items():
        rooms = Counter(category for category, _, _ in pieces)
        room = max(rooms, key=lambda r: (rooms[r], -[c for c, _, _ in pieces].index(r)))
        shared = [t for t in pieces[0][1] if all(t in tags for _, tags, _ in pieces) and t != name][:3]
        caption = f"{name}, a 3d model from the {room} furniture catalog" + (f": {', '.join(shared)}" if shared else "")
        found.append((name, caption, f"furniture:{room}", [variant for _, _, variant in pieces]))
    return found


# ---------------------------------------------------------------------------------------------- the crawl


def _validate(noise: float, image_size: int, shard_size: int, max_train: int | None, max_eval: int | None,
              eval_share: float, sources: dict[str, tuple[str, str]]) -> None:
    check_params(noise, image_size, shard_size, max_train, max_eval)
    if not 0.0 < eval_share < 1.0:
        raise ConfigError(f"eval_share is {eval_share}: it is the held-out share of images, above 0 and below 1")
    if set(sources) != set(SOURCES):
        raise ConfigError(f"sources are {sorted(sources)}: they need exactly {sorted(SOURCES)}")


def held_out_names(concepts: list[Concept], variants: dict[int, list[Variant]], cap: int,
                   rng: np.random.Generator) -> set[str]:
    """A seeded sample of names whose variants (every domain's) fit in `cap` images together, taken
    in a random order while they fit."""
    sizes: Counter = Counter()
    for concept in concepts:
        sizes[concept.name] += len(variants[concept.id])
    names = sorted(sizes)
    held, total = set(), 0
    for j in rng.permutation(len(names)):
        if total + sizes[names[j]] <= cap:
            held.add(names[j])
            total += sizes[names[j]]
    return held


def make_mixed_crawl(out_url: str, seed: int, noise: float = 0.3, image_size: int = 64, shard_size: int = 1000,
                     cache_dir: str | None = None, max_train: int | None = None, max_eval: int | None = None,
                     eval_share: float = EVAL_SHARE, sources: dict[str, tuple[str, str]] | None = None) -> dict:
    """Write the mixed real crawl to `out_url` (train/, eval/, crawl.json) and return its stats.

    The eval split is every variant of a seeded sample of names, min(eval_share of the images,
    max_eval or DEFAULT_MAX_EVAL) images at most; `max_train` caps the train split by a seeded sample
    (None: every other image). `sources` maps SOURCES' names -> (URL, integrity); tests pass file://
    URLs of archives they make. Deterministic: the same arguments give byte-identical shards.
    """
    from tqdm import tqdm

    sources = SOURCES if sources is None else sources
    _validate(noise, image_size, shard_size, max_train, max_eval, eval_share, sources)
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    paths = {name: fetch_tarball(url, integrity, cache_dir) for name, (url, integrity) in sources.items()}
    found = read_fluent(paths["fluent_emoji_3d"], paths["emoji_datasource"]) + \
        read_furniture(paths["sweethome3d_furniture"])
    concepts = [Concept(i, name, caption, subcategory, "") for i, (name, caption, subcategory, _) in enumerate(found)]
    variants = {i: vs for i, (_, _, _, vs) in enumerate(found)}
    bad = [c.caption for c in concepts if not describes_concept(c.caption, {"name": c.name})]
    if bad:  # the judge must pass every clean caption, or noise rates mean nothing
        raise ValueError(f"{len(bad)} clean captions fail the judge, e.g. {bad[0]!r}")
    if len({c.name for c in concepts}) < 3:  # a held-out name and two train names for wrong captions
        raise ValueError("fewer than three distinct names in the sources")

    rng = np.random.default_rng(seed)
    images = sum(len(vs) for vs in variants.values())
    cap = min(max_eval or DEFAULT_MAX_EVAL, int(round(eval_share * images)))
    held = held_out_names(concepts, variants, cap, rng)
    items = [(concept, variant) for concept in concepts for variant in variants[concept.id]]
    eval_items = [item for item in items if item[0].name in held]
    eval_items = [eval_items[int(i)] for i in rng.permutation(len(eval_items))]
    train_items = [item for item in items if item[0].name not in held]
    if not eval_items or not train_items:
        raise ValueError(f"{len(eval_items)} eval and {len(train_items)} train images: the sources are too small "
                         f"for eval_share {eval_share} and max_eval {max_eval}")
    if max_train is not None and max_train < len(train_items):
        train_items = [train_items[int(i)] for i in np.sort(rng.choice(len(train_items), max_train, replace=False))]
    train_items = [train_items[int(i)] for i in rng.permutation(len(train_items))]  # a crawl is not sorted
    train_concepts = [c for c in concepts if c.name not in held]  # wrong captions never name a held-out concept
    kinds, captions = plant_noise(train_items, train_concepts, noise, np.random.default_rng((seed, 1)), TEMPLATES)

    def truth_of(item: tuple[Concept, Variant], kind: str) -> dict:
        concept, variant = item
        return {"scene": concept.id, "name": concept.name, "domain": variant.domain, "variant": variant.label,
                "source": variant.source, "noise": kind, "description": concept.caption}

    writer = SplitWriter(image_of=lambda item: item[1].image, truth_of=truth_of, group_of=lambda item: item[0].name,
                         host="real-mixed.invalid", image_size=image_size, shard_size=shard_size)
    train_shards = -(-len(train_items) // shard_size)
    with tqdm(total=len(train_items) + len(eval_items), desc="make-real-crawl mixed", unit="img", file=sys.stderr,
              disable=None) as progress:
        train_urls = write_split(out_url, "train", train_items, kinds, captions, writer, 0, progress)
        eval_urls = write_split(out_url, "eval", eval_items, ["none"] * len(eval_items),
                                [c.caption for c, _ in eval_items], writer, train_shards, progress)

    def per_domain(split_items: list) -> dict:
        return {domain: {"samples": sum(v.domain == domain for _, v in split_items),
                         "names": len({c.name for c, v in split_items if v.domain == domain})} for domain in DOMAINS}

    def near_duplicates(split_items: list) -> dict:
        sizes = Counter(c.name for c, _ in split_items)
        return {"names_with_variants": sum(n > 1 for n in sizes.values()),
                "samples_in_them": sum(n for n in sizes.values() if n > 1)}

    stats = {
        "kind": KIND,
        "params": {"seed": seed, "noise": noise, "image_size": image_size, "shard_size": shard_size,
                   "max_train": max_train, "max_eval": max_eval, "eval_share": eval_share,
                   "packages": {name: {"file": os.path.basename(paths[name]), "url": url, "integrity": integrity,
                                       "licence": LICENCES.get(name, "")}
                                for name, (url, integrity) in sources.items()}},
        "concepts": len(concepts), "names": len({c.name for c in concepts}), "images": images,
        "train": {"samples": len(train_items), "shards": len(train_urls),
                  "noise": {kind: kinds.count(kind) for kind in NOISE_KINDS},
                  "templated_subcategories": len({c.subcategory for (c, _), k in zip(train_items, kinds)
                                                  if k == "template"}),
                  "mislabelled_concepts": len({c.id for (c, _), k in zip(train_items, kinds) if k == "mislabel"}),
                  "distinct_concepts": len({c.id for c, _ in train_items}), "domains": per_domain(train_items),
                  "near_duplicates": near_duplicates(train_items)},
        "eval": {"samples": len(eval_items), "shards": len(eval_urls),
                 "distinct_concepts": len({c.id for c, _ in eval_items}), "groups": len(held),
                 "domains": per_domain(eval_items), "near_duplicates": near_duplicates(eval_items)},
        "train_input": f"train/{{00000..{len(train_urls) - 1:05d}}}.tar",
        "eval_input": f"eval/{{00000..{len(eval_urls) - 1:05d}}}.tar",
        "templates": list(TEMPLATES),
    }
    write_crawl_records(out_url, eval_task(), stats)
    return stats
