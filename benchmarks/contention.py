"""Thread contention: a stage's hot loop alone, beside a busy process, and beside another stage.

    .venv/bin/python benchmarks/contention.py                 # the full run (minutes; a quiet machine)
    .venv/bin/python benchmarks/contention.py --steps 3 --batch 16    # a quick check that it works

The hot loop is a training step of the evaluation's kind (conv stem + transformer layers, AdamW,
batch 128 of 64 px images), in a process of its own with the thread settings under test. Every case
is measured against the solo run of the same benchmark run (median step time), so the ratios hold
on any machine:

- `solo`: one stage process, nothing else running.
- `busy`: the same beside one pure-Python busy loop (a package install, a data loader) on one core.
- `pair`: two stage processes at once, each with the same settings (two pipeline runs on one node).

and each case under each thread setting:

- `all-cores-active`: one thread per core, OpenMP threads spin while they wait (torch's default
  where OMP_NUM_THREADS is unset, before the executor set its defaults).
- `all-cores-passive`: one thread per core, OMP_WAIT_POLICY=PASSIVE (the executor's default).
- `fair-share-passive`: cores / processes threads each, passive (what a pod limit gives).

The goal: every case at most 2x its solo step time (the fair share of two competitors). Writes a
JSON line per case and, with --out, the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {  # name -> (threads per process: "all" or "share", OMP_WAIT_POLICY)
    "all-cores-active": ("all", "ACTIVE"),
    "all-cores-passive": ("all", "PASSIVE"),
    "fair-share-passive": ("share", "PASSIVE"),
}
CASES = ("solo", "busy", "pair")


def worker(steps: int, warmup: int, batch: int, image: int) -> None:
    """One stage process: time `steps` training steps after `warmup` ones; prints the times as JSON."""
    import torch

    torch.manual_seed(0)
    width = 128
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, width, kernel_size=8, stride=8),  # patchify: (image/8)^2 tokens
        torch.nn.Flatten(2),
    )
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, batch_first=True), num_layers=4)
    head = torch.nn.Linear(width, 256)
    params = [*model.parameters(), *encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    pixels = torch.rand(batch, 3, image, image)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        tokens = model(pixels).transpose(1, 2)
        features = head(encoder(tokens).mean(1))
        logits = features @ features.t()  # a contrastive loss over the batch, like CLIP's
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    print(json.dumps({"threads": torch.get_num_threads(), "times": times}))


def busy_loop() -> None:
    while True:
        pass


def launch(args, threads: int, wait: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": wait}
    command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--image", str(args.image)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def measure(args, case: str, setting: str, cores: int) -> dict:
    """Median step time of the stage process(es) in one case under one thread setting."""
    per_process, wait = SETTINGS[setting]
    processes = 2 if case == "pair" else 1
    threads = cores if per_process == "all" else max(1, cores // (processes + (case == "busy")))
    busy = subprocess.Popen([sys.executable, __file__, "--busy"]) if case == "busy" else None
    try:
        workers = [launch(args, threads, wait) for _ in range(processes)]
        outputs = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
    finally:
        if busy:
            busy.kill()
            busy.wait()
    medians = [statistics.median(o["times"]) for o in outputs]
    return {"case": case, "setting": setting, "threads": threads, "step_s": round(max(medians), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", help="write the table (JSON) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.steps, args.warmup, args.batch, args.image)
        return 0
    if args.busy:
        busy_loop()
    from tldr_tasks.stages.base import cpu_limit

    cores = cpu_limit()
    rows = []
    for setting in args.settings:
        solo = None
        for case in CASES:
            row = measure(args, case, setting, cores)
            solo = solo or row["step_s"]
            row["vs_solo"] = round(row["step_s"] / solo, 2)
            row["within_fair_share"] = row["vs_solo"] <= 2.0
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cores": cores, "steps": args.steps, "batch": args.batch, "image": args.image, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
