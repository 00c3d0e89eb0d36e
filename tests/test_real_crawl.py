"""The real emoji crawl, built from small fake emoji-datasource tarballs made here (nothing is
downloaded): layout, held-out vendor, planted noise and its correlation, the judge, determinism,
the cache and the integrity check."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tldr_tasks import cli
from tldr_tasks.data import real_crawl
from tldr_tasks.data.real_crawl import (
    EVAL_VENDOR,
    TEMPLATES,
    VENDORS,
    IntegrityError,
    caption_for,
    describes_concept,
    make_real_crawl,
    skin_phrase,
)
from tldr_tasks.data.shards import Rejected, iter_shard

TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")
# (name, category, subcategory): 13 emojis over 3 subcategories, with names that contain other names
# ("cat" in "cat face"), a subcategory that is a name ("family"), two emojis of one name (as in the
# real data) and skin tones on "waving hand sign".
EMOJIS = (
    ("CAT", "Animals & Nature", "animal-mammal"),
    ("CAT FACE", "Animals & Nature", "animal-mammal"),
    ("TIGER", "Animals & Nature", "animal-mammal"),  # Facebook lacks it: not a concept
    ("GRINNING FACE", "Smileys & Emotion", "face-smiling"),
    ("GRINNING FACE WITH BIG EYES", "Smileys & Emotion", "face-smiling"),
    ("SMILING FACE WITH HALO", "Smileys & Emotion", "face-smiling"),
    ("WINKING FACE", "Smileys & Emotion", "face-smiling"),
    ("FAMILY", "People & Body", "family"),
    ("KISS", "People & Body", "family"),
    ("WAVING HAND SIGN", "People & Body", "family"),
    ("COUPLE WITH HEART", "People & Body", "family"),
    ("MAN IN TUXEDO", "People & Body", "family"),
    ("MAN IN TUXEDO", "People & Body", "family"),
)
CONCEPTS = 17  # 12 drawn by all four vendors + 5 skin tones
TRAIN_VENDORS = tuple(v for v in VENDORS if v != EVAL_VENDOR)


def _emoji_json() -> list[dict]:
    emojis = []
    for i, (name, category, subcategory) in enumerate(EMOJIS):
        unified = f"1F{600 + i:03X}"
        emoji = {"name": name, "unified": unified, "short_name": name.lower().replace(" ", "_"),
                 "image": f"{unified.lower()}.png", "category": category, "subcategory": subcategory,
                 "sort_order": 100 - i, **{f"has_img_{v}": True for v in VENDORS}}
        if name == "TIGER":
            emoji["has_img_facebook"] = False
        if name == "WAVING HAND SIGN":
            emoji["skin_variations"] = {tone: {"unified": f"{unified}-{tone}", "image": f"{unified}-{tone}.png".lower(),
                                               **{f"has_img_{v}": True for v in VENDORS}} for tone in TONES}
        emojis.append(emoji)
    return emojis


def _png(vendor: str, index: int) -> bytes:
    """8x8 RGBA, a colour per vendor and drawing, the top-left quarter transparent."""
    image = Image.new("RGBA", (8, 8), (40 * VENDORS.index(vendor), 7 * index % 256, 200, 255))
    image.paste((0, 0, 0, 0), (0, 0, 4, 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_package(folder: Path, vendor: str) -> Path:
    emojis = _emoji_json()
    files = {"package/package.json": json.dumps({"name": f"emoji-datasource-{vendor}", "version": "0.0.1"}).encode(),
             "package/emoji.json": json.dumps(emojis).encode(),
             f"package/img/{vendor}/sheets/64.png": _png(vendor, 0)}  # not read: only img/<vendor>/64/
    images = [e["image"] for e in emojis if e[f"has_img_{vendor}"]]
    images += [v["image"] for e in emojis for v in (e.get("skin_variations") or {}).values()]
    for index, image in enumerate(images):
        files[f"package/img/{vendor}/64/{image}"] = _png(vendor, index)
    return _tgz(folder / f"emoji-datasource-{vendor}-0.0.1.tgz", files)


def _tgz(path: Path, files: dict[str, bytes]) -> Path:
    """A .tgz of `files` (member name -> bytes), as npm serves a package."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, str]]:
    folder = tmp_path_factory.mktemp("npm")
    paths = {vendor: _fake_package(folder, vendor) for vendor in VENDORS}
    return {vendor: (path.as_uri(), _integrity(path)) for vendor, path in paths.items()}


