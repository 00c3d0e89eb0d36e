"""Stage `train-captioner`: train the codebook captioner on the crawl with DeepSpeed and export it.

    tldr-vlp run train-captioner --input 'crawl/train/{00000..00007}.tar' --out runs/r1
    deepspeed --num_gpus 4 --module --no_local_rank tldr_tasks.cli run train-captioner --input ... --out ...
    torchrun --nproc-per-node 2 -m tldr_tasks.cli run train-captioner --input ... --out ...

Skipped when `{captioner_dir}` already holds a finished export (that is how `--captioner` reuses
one). DeepSpeed checkpoints go to `{captioner_dir}/checkpoints` (a local cache folder when
captioner_dir is remote) every `captioner.checkpoint_every` steps and at every epoch end; a
restarted run resumes from the latest one and ends in the same weights as an uninterrupted run:
the data order is a function of (seed, epoch), dropout is off and steps already done are skipped.
The checkpoints are deleted once the export is complete.
Only rank 0 exports. The batch size is global: each of N ranks takes batch_size / N samples.
Cross-fitting (`captioner.folds` = K, tldr_tasks/folds.py): K captioners, one after the other, each
without one fold of the crawl; fold 0's is the folder's export, fold k's goes to `{captioner_dir}/fold<k>`
(with its own checkpoints), and the folder's COMPLETE marker is written last, after every fold.

The crawl is read as a stream (tldr_tasks/data/stream.py): memory does not grow with the crawl, and
the global batches do not depend on the number of ranks, so N ranks end in the weights of one
(the LM loss is normalised by the global batch's tokens and the codebook-usage entropy is
all-reduced). `captioner.init_from` starts the encoder / decoder from Hugging Face folders.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from tldr_tasks.config import Config
from tldr_tasks.contract import StageIO, StageResult

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # older DeepSpeed checkpoints are deleted; one spare survives a bad write
LOG_EVERY = 50  # steps between progress-bar loss readings (each one waits for the device)
TOKENIZER_CAPTIONS = 200_000  # the tokenizer and the keyword codebook learn from the first this many captions


def run(cfg: Config, io: StageIO) -> StageResult:
    """Train (or resume) the captioner on io.input_shards() and export it to io.captioner_dir."""
    return train(cfg, io)


def train(cfg: Config, io: StageIO, stop_after_steps: int | None = None) -> StageResult:
    """`run` with a test hook: `stop_after_steps` stops (after checkpointing) once that many
    optimizer steps are done, without exporting, like a worker killed right after a checkpoint."""
    from tldr_tasks.models import captioner as cap

    if cap.is_complete(io.captioner_dir):
        log.info("captioner already trained at %s: skipping", io.captioner_dir)
        return StageResult(metrics={}, outputs=[io.captioner_dir], skipped=True)

    import deepspeed

    started = time.time()
    owned = _init_distributed(deepspeed)
    try:
        return _train_folds(cfg, io, stop_after_steps, started)
    finally:
        # DeepSpeed warns at exit otherwise; a caller that brought its own process group keeps it.
        # deepspeed.comm's, not torch's: it also drops DeepSpeed's cached groups, so a later
        # training in the same process starts a fresh group.
        if owned is not None:
            deepspeed.comm.destroy_process_group()
            for name in owned:
                os.environ.pop(name, None)


def _train_folds(cfg: Config, io: StageIO, stop_after_steps: int | None, started: float) -> StageResult:
    """Every fold's captioner (tldr_tasks/folds.py): folds 1..K-1 first, into `fold<k>/`, then fold 0 into the
    folder itself, whose COMPLETE marker (written last) says the whole stage is done. A restarted stage
    skips the folds already exported and resumes the one in progress from its own checkpoints.
    Fold 0's metrics are the stage's; the other folds' are prefixed `fold<k>_`."""
    from tldr_tasks.models import captioner as cap

    folds = cfg.captioner.folds
    metrics: dict[str, float] = {}
    companions: list[str] = []
    for fold in [*range(1, folds), 0]:
        url = cap.fold_url(io.captioner_dir, fold)
        if fold and cap.is_complete(url):
            companions.append(cap.captioner_version(url))
            continue
        result, version = _train(cfg, io.input_shards(), url, fold if folds > 1 else None, stop_after_steps,
                                 started, tuple(companions) if fold == 0 else (), io.embed_dir)
        if version is None:  # stopped by the test hook
            return result
        started = time.time()  # the next fold's setup_seconds: its own, not the folds' before it
        companions.append(version)
        metrics.update({(f"fold{fold}_{k}" if fold else k): v for k, v in result.metrics.items()})
    return StageResult(metrics=metrics, outputs=[io.captioner_dir])


