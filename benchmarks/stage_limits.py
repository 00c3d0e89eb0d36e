"""Every model-bound stage against its model alone, in one run on one device.

    .venv/bin/python benchmarks/stage_limits.py                              (part of make bench)
    .venv/bin/python benchmarks/stage_limits.py --samples 2000 --rounds 1 --workdir /tmp/limits

A synthetic crawl (64 px, the demo's settings), then for train-captioner (one epoch), embed and
caption, `rounds` times in turn, so that other work on the machine slows both alike:

- stage: the stage's real `run(cfg, io)`, its outputs deleted first; everything it does counts
  (reading the crawl, decoding, tokenising, setup, checkpoints, writing).
- model: the same model, batch size and thread settings on the same batches, built in memory
  beforehand, through the stage's own per-batch function: `train_step` (the DeepSpeed step),
  `embed_batch` (feature and caption loss), `caption_batch` (beam search, confidence, grounding).
- tower-tokens: the frozen pretrained image tower's pass that train-captioner (preset `pretrained`) and embed
  (feature `tower`) share (`TokenCache.ensure`), against the tower's plain forward on the same batches.
  `--stages tower-tokens` adds its row to an existing results file and keeps the others.

stage_per_s and model_per_s are the samples of all rounds over their seconds (train-captioner: the
trained samples, embed: the crawl's, caption: the captioned ones); ratio = stage_per_s / model_per_s;
cpu_ratio the same with CPU seconds. A stage under 0.8 of its model gets a `reason`: where its other
time goes, from its own metrics. Imports are loaded before the first round (a process pays them once).

Writes `benchmarks/results/stage_limits.json`: {"machine", "settings", stage: {"stage_per_s",
"model_per_s", "ratio", ...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stage_scale import OVERRIDES, device_info  # noqa: E402

from tldr_tasks.runner import thread_defaults  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GOAL = 0.8  # a stage under this share of its model's throughput gets a measured reason
FROZEN_TOWER = ("efficientnet-lite0", 128)  # the `pretrained` captioner's frozen tower and its pixels


def train_captioner_model(cfg, io, device):
    """The exported captioner (the architecture the stage trains) in a DeepSpeed engine with the
    stage's config, and one epoch of the stage's batches; returns a function that trains on them."""
    import deepspeed
    import torch

    from tldr_tasks.data import stream
    from tldr_tasks.models.captioner import load_captioner
    from tldr_tasks.stages import train_captioner as stage
    from tldr_tasks.storage import expand_shards

    c = cfg.captioner
    model, tokenizer = load_captioner(io.captioner_dir)
    index, _ = stream.index_shards(expand_shards(io.input), keep_captions=0)
    data = stream.TrainStream(index, batch_size=c.batch_size, streams=c.data_streams, seed=cfg.seed, epoch=0,
                              image_size=c.image_size, tokenizer=tokenizer, max_tokens=c.max_tokens,
                              shuffle_buffer=c.shuffle_buffer)
    batches = list(stream.batches(data, c.loader_workers, torch.device(device)))
    autocast = torch.autocast(device, enabled=False)  # the stage's at precision fp32

    def train() -> float:
        owned = stage._init_distributed(deepspeed)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model.train(), model_parameters=model.parameters(),
                                                   config=stage.deepspeed_config(c, len(batches), 1))
            started = time.time()
            for batch in batches:
                loss = stage.train_step(engine, batch, torch.float32, autocast, 1)
            loss.item()  # wait for the device
            return time.time() - started
        finally:
            if owned is not None:
                deepspeed.comm.destroy_process_group()
                for name in owned:
                    os.environ.pop(name, None)

    return train, len(batches) * c.batch_size


def embed_model(cfg, io, device):
    """`embed_batch` on the embed stage's batches (batch_size per shard), decoded and tokenised."""
    import torch

    from tldr_tasks.data.shards import iter_shard
    from tldr_tasks.models.captioner import load_captioner
    from tldr_tasks.preprocess import image_to_tensor, tokenize_captions
    from tldr_tasks.stages.embed import _batches, embed_batch

    model, tokenizer = load_captioner(io.captioner_dir, device=device)
    batches = []
    for url in io.input_shards():
        for batch in _batches(iter_shard(url), cfg.embed.batch_size, []):
            rows = [i for i, s in enumerate(batch) if s.caption.strip()]
            ids, mask = tokenize_captions(tokenizer, [batch[i].caption for i in rows], model.arch["max_tokens"])
            batches.append((image_to_tensor([s.image for s in batch], model.image_size).to(device), rows,
                            ids.to(device), mask.to(device)))

    @torch.inference_mode()
    def forward() -> float:
        started = time.time()
        for pixels, rows, ids, mask in batches:
            embed_batch(model, pixels, rows, ids, mask, cfg.embed.feature)
        return time.time() - started

    return forward, sum(len(b[0]) for b in batches)


