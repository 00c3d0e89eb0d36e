"""Build a small real image-text crawl from the emoji-datasource npm package.

Each emoji drawing (Twitter's Twemoji, Google's Noto or Apple's set) comes with its official Unicode
name, category and subcategory in `emoji.json`; this script turns them into ~3,800 real pairs
(every base emoji plus its skin-tone variants), e.g.

    "grinning face with big eyes, a face smiling emoji from the smileys & emotion set"
    "waving hand sign with medium-dark skin tone, a hand fingers open emoji from the people & body set"

Captions are kept as the metadata gives them (no synthetic noise). Every RGBA 64x64 PNG is composited
on a white 64x64 background; emojis without an image in the chosen set are skipped. A held-out share of
the base emojis (all their skin tones with them, so the splits are disjoint) becomes a clean eval crawl
for `tldr-vlp compress --eval --eval-input OUT/crawl_eval`.

Usage (needs only the npm registry; unpack outside the repository):

    mkdir -p /tmp/emoji && cd /tmp/emoji && npm pack emoji-datasource-twitter && tar xzf emoji-datasource-twitter-*.tgz
    .venv/bin/python scripts/real_crawl.py /tmp/emoji/package /tmp/emoji_crawl [--set twitter] [--eval-share 0.1]
    nice -n 15 .venv/bin/tldr-vlp compress --input /tmp/emoji_crawl/crawl --out /tmp/realrun --ratio 0.25 \
        --set captioner.image_size=64 --clusters 40 [--eval --eval-input /tmp/emoji_crawl/crawl_eval]

Writes OUT/{train,eval}/images/*.png and OUT/{train,eval}/captions.jsonl ({"path", "caption"} per line),
then runs `tldr-vlp import` on each into OUT/crawl/ and OUT/crawl_eval/ (WebDataset shards).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

from PIL import Image

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


def caption_for(emoji: dict, skin_key: str = "") -> str:
    """A natural description from the real metadata: name, skin tone, subcategory and category."""
    name = (emoji.get("name") or emoji["short_name"].replace("_", " ")).lower()
    subcategory = (emoji.get("subcategory") or "").replace("-", " ")
    category = (emoji.get("category") or "").lower()
    text = name + skin_phrase(skin_key)
    if subcategory and category:
        article = "an" if subcategory[0] in "aeiou" else "a"
        text += f", {article} {subcategory} emoji from the {category} set"
    elif category:
        text += f", an emoji from the {category} set"
    return text


def variants(emoji: dict, image_set: str):
    """(image file, caption) for the emoji and each skin-tone variant that has an image in the set."""
    flag = f"has_img_{image_set}"
    if emoji.get(flag):
        yield emoji["image"], caption_for(emoji)
    for key, variant in sorted((emoji.get("skin_variations") or {}).items()):
        if variant.get(flag):
            yield variant["image"], caption_for(emoji, key)


def is_eval(emoji: dict, share: float) -> bool:
    """Deterministic split by base emoji, so a drawing and its skin tones stay on one side."""
    digest = hashlib.sha1(emoji["unified"].encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def write_split(rows: list[tuple[str, str]], image_dir: str, split_dir: str, size: int) -> int:
    """Composite each image on white into split_dir/images and write split_dir/captions.jsonl."""
    os.makedirs(os.path.join(split_dir, "images"), exist_ok=True)
    written = 0
    with open(os.path.join(split_dir, "captions.jsonl"), "w", encoding="utf-8") as out:
        for filename, caption in rows:
            source = os.path.join(image_dir, filename)
            if not os.path.isfile(source):
                continue
            with Image.open(source) as img:
                rgba = img.convert("RGBA").resize((size, size), Image.LANCZOS)
            canvas = Image.new("RGB", (size, size), (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            canvas.save(os.path.join(split_dir, "images", filename))
            out.write(json.dumps({"path": f"images/{filename}", "caption": caption}) + "\n")
            written += 1
    return written


def run_import(split_dir: str, crawl_dir: str, tldr_vlp: str) -> None:
    """Turn the split's images + captions.jsonl into WebDataset shards with the project's importer."""
    cmd = [
        tldr_vlp,
        "import",
        "--images",
        split_dir,
        "--captions",
        os.path.join(split_dir, "captions.jsonl"),
        "--out",
        crawl_dir,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", help="unpacked emoji-datasource-<set> npm package folder")
    parser.add_argument("out", help="output folder (train/, eval/, crawl/, crawl_eval/)")
    parser.add_argument("--set", dest="image_set", default="twitter", help="image set: twitter, google, apple")
    parser.add_argument("--eval-share", type=float, default=0.1, help="share of base emojis held out for eval")
    parser.add_argument("--size", type=int, default=64, help="output image side in pixels")
    parser.add_argument(
        "--tldr-vlp",
        default=os.path.join(os.path.dirname(sys.executable), "tldr-vlp"),
        help="the tldr-vlp executable (default: next to this Python)",
    )
    parser.add_argument("--no-import", action="store_true", help="only write the images and captions")
    args = parser.parse_args(argv)

    with open(os.path.join(args.package, "emoji.json"), encoding="utf-8") as f:
        emojis = json.load(f)
    image_dir = os.path.join(args.package, "img", args.image_set, "64")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    for emoji in sorted(emojis, key=lambda e: e.get("sort_order", 0)):
        split = "eval" if is_eval(emoji, args.eval_share) else "train"
        splits[split].extend(variants(emoji, args.image_set))

    for split, rows in splits.items():
        count = write_split(rows, image_dir, os.path.join(args.out, split), args.size)
        print(f"{split}: {count} images ({len(rows) - count} listed without a file skipped)", flush=True)
    if not args.no_import:
        run_import(os.path.join(args.out, "train"), os.path.join(args.out, "crawl"), args.tldr_vlp)
        run_import(os.path.join(args.out, "eval"), os.path.join(args.out, "crawl_eval"), args.tldr_vlp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