def _train(cfg: Config, urls: list[str], url: str, holdout: int | None, stop_after_steps: int | None,
           started: float, companions: tuple[str, ...], embed_dir: str) -> tuple[StageResult, str | None]:
    """Train one captioner on the crawl `urls` without the samples of fold `holdout` (None: on all) and export
    it to `url`; returns its result and version (None when stopped by `stop_after_steps`). A captioner that
    reads images with a frozen pretrained tower reads the tower's tokens from their cache under `embed_dir`
    (computed once for every fold and epoch, and for the embed stage)."""
    import deepspeed
    import torch

    from tldr_tasks.data import stream
    from tldr_tasks.models import captioner as cap

    c = cfg.captioner
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if c.batch_size % world or c.data_streams % world:
        raise ValueError(f"captioner.batch_size={c.batch_size} and captioner.data_streams={c.data_streams} must be "
                         f"divisible by the {world} ranks (the batch is global)")
    ckpt_dir = checkpoint_dir(url)
    # DeepSpeed rewrites `latest` in place: a kill inside that write leaves it empty. The tag folder
    # it names is complete (written before it); with no valid tag, train from the start.
    latest = Path(ckpt_dir) / "latest"
    tag = latest.read_text().strip() if latest.exists() else ""
    resuming = bool(tag) and (Path(ckpt_dir) / tag).is_dir()
    index, captions = _shared_index(urls, ckpt_dir, rank, not resuming, c.folds, holdout)
    if index.total < c.batch_size:
        held_out = f" outside cross-fitting fold {holdout}" if holdout is not None else ""
        raise ValueError(f"only {index.total} captioned training samples{held_out} in {len(urls)} input shard(s); "
                         f"need at least captioner.batch_size={c.batch_size}")
    folders = cap.start_folders(c)
    tokenizer = (cap.pretrained_tokenizer(folders["text"]) if "text" in folders
                 else _shared_tokenizer(captions, c.vocab_size, ckpt_dir, rank))

    torch.manual_seed(cfg.seed)
    model = cap.build_captioner(c, tokenizer, captions if c.codebook_init == "keywords" else None)
    del captions  # only rank 0 of a fresh run holds them, and only the first TOKENIZER_CAPTIONS
    model.codebook.sync_ranks = world > 1
    token_cache = _token_cache(model, urls, embed_dir, rank, world)
    steps_per_epoch = index.total // c.batch_size  # the ragged tail of each epoch is dropped
    total_steps = steps_per_epoch * c.epochs
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(c, total_steps, world))
    _load_tensors_only(engine)
    done = 0
    if resuming:
        path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
        done = int((client_state or {}).get("step", 0))
        log.info("resumed from %s at step %d of %d", path, done, total_steps)
    setup_seconds = time.time() - started

    dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
    device = engine.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.precision == "bf16-autocast")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks after tokenizer training
    engine.train()
    # Per-step losses stay on the device (LM + VQ; the VQ part includes the negative codebook-usage
    # entropy): reading one is a host sync, so the progress bar reads them every LOG_EVERY steps.
    losses = torch.zeros(steps_per_epoch, 2, device=device)
    first_logged = steps_per_epoch  # none yet: resumed after the last step, the final losses are NaN
    step, trained_samples, train_started = done, 0, time.time()
    data_wait = 0.0  # seconds this process waited for the loader's next batch (decoding, reading)
    progress = _progress(total_steps, done, rank)
    for epoch in range(done // steps_per_epoch, c.epochs):
        start = step - epoch * steps_per_epoch
        first_logged = start
        data = stream.TrainStream(index, batch_size=c.batch_size, streams=c.data_streams, seed=cfg.seed,
                                  epoch=epoch, image_size=c.image_size, tokenizer=tokenizer, max_tokens=c.max_tokens,
                                  shuffle_buffer=c.shuffle_buffer, rank=rank, world=world, start_step=start)
        batches = stream.batches(data, c.loader_workers, device)
        while True:
            waiting = time.time()
            batch = next(batches, None)
            data_wait += time.time() - waiting
            if batch is None:
                break
            index_in_epoch = batch["step"]
            if token_cache is not None:
                batch["tokens"] = token_cache.lookup(batch["keys"]).to(device)
            loss = train_step(engine, batch, dtype, autocast, world)
            step += 1
            trained_samples += c.batch_size
            losses[index_in_epoch, 0] = loss.detach().float()
            losses[index_in_epoch, 1] = engine.module.last_losses["lm_loss"].float()
            progress.update(1)
            if rank == 0 and (step % LOG_EVERY == 0 or index_in_epoch == steps_per_epoch - 1):
                loss_now, lm_now = losses[index_in_epoch].tolist()
                progress.set_postfix(loss=f"{loss_now:.3f}", lm=f"{lm_now:.3f}", epoch=epoch)
            end_of_epoch = index_in_epoch == steps_per_epoch - 1
            if end_of_epoch or step % c.checkpoint_every == 0 or step == stop_after_steps:
                engine.save_checkpoint(ckpt_dir, tag=f"step{step:08d}", client_state={"step": step})
                if rank == 0:
                    _prune_checkpoints(ckpt_dir)
            if step == stop_after_steps:
                progress.close()
                return StageResult(metrics={"steps": float(step)}, outputs=[ckpt_dir]), None
    progress.close()
    train_seconds = time.time() - train_started

    # means over the last epoch's steps (or over what this process trained of it, when resumed late)
    final = losses[first_logged:].double().mean(0) if first_logged < steps_per_epoch else torch.full((2,), float("nan"))
    if world > 1:  # every rank saw different batches: report the mean over ranks
        final = final.to(device)
        torch.distributed.all_reduce(final)
        final = final / world
    metrics = {
        "steps": float(step), "steps_resumed": float(done), "epochs": float(c.epochs),
        "train_samples": float(index.total), "world_size": float(world),
        "setup_seconds": setup_seconds, "train_seconds": train_seconds, "data_wait_seconds": data_wait,
        "samples_per_second": trained_samples / train_seconds if trained_samples else 0.0,
        "final_train_loss": float(final[0]), "final_lm_loss": float(final[1]),
    }
    model = engine.module
    model.codebook.sync_ranks = False  # the usage check below runs on each rank alone
    metrics.update(codebook_usage(model, stream.head(index, 256, c.image_size, tokenizer, c.max_tokens), dtype, device))
    version = None
    if rank == 0:
        version = cap.save_captioner(model.float().cpu(), tokenizer, cfg.to_dict(), url, companions)
        log.info("captioner %s exported to %s", version, url)
        # The export is what later stages read; optimizer-state checkpoints are dead weight now
        # (and would be versioned with the captioner folder by DVC).
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
        version = cap.captioner_version(url)  # every rank carries it on to the next fold's companions
    return StageResult(metrics=metrics, outputs=[url]), version


def _token_cache(model, urls: list[str], embed_dir: str, rank: int, world: int):
    """The frozen tower's token cache of the crawl, complete (rank 0 computes what is missing), or None when the
    captioner's encoder trains (a ViT)."""
    import torch

    from tldr_tasks.models.towers import TokenCache

    if not model.arch.get("image_tower"):
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = TokenCache(model.arch["image_tower"], model.arch["image_size"], embed_dir, device)
    if rank == 0:
        cache.ensure(urls)
    if world > 1:
        torch.distributed.barrier()
    cache.register(urls)
    return cache


def train_step(engine, batch: dict, dtype, autocast, world: int):
    """One optimizer step on one rank's part of a global batch (from `stream.batches`, with the frozen tower's
    `tokens` when the captioner has one); returns the loss, still on the device."""
    import torch

    from tldr_tasks.preprocess import normalize_uint8

    pixels = normalize_uint8(batch["pixels"]).to(dtype)
    mask = batch["attention_mask"]
    lm_tokens = mask[:, 1:].sum().float()
    if world > 1:  # the global batch's predicted tokens, as a per-rank average (see Captioner.losses)
        torch.distributed.all_reduce(lm_tokens)
        lm_tokens = lm_tokens / world
    tokens = batch.get("tokens")
    with autocast:
        loss = engine(pixels, batch["input_ids"], mask, lm_tokens, None if tokens is None else tokens.to(dtype))
    engine.backward(loss)
    engine.step()
    return loss


def deepspeed_config(c, total_steps: int, world: int) -> dict:
    """The DeepSpeed config for a CaptionerConfig: AdamW (torch implementation: no JIT-built
    fused op), linear warmup then cosine decay, ZeRO stage and precision from the config."""
    return {
        "train_batch_size": c.batch_size,
        "train_micro_batch_size_per_gpu": c.batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": c.lr, "betas": [0.9, 0.98], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 2), "warmup_num_steps": max(1, min(c.warmup_steps, total_steps - 1)),
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.05, "warmup_type": "linear"}},
        "zero_optimization": {"stage": c.zero_stage},
        "bf16": {"enabled": c.precision == "bf16"},
        "steps_per_print": 10 ** 9,  # progress goes to the tqdm bar, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }


