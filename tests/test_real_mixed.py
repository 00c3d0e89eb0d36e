"""The mixed real crawl (3D emoji + furniture), built from small fake archives made here (nothing is
downloaded): a fluent-emoji-3d .tgz, an emoji-datasource .tgz and a sweethome3d-furniture .deb whose
data.tar.xz holds two .sh3f catalogues. Near-duplicate variants share a group, held-out names never
reach train, noise counts add up, the judge agrees with the planted kinds, determinism, integrity."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image
from test_real_crawl import _read, _tgz  # a sibling test module: pytest puts tests/ on the path

from tldr_tasks import cli
from tldr_tasks.config import ConfigError
from tldr_tasks.data import real_mixed
from tldr_tasks.data.real_crawl import NOISE_KINDS, IntegrityError, describes_concept
from tldr_tasks.data.real_mixed import TEMPLATES, make_mixed_crawl

TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")
# (name, category, subcategory, skin tones?, rendered by fluent-emoji-3d?)
EMOJIS = (
    ("WAVING HAND SIGN", "People & Body", "hand-fingers-open", True, True),
    ("THUMBS UP SIGN", "People & Body", "hand-fingers-closed", True, True),
    ("GRINNING FACE", "Smileys & Emotion", "face-smiling", False, True),
    ("WINKING FACE", "Smileys & Emotion", "face-smiling", False, True),
    ("CAT FACE", "Animals & Nature", "animal-mammal", False, True),
    ("CAT", "Animals & Nature", "animal-mammal", False, True),
    ("DOG FACE", "Animals & Nature", "animal-mammal", False, True),
    ("TIGER", "Animals & Nature", "animal-mammal", False, False),  # not rendered: not a concept
    ("CHAIR", "Objects", "household", False, True),  # also a furniture name: one group over two domains
)
EMOJI_IMAGES = 6 + 6 + 6  # two toned emojis and six plain ones (CHAIR among them; TIGER is not rendered)
# (catalogue, name, category, tags): "chair" 4 times over two catalogues, a \u20ac name, a provenance tag
PIECES = {
    "Alpha": (("Chair", "Kitchen", "Seat, Blend Swap"), ("Chair", "Living room", "Seat, Dining"),
              ("Table", "Kitchen", "Dining"), ("Table", "Kitchen", ""), ("Bed", "Bedroom", "Double"),
              ("Desk lamp", "Lights", "Office"), ("Bill 10\\u20ac", "Miscellaneous", "Money")),
    "Beta": (("Chair", "Kitchen", "Seat, Wood"), ("Chair", "Office", "Seat"), ("Armchair", "Living room", "Seat"),
             ("Washbasin", "Bathroom", ""), ("Bathtub", "Bathroom", "Bath")),
}
FURNITURE_IMAGES = 12
FURNITURE_NAMES = 8  # chair, table, bed, desk lamp, bill 10€, armchair, washbasin, bathtub
IMAGES = EMOJI_IMAGES + FURNITURE_IMAGES


def _image(index: int, fmt: str) -> bytes:
    """8x8 RGBA, a colour per image, the top-left quarter transparent."""
    image = Image.new("RGBA", (8, 8), (17 * index % 256, 255 - 11 * index % 256, 90, 255))
    image.paste((0, 0, 0, 0), (0, 0, 4, 4))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def _emoji_packages(folder: Path) -> tuple[Path, Path]:
    emojis, assets = [], {}
    for i, (name, category, subcategory, toned, rendered) in enumerate(EMOJIS):
        unified = f"1F{700 + i:03X}"
        emoji = {"name": name, "unified": unified, "non_qualified": None, "short_name": name.lower(),
                 "category": category, "subcategory": subcategory, "sort_order": i}
        if toned:
            emoji["skin_variations"] = {tone: {"unified": f"{unified}-{tone}"} for tone in TONES}
        emojis.append(emoji)
        if rendered:
            for code in [unified] + [f"{unified}-{tone}" for tone in TONES if toned]:
                assets[f"package/assets/{code.lower()}.webp"] = _image(len(assets), "WEBP")
    assets["package/assets/00a9-fe0f.webp"] = _image(99, "WEBP")  # no emoji.json entry: not read
    fluent = _tgz(folder / "fluent-emoji-3d-0.0.1.tgz",
                  {"package/package.json": json.dumps({"name": "@lobehub/fluent-emoji-3d"}).encode(), **assets})
    names = _tgz(folder / "emoji-datasource-0.0.1.tgz", {"package/emoji.json": json.dumps(emojis).encode()})
    return fluent, names


def _catalogue(name: str, pieces: tuple, first: int) -> bytes:
    lines = ["# a catalogue", f"id={name}", f"name={name} catalog"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, (title, category, tags) in enumerate(pieces, start=1):
            icon = f"{name.lower()}/piece{i}.png"
            lines += [f"id#{i}={name}#piece{i}", f"name#{i}={title}", f"tags#{i}={tags}", f"category#{i}={category}",
                      f"icon#{i}=/{icon}", f"creator#{i}={name} maker"]
            z.writestr(icon, _image(first + i, "PNG"))
        lines += ["id#99=missing icon", "name#99=Ghost", "category#99=Kitchen", "icon#99=/nowhere.png"]
        z.writestr("PluginFurnitureCatalog.properties", "\n".join(lines).encode("latin-1"))
    return buffer.getvalue()


def _deb(folder: Path) -> Path:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        first = 40
        for catalogue, pieces in PIECES.items():
            blob = _catalogue(catalogue, pieces, first)
            first += len(pieces)
            info = tarfile.TarInfo(f"./usr/share/sweethome3d/furniture/{catalogue}.sh3f")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    members = {"debian-binary": b"2.0\n", "control.tar.xz": b"not read", "data.tar.xz": data.getvalue()}
    out = bytearray(b"!<arch>\n")
    for name, blob in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path = folder / "sweethome3d-furniture_0.0.1_all.deb"
    path.write_bytes(bytes(out))
    return path


def _sri(path: Path, algorithm: str = "sha512") -> str:
    return f"{algorithm}-" + base64.b64encode(hashlib.new(algorithm, path.read_bytes()).digest()).decode()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, str]]:
    folder = tmp_path_factory.mktemp("archives")
    fluent, names = _emoji_packages(folder)
    deb = _deb(folder)
    return {"fluent_emoji_3d": (fluent.as_uri(), _sri(fluent)), "emoji_datasource": (names.as_uri(), _sri(names)),
            "sweethome3d_furniture": (deb.as_uri(), _sri(deb, "sha256"))}


def _build(out: Path, sources, cache: Path, **kwargs) -> dict:
    params = {"seed": 5, "noise": 0.4, "image_size": 16, "shard_size": 10, "eval_share": 0.3, **kwargs}
    return make_mixed_crawl(str(out), cache_dir=str(cache), sources=sources, **params)


@pytest.fixture(scope="module")
def crawl(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_mixed")
    stats = _build(root, sources, tmp_path_factory.mktemp("cache"))
    return {"root": root, "stats": stats, "train": _read(root / "train"), "eval": _read(root / "eval")}


def test_layout_counts_and_truth(crawl):
    root, stats, train, evals = crawl["root"], crawl["stats"], crawl["train"], crawl["eval"]
    assert json.loads((root / "eval" / "task.json").read_text()) == {"hit": "group"}
    assert json.loads((root / "crawl.json").read_text()) == stats
    assert stats["kind"] == "real_mixed" and stats["images"] == IMAGES == len(train) + len(evals)
    assert stats["names"] == 8 + FURNITURE_NAMES - 1  # "chair" is an emoji and a furniture name
    assert (stats["train"]["samples"], stats["eval"]["samples"]) == (len(train), len(evals))
    assert len(evals) <= round(0.3 * IMAGES)
    for split in ("train", "eval"):
        items = crawl[split]
        assert sum(d["samples"] for d in stats[split]["domains"].values()) == len(items)
    assert evals[0].key.startswith(f"{stats['train']['shards']:05d}")  # eval keys go on after train's shards
    assert len({s.key for s in train + evals}) == len(train) + len(evals)
    for sample in train + evals:
        truth = sample.meta["truth"]
        assert set(truth) == {"scene", "name", "domain", "variant", "source", "noise", "description"}
        assert (sample.image.mode, sample.image.size) == ("RGB", (16, 16))
        assert sample.image.getpixel((0, 0)) == (255, 255, 255)  # composited on white
        assert sample.meta["sha256"] == hashlib.sha256(sample.image_bytes).hexdigest()
    names = {s.meta["truth"]["name"] for s in train + evals}
    assert "tiger" not in names and "bill 10\u20ac" in names and "ghost" not in names


def test_captions_come_from_the_metadata(crawl):
    descriptions = {(s.meta["truth"]["domain"], s.meta["truth"]["name"]): s.meta["truth"]["description"]
                    for s in crawl["train"] + crawl["eval"]}
    # the room most of its models have; the tags all of them share, without the provenance tag
    assert descriptions[("furniture", "chair")] == "chair, a 3d model from the kitchen furniture catalog: seat"
    assert descriptions[("furniture", "washbasin")] == "washbasin, a 3d model from the bathroom furniture catalog"
    assert descriptions[("emoji", "waving hand sign")] == \
        "waving hand sign, a 3d rendered hand fingers open emoji from the people & body set"
    for (_, name), description in descriptions.items():
        assert describes_concept(description, {"name": name})
    sources = {s.meta["truth"]["source"] for s in crawl["train"] + crawl["eval"] if s.meta["truth"]["domain"] ==
               "furniture"}
    assert sources == {"sweethome3d-furniture_0.0.1_all.deb:Alpha by Alpha maker",
                       "sweethome3d-furniture_0.0.1_all.deb:Beta by Beta maker"}


def test_near_duplicate_variants_share_a_group(crawl):
    by_name = defaultdict(list)
    for split in ("train", "eval"):
        for sample in crawl[split]:
            by_name[sample.meta["truth"]["name"]].append((split, sample))
    assert len(by_name["waving hand sign"]) == 6 and len(by_name["chair"]) == 5  # 4 models + the emoji
    assert {s.meta["truth"]["variant"] for _, s in by_name["thumbs up sign"]} == \
        {"default"} | {f"with {tone} skin tone" for tone in ("light", "medium-light", "medium", "medium-dark", "dark")}
    for name, samples in by_name.items():
        assert len({split for split, _ in samples}) == 1, name  # every variant of a name on one side
        assert len({s.meta["sha256"] for _, s in samples}) == len(samples)  # different images
        for split, sample in samples:
            if split == "eval":
                assert sample.meta["group"] == name
    eval_names = {s.meta["group"] for s in crawl["eval"]}
    assert crawl["stats"]["eval"]["groups"] == len(eval_names)
    assert crawl["stats"]["train"]["near_duplicates"]["samples_in_them"] == \
        sum(len(v) for v in by_name.values() if len(v) > 1 and v[0][0] == "train")


def test_held_out_names_never_reach_train(crawl):
    eval_names = {s.meta["truth"]["name"] for s in crawl["eval"]}
    assert eval_names and not eval_names & {s.meta["truth"]["name"] for s in crawl["train"]}
    for sample in crawl["train"]:  # not even as a swapped or mislabelled caption
        assert not any(describes_concept(sample.caption, {"name": name}) for name in eval_names), sample.caption
    for sample in crawl["eval"]:
        assert sample.meta["truth"]["noise"] == "none" and sample.caption == sample.meta["truth"]["description"]


def test_noise_counts_add_up_and_the_judge_agrees(crawl):
    train, stats = crawl["train"], crawl["stats"]
    counts = {kind: sum(s.meta["truth"]["noise"] == kind for s in train) for kind in NOISE_KINDS}
    assert counts == stats["train"]["noise"]
    assert sum(counts.values()) - counts["none"] == round(0.4 * len(train))
    assert counts["template"] > 0 and counts["mislabel"] > 0 and counts["swap"] > 0
    for sample in train + crawl["eval"]:
        truth = sample.meta["truth"]
        assert (sample.caption == truth["description"]) == (truth["noise"] == "none")
        assert describes_concept(sample.caption, truth) == (truth["noise"] == "none"), (sample.caption, truth)
        if truth["noise"] == "template":
            assert any(sample.caption == t.format(n=n) for t in TEMPLATES for n in range(2, 100))
    mislabelled = defaultdict(set)
    for sample in train:
        if sample.meta["truth"]["noise"] == "mislabel":
            mislabelled[sample.meta["truth"]["scene"]].add(sample.caption)
    assert all(len(captions) == 1 for captions in mislabelled.values())  # one wrong caption per concept


def test_same_seed_same_bytes(sources, tmp_path):
    cache = tmp_path / "cache"
    first = _build(tmp_path / "a", sources, cache, max_train=20)
    _build(tmp_path / "b", sources, cache, max_train=20)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["train"]["samples"] == 20
    other = _build(tmp_path / "c", sources, cache, seed=6, max_train=20)
    shard = Path("train", "00000.tar")
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()
    assert other["train"]["samples"] == 20


def test_integrity_mismatch_is_refused(sources, tmp_path):
    url, _ = sources["sweethome3d_furniture"]
    wrong = "sha256-" + base64.b64encode(hashlib.sha256(b"not the package").digest()).decode()
    with pytest.raises(IntegrityError, match="sha256 .* not the pinned"):
        _build(tmp_path / "out", {**sources, "sweethome3d_furniture": (url, wrong)}, tmp_path / "cache")
    assert not (tmp_path / "cache" / Path(url).name).exists()  # a refused download never enters the cache
    with pytest.raises(IntegrityError, match="neither"):
        _build(tmp_path / "out", {**sources, "sweethome3d_furniture": (url, "md5-abc")}, tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_parameters_are_checked_before_any_work(sources, tmp_path):
    for kwargs, match in (({"eval_share": 1.0}, "eval_share"), ({"noise": -0.1}, "noise"),
                          ({"max_eval": 0}, "max_eval")):
        with pytest.raises(ConfigError, match=match):
            _build(tmp_path / "out", sources, tmp_path / "cache", **kwargs)
    with pytest.raises(ConfigError, match="sweethome3d_furniture"):
        _build(tmp_path / "out", {k: v for k, v in sources.items() if k != "sweethome3d_furniture"},
               tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_cli_source_mixed(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(real_mixed, "SOURCES", sources)
    out = tmp_path / "crawl"
    assert cli.make_real_crawl_main(["--source", "mixed", "--out", str(out), "--seed", "1", "--noise", "0.25",
                            "--image-size", "8", "--eval-share", "0.25", "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "crawl.json").read_text())["kind"] == "real_mixed"
    assert summary["train_samples"] + summary["eval_samples"] == IMAGES
    assert sum(summary["noise"].values()) - summary["noise"]["none"] == round(0.25 * summary["train_samples"])
    with pytest.raises(SystemExit) as exit_info:  # the emoji crawl holds out a vendor, not a share
        cli.make_real_crawl_main(["--out", str(tmp_path / "x"), "--eval-share", "0.3"])
    assert exit_info.value.code == 2 and "--source mixed" in capsys.readouterr().err


def test_the_benchmark_builds_it(sources, tmp_path, monkeypatch):
    from tldr_tasks.benchmark import ALL_CRAWLS, CRAWLS, make_benchmark_crawl
    from tldr_tasks.config import from_dict

    assert "real_mixed" in ALL_CRAWLS and "real_mixed" not in CRAWLS  # ~3,350 train pairs: not the 6,000 profile
    monkeypatch.setattr(real_mixed, "SOURCES", sources)
    monkeypatch.setattr(real_mixed, "DEFAULT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = from_dict({"crawl": {"samples": 20, "eval_samples": 6, "image_size": 16}})
    main, reference, held_out = make_benchmark_crawl(tmp_path / "bench", "real_mixed", cfg, seed=0)
    stats = json.loads((tmp_path / "bench" / "crawl" / "crawl.json").read_text())
    assert stats["kind"] == "real_mixed" and stats["params"]["max_train"] == 20
    assert 0 < stats["eval"]["samples"] <= 6
    main_items, reference_items = _read(Path(main)), _read(Path(reference))
    assert len(main_items) + len(reference_items) == 20
    assert len(_read(Path(held_out))) == stats["eval"]["samples"]