def caption_model(cfg, io, device):
    """`caption_batch` (beam search, confidence, grounding) on the caption stage's batches of the
    selected images (batch_size per source shard)."""
    from tldr_tasks import storage
    from tldr_tasks.data.shards import Sample, iter_shard
    from tldr_tasks.models.captioner import load_captioner
    from tldr_tasks.preprocess import image_to_tensor
    from tldr_tasks.stages.caption import caption_batch

    model, tokenizer = load_captioner(io.captioner_dir, device=device)
    selected = set(storage.read_parquet(storage.join(io.sample_dir, "selected.parquet"),
                                        columns=["key"]).column("key").to_pylist())
    size = cfg.caption.batch_size
    batches = []
    for url in io.input_shards():
        images = [s.image for s in iter_shard(url) if isinstance(s, Sample) and s.key in selected]
        batches += [image_to_tensor(images[i:i + size], model.image_size).to(device)
                    for i in range(0, len(images), size)]

    def generate() -> float:
        started = time.time()
        for pixels in batches:
            caption_batch(model, tokenizer, pixels, cfg.caption)
        return time.time() - started

    return generate, sum(len(b) for b in batches)


def tower_tokens_model(cfg, io, device):
    """The frozen image tower alone (EfficientNet-Lite0 at 128 px, FROZEN_TOWER) on the same batches the
    token cache computes (TokenCache's batch size), decoded and resized beforehand."""
    import torch

    from tldr_tasks.data.shards import Sample, iter_shard
    from tldr_tasks.models.towers import TokenCache, image_tokens, load_image_tower
    from tldr_tasks.preprocess import image_to_tensor

    tower, size = load_image_tower(FROZEN_TOWER[0], device), FROZEN_TOWER[1]
    step = TokenCache(*FROZEN_TOWER, io.embed_dir).batch_size
    batches = []
    for url in io.input_shards():
        images = [s.image for s in iter_shard(url) if isinstance(s, Sample)]
        batches += [image_to_tensor(images[i:i + step], size).to(device) for i in range(0, len(images), step)]

    @torch.no_grad()
    def forward() -> float:
        started = time.time()
        for pixels in batches:
            image_tokens(tower(pixels)).to(torch.float16).cpu()
        return time.time() - started

    return forward, sum(len(b) for b in batches)


class TowerTokensStage:
    """The frozen tower's pass over the crawl as train-captioner and embed run it (`TokenCache.ensure`: read,
    decode, resize, tower, write one float16 file per shard), standing in for a stage module."""

    @staticmethod
    def run(cfg, io):
        from tldr_tasks.contract import StageResult
        from tldr_tasks.data.shards import Sample, iter_shard
        from tldr_tasks.models.towers import TokenCache

        shards = io.input_shards()
        TokenCache(*FROZEN_TOWER, io.embed_dir).ensure(shards)
        samples = sum(isinstance(s, Sample) for url in shards for s in iter_shard(url))
        return StageResult(metrics={"samples": float(samples)}, outputs=[])


def explain_training(stage_s: float, model_s: float, m: dict) -> str:
    steps = m["train_seconds"] - m["data_wait_seconds"]
    return (f"per round {stage_s:.1f} s: setup {m['setup_seconds']:.1f} s (index pass, tokenizer, codebook, "
            f"DeepSpeed), "
            f"waiting for the loader's next batch {m['data_wait_seconds']:.1f} s, training steps and the epoch's "
            f"checkpoint {steps:.1f} s (the model alone: {model_s:.1f} s), export and codebook check "
            f"{stage_s - m['setup_seconds'] - m['train_seconds']:.1f} s")


def explain_outside(stage_s: float, model_s: float, m: dict) -> str:
    return (f"per round {stage_s - model_s:.1f} s of {stage_s:.1f} s outside the model: loading the captioner, "
            "reading and decoding the shards, tokenising, writing the outputs")


# stage -> (the folder its run() writes, deleted before each round; the samples it did; its model alone;
# where the rest of its time goes, from its round means: (stage seconds, model seconds, stage metrics) -> text)
STAGES = {
    "train-captioner": ("captioner", lambda cfg, m: m["steps"] * cfg.captioner.batch_size, train_captioner_model,
                        explain_training),
    "embed": ("embed", lambda cfg, m: m["samples"], embed_model, explain_outside),
    "caption": ("caption", lambda cfg, m: m["captions_written"], caption_model, explain_outside),
    "tower-tokens": ("embed/towers", lambda cfg, m: m["samples"], tower_tokens_model, explain_outside),
}