def codebook_usage(model, piece: dict, dtype, device) -> dict:
    """Distinct codes and code perplexity over the tokens of a few training images (`piece`, from
    `stream.head`), plus their mean caption loss: a collapsed codebook uses a handful of codes."""
    import torch

    from tldr_tasks.preprocess import normalize_uint8

    model.eval()
    with torch.no_grad():
        pixels = normalize_uint8(piece["pixels"]).to(device=device, dtype=dtype)
        encoded = model.encode(pixels)  # once, for the codes and the caption loss
        codes = encoded.codes.flatten()
        lm = model.caption_loss(encoded.quantized, piece["input_ids"].to(device), piece["attention_mask"].to(device))
    counts = torch.bincount(codes.cpu(), minlength=model.arch["codebook_size"]).double()
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": float((counts > 0).sum()), "code_perplexity": float(torch.exp(-(p * p.log()).sum())),
            "codebook_size": float(model.arch["codebook_size"]), "eval_caption_loss": float(lm.mean())}


def checkpoint_dir(captioner_url: str) -> str:
    """A local folder for DeepSpeed checkpoints: `{captioner_dir}/checkpoints` when that is local,
    else `$TLDR_CACHE_DIR` (default ~/.cache/tldr-vlp)/captioner-<hash of the URL>/checkpoints."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(captioner_url)
    if protocol in (None, "file", "local"):
        return os.path.join(path, "checkpoints")
    cache = os.environ.get("TLDR_CACHE_DIR", os.path.expanduser("~/.cache/tldr-vlp"))
    digest = hashlib.sha256(captioner_url.encode()).hexdigest()[:12]
    return os.path.join(cache, f"captioner-{digest}", "checkpoints")


def _init_distributed(deepspeed) -> list[str] | None:
    """One process without a launcher gets a world of one (else DeepSpeed looks for MPI). On CPU
    the shared-memory all-reduce op is switched off: it is JIT-compiled with gcc on first use
    (40-70 s) and gloo does the job; on GPUs NCCL is used and nothing is compiled.

    Returns None when a process group already existed (the caller's), else the environment
    variables set here: the caller destroys the group and removes them when done."""
    import torch

    before = set(os.environ)
    alone = "RANK" not in os.environ
    if alone:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("TLDR_DS_SHM_COMM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.distributed.is_initialized():
        return None
    if alone:
        # A world of one needs no rendezvous: an in-process store instead of the TCP store, which listens on
        # every address (`*:MASTER_PORT`), and gloo's own socket on loopback (issue 26).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.distributed.init_process_group(get_accelerator().communication_backend_name(),
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(verbose=False)
    return sorted(set(os.environ) - before)


def _load_tensors_only(engine) -> None:
    """Make DeepSpeed read checkpoints with torch.load(weights_only=True): its torch checkpoint
    engine unpickles arbitrary objects, and a checkpoint folder is a cache anyone who can write to
    the output folder could plant a file in. DeepSpeed's own checkpoints hold tensors, dicts,
    numbers and three plain DeepSpeed data classes (allow-listed by name; ZeRO optimizer states),
    so they load unchanged; anything else is refused with an UnpicklingError, never executed."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_index(urls: list[str], ckpt_dir: str, rank: int, need_captions: bool, folds: int, holdout: int | None):
    """Rank 0 counts the trainable samples of every shard outside fold `holdout` (kept beside the checkpoints:
    a resumed run does not re-read the crawl) and the other ranks read its count. Returns the index and, on
    rank 0 when `need_captions` (a fresh start: tokenizer and keyword codebook), the first
    TOKENIZER_CAPTIONS captions; else an empty list."""
    import torch

    from tldr_tasks.data.stream import ShardIndex, index_shards

    path = Path(ckpt_dir) / "index.json"
    captions: list[str] = []
    if rank == 0:
        index = ShardIndex.from_json(path.read_text()) if path.exists() else None
        if index is None or index.urls != list(urls) or need_captions:
            index, captions = index_shards(urls, TOKENIZER_CAPTIONS, folds, holdout)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(index.to_json())
            tmp.replace(path)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return ShardIndex.from_json(path.read_text()), captions


def _shared_tokenizer(captions: list[str], vocab_size: int, ckpt_dir: str, rank: int):
    """Rank 0 trains the tokenizer once and keeps it beside the checkpoints, so every rank and
    every resumed run uses the very same vocabulary."""
    import torch

    from tldr_tasks.models.tokenizer import train_tokenizer, wrap_tokenizer

    path = Path(ckpt_dir) / "tokenizer.json"
    if rank == 0 and not path.exists():
        tokenizer = train_tokenizer(captions, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tokenizer.backend_tokenizer.to_str())
        tmp.replace(path)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return wrap_tokenizer(path.read_text())


def _prune_checkpoints(ckpt_dir: str) -> None:
    tags = sorted(p for p in Path(ckpt_dir).glob("step*") if p.is_dir())
    for old in tags[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _progress(total: int, done: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train captioner", unit="step", file=sys.stderr,
                disable=rank != 0, dynamic_ncols=True)
