"""The issue's GPU figures: captioner training samples/s and the base preset's embedding images/s at 224 px.

    python benchmarks/gpu_check.py --out results.json          (on a GPU machine; ~3 min)

1. train-captioner (the real stage: DeepSpeed, streaming loader) for one epoch of a 4,000-sample
   synthetic 64-px crawl, tiny preset, at the demo's batch 32 and at batch 256; samples/s over the
   training loop (`samples_per_second`, setup excluded).
2. The `base` preset (ViT-B/16 encoder at 224 px + codebook) on random pixels: `compute_features`
   (the embed stage's model call, quantized_mean) at batch 256, fp32 and under bf16 autocast;
   images/s over 20 batches after 3 warm-ups, synchronised at the ends only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(crawl: Path, batch: int, work: Path) -> dict:
    from tldr_tasks.config import load_config
    from tldr_tasks.contract import StageIO
    from tldr_tasks.stages import train_captioner

    cfg = load_config(None, ["captioner.epochs=1", f"captioner.batch_size={batch}", "captioner.loader_workers=4",
                             "captioner.data_streams=8", "captioner.codebook_init=random"])
    result = train_captioner.run(cfg, StageIO(input=str(crawl / "train"), out=str(work / f"train{batch}")))
    return {k: round(result.metrics[k], 2) for k in ("samples_per_second", "train_seconds", "steps")}


def embed_base(device: str = "cuda", batch: int = 256, iters: int = 20) -> dict:
    import torch

    from tldr_tasks.config import load_config
    from tldr_tasks.models.captioner import build_captioner
    from tldr_tasks.models.tokenizer import train_tokenizer
    from tldr_tasks.stages.embed import compute_features

    cfg = load_config(None, ["captioner.preset=base", "captioner.image_size=224", "captioner.codebook_init=random"])
    model = build_captioner(cfg.captioner, train_tokenizer(["a red circle"], 300)).to(device).eval()
    pixels = torch.rand(batch, 3, 224, 224, device=device) * 2 - 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name, autocast in (("fp32", False), ("bf16_autocast", True)):
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            for _ in range(3):
                compute_features(model.encode(pixels), "quantized_mean", model.arch["codebook_size"])
            sync()
            started = time.time()
            for _ in range(iters):
                compute_features(model.encode(pixels), "quantized_mean", model.arch["codebook_size"])
            sync()
        out[f"{name}_images_per_s"] = round(batch * iters / (time.time() - started), 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    crawl = work / "crawl"
    subprocess.run([sys.executable, "-m", "tldr_tasks.cli", "make-crawl", "--out", str(crawl), "--samples", "4000",
                    "--eval-samples", "100"], check=True, stdout=subprocess.DEVNULL)
    record = {"gpu": torch.cuda.get_device_name(0), "embed_base_224": embed_base()}
    print(record, file=sys.stderr)
    record["train_captioner"] = {f"batch{b}": train(crawl, b, work) for b in (32, 256)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
