"""The pipeline's fast paths against the obvious slow ones, measured side by side in one run.

    .venv/bin/python benchmarks/side_by_side.py          (part of make bench)

- k-means: the kmeans stage's `train_kmeans` (faiss Lloyd; seeded by greedy k-means++ on 16 points
  per centroid, the default, and by faiss' AFK-MC2, the former default) against scikit-learn's KMeans
  (greedy k-means++, Lloyd), 100k x 128 float32 points in 1000 Gaussian blobs, k=1000, 20 iterations,
  all on all points; the mean squared distance to the nearest centroid compares their solutions.
  `--only-kmeans` measures this alone and keeps the file's other entries.
- captioning: beam search (3 beams, 30 new tokens, every caption forced to full length so both arms
  do the same work) in batches of 128 with the KV cache, against one image at a time without it.
- embed: the embed stage's `embed_shard` with its batch size against the same code with batch 1
  (a per-image loop), on one 1000-sample shard.
- captioner training: one epoch of the tiny captioner (plain AdamW) fed by the streaming loader
  against the same epoch from the whole crawl decoded into memory first (the old data path); each
  in a child process of its own, so its peak RSS is its own.

The captioner has random weights (a trained one would end some captions early and favour neither
arm). Writes `benchmarks/results/side_by_side.json` and `side_by_side.md`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from stage_scale import device_info, peak_rss_gib  # noqa: E402

from tldr_tasks.runner import thread_defaults  # noqa: E402


def kmeans(n: int = 100_000, dim: int = 128, k: int = 1000, niter: int = 20) -> dict:
    from sklearn.cluster import KMeans  # scikit-learn comes with mlflow

    from tldr_tasks.config import load_config
    from tldr_tasks.stages.kmeans import train_kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    x = centres[rng.integers(k, size=n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)

    def mse(centroids: np.ndarray) -> float:
        import faiss

        index = faiss.IndexFlatL2(dim)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        return float(index.search(x, 1)[0].mean())

    out = {"points": n, "dim": dim, "k": k, "niter": niter}
    for init in ("kmeans++", "afk_mc2"):  # greedy k-means++, and the stage's default
        cfg = load_config(None, [f"cluster.clusters={k}", f"cluster.niter={niter}",
                                 "cluster.max_points_per_centroid=1000", f"cluster.init={init}"])
        started = time.time()
        model = train_kmeans(cfg, x, k)
        name = "faiss" if init == "kmeans++" else "faiss_afk_mc2"
        out[f"{name}_s"], out[f"{name}_mse"] = round(time.time() - started, 2), round(mse(model.centroids), 4)
    started = time.time()
    sk = KMeans(n_clusters=k, n_init=1, max_iter=niter, init="k-means++", random_state=0, algorithm="lloyd").fit(x)
    out["sklearn_s"], out["sklearn_mse"] = round(time.time() - started, 2), round(mse(sk.cluster_centers_), 4)
    out["speedup"] = round(out["sklearn_s"] / out["faiss_s"], 1)
    out["mse_vs_sklearn"] = round(out["faiss_mse"] / out["sklearn_mse"], 3)
    return out


def tiny_captioner(crawl: Path, image_size: int = 64):
    """A random tiny-preset captioner and the crawl's own tokenizer."""
    import torch

    from tldr_tasks.config import load_config
    from tldr_tasks.data import stream
    from tldr_tasks.models.captioner import build_captioner
    from tldr_tasks.models.tokenizer import train_tokenizer
    from tldr_tasks.storage import expand_shards

    cfg = load_config(None, [f"captioner.image_size={image_size}", "captioner.codebook_init=random"])
    index, captions = stream.index_shards(expand_shards(str(crawl / "train")), keep_captions=10_000)
    tokenizer = train_tokenizer(captions, cfg.captioner.vocab_size)
    torch.manual_seed(0)
    return cfg, index, build_captioner(cfg.captioner, tokenizer).eval(), tokenizer