def measure(name: str, cfg, io, device: str, rounds: int) -> dict:
    """`rounds` times the stage, then its model; samples/s over all rounds of each."""
    from tldr_tasks.runner import load_stage_module

    folder, samples_of, build, explain = STAGES[name]
    module = TowerTokensStage if name == "tower-tokens" else load_stage_module(name)
    done = []
    for r in range(rounds):
        shutil.rmtree(Path(io.out, folder), ignore_errors=True)
        started, cpu = time.time(), cpu_seconds()
        metrics = module.run(cfg, io).metrics
        stage = {"samples": samples_of(cfg, metrics), "s": time.time() - started, "cpu_s": cpu_seconds() - cpu}
        if r == 0:  # the model's inputs come from the stage's own outputs (captioner, selection)
            loop, per_round = build(cfg, io, device)
        cpu = cpu_seconds()
        model = {"samples": per_round, "s": loop(), "cpu_s": cpu_seconds() - cpu}
        done.append((stage, model, metrics))
        print(f"{name} round {r}: stage {stage['s']:.1f} s, model {model['s']:.1f} s", file=sys.stderr)

    def per_s(which: int, seconds: str) -> float:
        return sum(d[which]["samples"] for d in done) / sum(d[which][seconds] for d in done)

    record = {"samples": int(stage["samples"]), "stage_per_s": round(per_s(0, "s"), 1),
              "model_per_s": round(per_s(1, "s"), 1)}
    record["ratio"] = round(record["stage_per_s"] / record["model_per_s"], 3)
    # The same with CPU seconds (of all the stage's processes): steadier than wall time on a shared machine,
    # blind to waiting on I/O.
    record["cpu_ratio"] = round(per_s(0, "cpu_s") / per_s(1, "cpu_s"), 3)
    if record["ratio"] < GOAL:
        means = {k: sum(d[2][k] for d in done) / rounds for k in metrics}
        record["reason"] = explain(sum(d[0]["s"] for d in done) / rounds, sum(d[1]["s"] for d in done) / rounds,
                                   means)
    record["rounds"] = [{"stage_s": round(st["s"], 2), "model_s": round(mo["s"], 2),
                         "ratio": round(st["samples"] / st["s"] / (mo["samples"] / mo["s"]), 3),
                         "stage_cpu_s": round(st["cpu_s"], 2), "model_cpu_s": round(mo["cpu_s"], 2),
                         "stage_metrics": {k: round(v, 3) for k, v in m.items()}} for st, mo, m in done]
    return record


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the captioner's loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def warm_imports() -> None:
    """Load what the stages import lazily, so that no round pays it (a stage's process pays it once,
    whatever the crawl size; stage_scale.py counts it)."""
    import deepspeed  # noqa: F401
    import transformers

    from tldr_tasks.models.captioner import keyword_codebook

    transformers.ViTModel, transformers.GPT2LMHeadModel  # noqa: B018 (lazy modules)
    keyword_codebook(["a red circle", "a blue square"], 4, 2)  # the sentence encoder behind it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="crawl size")
    parser.add_argument("--rounds", type=int, default=2, help="stage, model, stage, model, ...")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated; later ones need earlier ones")
    parser.add_argument("--out", default=str(RESULTS / "stage_limits.json"))
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    args = parser.parse_args(argv)
    thread_defaults()  # the executor's thread settings, before torch loads: stage and model share them

    import torch

    from tldr_tasks.config import load_config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.runner import load_stage_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stage_limits_"))
    crawl = work / f"crawl{args.samples}"
    overrides = OVERRIDES + [f"cluster.clusters={max(2, args.samples // 50)}"]
    cfg = load_config(None, overrides)
    io = StageIO(input=str(crawl / "train"), out=str(work / "run"))
    machine = {**device_info(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    settings = {"samples": args.samples, "rounds": args.rounds, "overrides": overrides}
    names = args.stages.split(",")
    if set(names) < set(STAGES) and Path(args.out).exists():  # a part of the suite: the other stages' rows stay
        record = json.loads(Path(args.out).read_text())
        for name in names:
            record[name] = {"machine": machine, "settings": settings}
    else:
        record = {"machine": machine, "settings": settings}
    try:
        if not (crawl / "crawl.json").exists():
            subprocess.run([sys.executable, "-m", "tldr_tasks.cli", "make-crawl", "--out", str(crawl), "--samples",
                            str(args.samples), "--eval-samples", "100"], check=True, stdout=subprocess.DEVNULL)
        warm_imports()
        for name in names:
            if name == "caption":  # its input: the selection of the stages in between
                for between in ("cluster", "sample"):
                    shutil.rmtree(Path(io.out, between), ignore_errors=True)
                    load_stage_module(between).run(cfg, io)
            record[name] = {**record.get(name, {}), **measure(name, cfg, io, device, args.rounds)}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for name in STAGES:
        if name in record:
            r = record[name]
            print(f"{name}: stage {r['stage_per_s']}/s, model {r['model_per_s']}/s, ratio {r['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