def _build(out: Path, sources, cache: Path, **kwargs) -> dict:
    params = {"seed": 3, "noise": 0.5, "image_size": 16, "shard_size": 20, **kwargs}
    return make_real_crawl(str(out), cache_dir=str(cache), sources=sources, **params)


def _read(folder: Path) -> list:
    items = [item for tar in sorted(folder.glob("*.tar")) for item in iter_shard(str(tar))]
    assert not any(isinstance(i, Rejected) for i in items)
    return items


@pytest.fixture(scope="module")
def crawl(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_crawl")
    stats = _build(root, sources, tmp_path_factory.mktemp("cache"))
    return {"root": root, "stats": stats, "train": _read(root / "train"), "eval": _read(root / "eval")}


def _subcategory_of() -> dict[str, str]:
    """Concept name -> subcategory, skin tones included."""
    return {real_crawl.concept_name(e, key): e["subcategory"]
            for e in _emoji_json() for key in ("", *(e.get("skin_variations") or {}))}


def test_layout_and_key_json(crawl):
    root, stats = crawl["root"], crawl["stats"]
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")]
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json",
                                                                  "task.json"]
    assert json.loads((root / "eval" / "task.json").read_text()) == {"hit": "group"}
    assert json.loads((root / "crawl.json").read_text()) == stats
    assert stats["kind"] == "real_emoji" and stats["concepts"] == CONCEPTS
    assert stats["train_input"] == "train/{00000..00002}.tar" and stats["eval_input"] == "eval/{00000..00000}.tar"
    assert stats["params"]["packages"]["apple"]["version"] == "0.0.1"
    train, evals = crawl["train"], crawl["eval"]
    assert len(train) == stats["train"]["samples"] == CONCEPTS * 3
    assert len(evals) == stats["eval"]["samples"] == CONCEPTS  # the default cap is above the concepts
    assert evals[0].key == "000030000"  # eval keys go on after the train shards' numbers, as in synthetic
    assert len({s.key for s in train + evals}) == len(train) + len(evals)
    base = {"url", "key", "caption", "status", "error_message", "width", "height", "original_width",
            "original_height", "exif", "sha256", "truth"}
    for split, sample in [("train", s) for s in train] + [("eval", s) for s in evals]:
        assert set(sample.meta) == (base | {"group"} if split == "eval" else base)
        assert set(sample.meta["truth"]) == {"scene", "name", "vendor", "noise", "description"}
        assert sample.caption == sample.meta["caption"]
        assert (sample.image.mode, sample.image.size) == ("RGB", (16, 16))
        assert (sample.meta["original_width"], sample.meta["original_height"]) == (8, 8)
        assert sample.image.getpixel((0, 0)) == (255, 255, 255)  # composited on white
        assert sample.meta["sha256"] == hashlib.sha256(sample.image_bytes).hexdigest()
    assert [r["key"] for r in pq.read_table(root / "train" / "00001.parquet").to_pylist()] == \
        [s.key for s in train[20:40]]


def test_held_out_vendor_and_shared_concepts(crawl):
    train, evals = crawl["train"], crawl["eval"]
    assert {s.meta["truth"]["vendor"] for s in train} == set(TRAIN_VENDORS)
    assert {s.meta["truth"]["vendor"] for s in evals} == {EVAL_VENDOR}
    assert not {s.meta["sha256"] for s in train} & {s.meta["sha256"] for s in evals}  # drawings are not shared
    per_concept = defaultdict(set)
    for sample in train:
        per_concept[sample.meta["truth"]["scene"]].add(sample.meta["truth"]["vendor"])
    assert set(per_concept) == {s.meta["truth"]["scene"] for s in evals} == set(range(CONCEPTS))
    assert all(vendors == set(TRAIN_VENDORS) for vendors in per_concept.values())
    names = {s.meta["truth"]["name"] for s in train}
    assert "tiger" not in names and "waving hand sign with medium-dark skin tone" in names
    for sample in evals:  # clean captions; the group is the name, so the two "man in tuxedo" share one
        assert sample.meta["truth"]["noise"] == "none"
        assert sample.caption == sample.meta["truth"]["description"]
        assert sample.meta["group"] == sample.meta["truth"]["name"]
    assert crawl["stats"]["eval"]["groups"] == CONCEPTS - 1