def captioning(crawl: Path, device, batched_images: int = 256, single_images: int = 24) -> dict:
    import torch

    from tldr_tasks.data import stream

    cfg, index, model, tokenizer = tiny_captioner(crawl)
    model.to(device)
    pixels = stream.head(index, batched_images, cfg.captioner.image_size, tokenizer, 30)["pixels"]
    pixels = pixels.float().div(127.5).sub(1.0).to(device)

    @torch.inference_mode()
    def generate(images: torch.Tensor, use_cache: bool) -> torch.Tensor:
        memory = model._memory(model.encode(images).quantized)
        start = torch.full((len(images), 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
        return model.decoder.generate(
            input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=memory, num_beams=3,
            do_sample=False, min_new_tokens=30, max_new_tokens=30, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=use_cache)

    def per_second(images: torch.Tensor, batch: int, use_cache: bool) -> float:
        generate(images[:1], use_cache)  # warm-up
        started = time.time()
        for i in range(0, len(images), batch):
            out = generate(images[i:i + batch], use_cache)
            assert out.shape[1] == 31
        return len(images) / (time.time() - started)

    batched = per_second(pixels, 128, use_cache=True)
    single_cached = per_second(pixels[:single_images], 1, use_cache=True)
    single_uncached = per_second(pixels[:single_images], 1, use_cache=False)
    return {"beams": 3, "new_tokens": 30, "batched_cached_per_s": round(batched, 1),
            "single_cached_per_s": round(single_cached, 2), "single_uncached_per_s": round(single_uncached, 2),
            "speedup_vs_single_uncached": round(batched / single_uncached, 1),
            "speedup_vs_single_cached": round(batched / single_cached, 1)}


def embed(crawl: Path, device) -> dict:
    from tldr_tasks.stages.embed import embed_shard
    from tldr_tasks.storage import expand_shards

    cfg, _, model, tokenizer = tiny_captioner(crawl)
    model.to(device)
    shard = expand_shards(str(crawl / "train"))[0]
    out = {"stage_batch": cfg.embed.batch_size}
    for name, batch in (("stage", cfg.embed.batch_size), ("per_image", 1)):
        cfg.embed.batch_size = batch
        started = time.time()
        part = embed_shard([(model, tokenizer)], cfg, shard, str(device), "bench")
        out[f"{name}_per_s"] = round(len(part.keys) / (time.time() - started), 1)
    out["speedup"] = round(out["stage_per_s"] / out["per_image_per_s"], 1)
    return out


def train_child(mode: str, crawl: Path) -> None:
    """One epoch of the tiny captioner in this process, fed by `mode` ("stream" or "memory")."""
    import torch

    from tldr_tasks.data import stream
    from tldr_tasks.preprocess import normalize_uint8

    started = time.time()
    cfg, index, model, tokenizer = tiny_captioner(crawl)
    c = cfg.captioner
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr)
    data = stream.TrainStream(index, batch_size=c.batch_size, streams=c.data_streams, seed=0, epoch=0,
                              image_size=c.image_size, tokenizer=tokenizer, max_tokens=c.max_tokens,
                              shuffle_buffer=c.shuffle_buffer)
    if mode == "memory":  # the old path: decode the whole crawl, then index batches
        everything = list(stream.batches(data, c.loader_workers, torch.device("cpu")))
        pixels = torch.cat([b["pixels"] for b in everything])
        width = max(b["input_ids"].shape[1] for b in everything)
        ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]),
                                                 value=tokenizer.pad_token_id) for b in everything])
        mask = torch.cat([torch.nn.functional.pad(b["attention_mask"], (0, width - b["attention_mask"].shape[1]))
                          for b in everything])
        del everything
        order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))
        batches = ({"pixels": pixels[i].to(device), "input_ids": ids[i].to(device),
                    "attention_mask": mask[i].to(device)} for i in order.split(c.batch_size))
    else:
        batches = stream.batches(data, c.loader_workers, device)
    setup_s = time.time() - started
    samples, train_started = 0, time.time()
    for batch in batches:
        loss = model(normalize_uint8(batch["pixels"]), batch["input_ids"], batch["attention_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += len(batch["pixels"])
    train_s = time.time() - train_started
    print(json.dumps({"mode": mode, "samples": samples, "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
                      "samples_per_s": round(samples / (setup_s + train_s), 1),
                      "peak_rss_gib": round(peak_rss_gib(), 3),
                      "workers_peak_rss_gib": round(peak_rss_gib(resource.RUSAGE_CHILDREN), 3)}))


def training(crawl: Path) -> dict:
    out = {}
    for mode in ("stream", "memory"):
        done = subprocess.run([sys.executable, __file__, "--train-child", mode, str(crawl)], check=True,
                              stdout=subprocess.PIPE, text=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def table(record: dict) -> str:
    k, c, e, t = record["kmeans"], record["captioning"], record["embed"], record["training"]
    rows = [
        ("k-means 100k x 128, k=1000", f"faiss {k['faiss_s']} s, MSE {k['faiss_mse']}",
         f"scikit-learn {k['sklearn_s']} s, MSE {k['sklearn_mse']}", f"{k['speedup']}x"),
        ("captioning (3 beams, 30 tokens)", f"batch 128 + KV cache: {c['batched_cached_per_s']}/s",
         f"1 image, no cache: {c['single_uncached_per_s']}/s", f"{c['speedup_vs_single_uncached']}x"),
        ("embed (one 1000-sample shard)", f"stage (batch {e['stage_batch']}): {e['stage_per_s']}/s",
         f"per-image loop: {e['per_image_per_s']}/s", f"{e['speedup']}x"),
        ("captioner training, one epoch", f"streaming: {t['stream']['samples_per_s']}/s, "
         f"{t['stream']['peak_rss_gib']} + {t['stream']['workers_peak_rss_gib']} GiB",
         f"in memory: {t['memory']['samples_per_s']}/s, {t['memory']['peak_rss_gib']} GiB",
         f"{round(t['stream']['samples_per_s'] / t['memory']['samples_per_s'], 2)}x"),
    ]
    lines = ["| what | fast path | slow path | ratio |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=4000, help="crawl size of the training comparison")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    parser.add_argument("--only-kmeans", action="store_true",
                        help="measure k-means only; the other entries of the results file are kept")
    parser.add_argument("--train-child", nargs=2, metavar=("MODE", "CRAWL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The executor's thread settings (passive OpenMP waits: spinning threads crawl on a busy machine),
    # set before torch loads here or in the children, which inherit them.
    thread_defaults()
    if args.train_child:
        train_child(args.train_child[0], Path(args.train_child[1]))
        return 0

    if args.only_kmeans:
        record = json.loads((RESULTS / "side_by_side.json").read_text())
        record["kmeans"] = kmeans()
        return write(record)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="side_by_side_"))
    crawl = work / f"crawl{args.train_samples}"
    try:
        if not (crawl / "crawl.json").exists():
            subprocess.run([sys.executable, "-m", "tldr_tasks.cli", "make-crawl", "--out", str(crawl), "--samples",
                            str(args.train_samples), "--eval-samples", "100"], check=True, stdout=subprocess.DEVNULL)
        record = {"machine": device_info()}
        for name, measure in (("kmeans", kmeans), ("captioning", lambda: captioning(crawl, device)),
                              ("embed", lambda: embed(crawl, device)), ("training", lambda: training(crawl))):
            record[name] = measure()
            print(f"{name}: {record[name]}", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return write(record)


def write(record: dict) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "side_by_side.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "side_by_side.md").write_text(table(record))
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