def test_exact_noise_counts(crawl):
    train, stats = crawl["train"], crawl["stats"]
    counts = {kind: sum(s.meta["truth"]["noise"] == kind for s in train) for kind in real_crawl.NOISE_KINDS}
    assert counts == stats["train"]["noise"]
    assert sum(counts.values()) - counts["none"] == round(0.5 * len(train)) == 26
    # A quarter each in whole groups: "animal-mammal" is the one subcategory that fits 6; two whole concepts.
    assert counts == {"none": 25, "swap": 14, "template": 6, "mislabel": 6}
    for sample in train:
        truth = sample.meta["truth"]
        assert (sample.caption == truth["description"]) == (truth["noise"] == "none")


def test_correlated_noise_is_correlated(crawl):
    train = crawl["train"]
    subcategory = _subcategory_of()
    by_concept, by_subcategory = defaultdict(list), defaultdict(list)
    for sample in train:
        by_concept[sample.meta["truth"]["scene"]].append(sample)
        by_subcategory[subcategory[sample.meta["truth"]["name"]]].append(sample)
    templated = [s for s in by_subcategory.values() if any(x.meta["truth"]["noise"] == "template" for x in s)]
    assert len(templated) == 1
    for samples in templated:  # every image of the subcategory, all vendors, one shop-style caption
        assert {x.meta["truth"]["noise"] for x in samples} == {"template"}
        assert len({x.caption for x in samples}) == 1 and len(samples) == 6
        assert any(samples[0].caption == t.format(n=n) for t in TEMPLATES for n in range(2, 100))
    mislabelled = [s for s in by_concept.values() if any(x.meta["truth"]["noise"] == "mislabel" for x in s)]
    assert len(mislabelled) == 2
    clean_captions = {s.meta["truth"]["description"]: s.meta["truth"]["name"] for s in train}
    for samples in mislabelled:  # every drawing of the concept carries the same wrong caption
        assert {x.meta["truth"]["noise"] for x in samples} == {"mislabel"}
        assert {x.meta["truth"]["vendor"] for x in samples} == set(TRAIN_VENDORS)
        assert len({x.caption for x in samples}) == 1
        wrong = samples[0].caption
        assert wrong in clean_captions and clean_captions[wrong] != samples[0].meta["truth"]["name"]
        assert wrong.split(", ", 1)[1] == samples[0].meta["truth"]["description"].split(", ", 1)[1]  # near miss
    for sample in train:
        if sample.meta["truth"]["noise"] == "swap":
            assert sample.caption in clean_captions and clean_captions[sample.caption] != sample.meta["truth"]["name"]


def test_judge_passes_clean_and_fails_every_noise_kind(crawl):
    for sample in crawl["train"] + crawl["eval"]:
        truth = sample.meta["truth"]
        assert describes_concept(sample.caption, truth) == (truth["noise"] == "none"), (sample.caption, truth)
        assert describes_concept(truth["description"], truth)


def test_judge_compares_whole_names():
    grinning = {"name": "grinning face"}
    assert describes_concept("grinning face, a face smiling emoji from the smileys & emotion set", grinning)
    assert describes_concept("  Grinning  FACE ", grinning)
    assert describes_concept("a grinning face", grinning)
    assert describes_concept("cat face, an animal mammal emoji; grinning face, a face smiling emoji", grinning)
    assert not describes_concept("grinning face with big eyes, a face smiling emoji", grinning)
    assert not describes_concept("smiling cat face with open mouth, a cat face emoji", {"name": "cat face"})
    assert not describes_concept("kiss, a family emoji from the people & body set", {"name": "family"})
    assert not describes_concept("", grinning) and not describes_concept("free emoji icon png download", grinning)
    medium = {"name": "waving hand sign with medium skin tone"}
    assert describes_concept(caption_for({"name": "WAVING HAND SIGN", "category": "People & Body",
                                          "subcategory": "hand-fingers-open"}, "1F3FD"), medium)
    assert not describes_concept("waving hand sign, a hand fingers open emoji", medium)
    assert not describes_concept("waving hand sign with medium skin tone", {"name": "waving hand sign"})


def test_skin_phrase_and_caption():
    assert skin_phrase("") == "" and skin_phrase("1F3FD") == " with medium skin tone"
    assert skin_phrase("1F3FB-1F3FB") == " with light skin tone"
    assert skin_phrase("1F3FB-1F3FF") == " with light and dark skin tones"
    emoji = {"name": "GRINNING FACE WITH BIG EYES", "category": "Smileys & Emotion", "subcategory": "face-smiling"}
    assert caption_for(emoji) == "grinning face with big eyes, a face smiling emoji from the smileys & emotion set"


def test_deterministic_and_cached(sources, tmp_path):
    cache = tmp_path / "cache"
    first = _build(tmp_path / "a", sources, cache, max_train=30, max_eval=9)
    _build(tmp_path / "b", sources, cache, max_train=30, max_eval=9)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (first["train"]["samples"], first["eval"]["samples"]) == (30, 9)
    assert sum(first["train"]["noise"].values()) - first["train"]["noise"]["none"] == 15
    # The cache is keyed by file name: the same names at URLs that do not exist are never fetched.
    gone = {vendor: ((tmp_path / "gone" / Path(url).name).as_uri(), integrity)
            for vendor, (url, integrity) in sources.items()}
    _build(tmp_path / "c", gone, cache, max_train=30, max_eval=9)
    shard = Path("train", "00000.tar")
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "c" / shard).read_bytes()
    other = _build(tmp_path / "d", sources, cache, seed=4, max_train=30, max_eval=9)
    assert other["train"]["noise"]["none"] == first["train"]["noise"]["none"]  # as much noise, elsewhere
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "d" / shard).read_bytes()


def test_integrity_mismatch_is_refused(sources, tmp_path):
    url, integrity = sources["google"]
    wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"not the package").digest()).decode()
    with pytest.raises(IntegrityError, match="not the pinned"):
        _build(tmp_path / "out", {**sources, "google": (url, wrong)}, tmp_path / "cache")
    assert not (tmp_path / "cache" / Path(url).name).exists()  # a refused download never enters the cache
    assert not list((tmp_path / "cache").glob("*.part"))
    _build(tmp_path / "ok", sources, tmp_path / "cache")
    cached = tmp_path / "cache" / Path(url).name
    data = cached.read_bytes()
    cached.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # a cached tarball changed later
    with pytest.raises(IntegrityError, match="cached"):
        _build(tmp_path / "again", sources, tmp_path / "cache")


def test_parameters_are_checked(sources, tmp_path):
    with pytest.raises(ValueError, match="noise"):
        _build(tmp_path / "out", sources, tmp_path / "cache", noise=1.5)
    with pytest.raises(ValueError, match="facebook"):
        _build(tmp_path / "out", {v: s for v, s in sources.items() if v != EVAL_VENDOR}, tmp_path / "cache")


def test_cli(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(real_crawl, "SOURCES", sources)
    out = tmp_path / "crawl"
    assert cli.make_real_crawl_main(["--out", str(out), "--seed", "1", "--noise", "0.2", "--image-size", "8",
                            "--max-train", "12", "--max-eval", "4", "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_input"] == f"{out}/train/{{00000..00000}}.tar"
    assert (summary["train_samples"], summary["eval_samples"]) == (12, 4)
    assert sum(summary["noise"].values()) - summary["noise"]["none"] == 2
