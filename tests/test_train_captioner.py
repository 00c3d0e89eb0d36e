"""Stage train-captioner: DeepSpeed training on a tiny crawl, checkpoints, exact resume, export, skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.data import stream
from tldr_tasks.data.shards import Sample, iter_shard
from tldr_tasks.models import captioner as cap
from tldr_tasks.stages import train_captioner as tc

torch.set_num_threads(1)

OVERRIDES = ["captioner.image_size=32", "captioner.epochs=2", "captioner.batch_size=32",
             "captioner.checkpoint_every=4", "captioner.codebook_size=64", "captioner.warmup_steps=2",
             "captioner.vocab_size=400", "captioner.folds=1"]  # one captioner: tests/test_crossfit.py has folds


def config(*extra: str):
    return load_config(None, OVERRIDES + list(extra))


def train_io(tiny_crawl: str, out: Path) -> StageIO:
    return StageIO(input=os.path.join(tiny_crawl, "train"), out=str(out))


def captioned_samples(tiny_crawl: str) -> int:
    io = StageIO(input=os.path.join(tiny_crawl, "train"), out="unused")
    return sum(isinstance(s, Sample) and bool(s.caption.strip()) for url in io.input_shards() for s in iter_shard(url))


def weights(io: StageIO) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(io.captioner_dir, cap.WEIGHTS))


@pytest.fixture(scope="module")
def trained(tiny_crawl, tmp_path_factory):
    """One uninterrupted run, shared by the tests below."""
    cfg = config()
    io = train_io(tiny_crawl, tmp_path_factory.mktemp("full"))
    return cfg, io, tc.run(cfg, io)


def test_training_index_skips_empty_captions(tiny_crawl):
    io = StageIO(input=os.path.join(tiny_crawl, "train"), out="unused")
    index, captions = stream.index_shards(io.input_shards(), keep_captions=50)
    assert index.total == captioned_samples(tiny_crawl)
    assert index.total < 200  # the crawl's noise includes empty captions
    assert len(captions) == 50 and all(c.strip() for c in captions)


def test_train_exports_a_loadable_captioner(trained, tiny_crawl):
    cfg, io, result = trained
    n = captioned_samples(tiny_crawl)
    assert not result.skipped and result.outputs == [io.captioner_dir]
    assert result.metrics["steps"] == 2 * (n // 32)
    assert result.metrics["train_samples"] == n
    assert result.metrics["samples_per_second"] > 0
    assert 1 <= result.metrics["codes_used"] <= 64 and result.metrics["code_perplexity"] >= 1
    assert 0 < result.metrics["final_lm_loss"] < 8 and result.metrics["final_train_loss"] < 8
    assert cap.is_complete(io.captioner_dir)
    assert not Path(io.captioner_dir, "checkpoints").exists()  # removed once the export is complete
    assert not torch.distributed.is_initialized()  # the stage's own process group is destroyed at the end
    saved = json.loads(Path(io.captioner_dir, cap.CONFIG).read_text())
    assert saved["run_config"] == cfg.to_dict()
    assert saved["arch"]["codebook_size"] == 64 and saved["arch"]["image_size"] == 32
    model, tokenizer = cap.load_captioner(io.captioner_dir)
    assert len(tokenizer) <= 400
    captions = model.generate_captions(torch.zeros(2, 3, 32, 32), tokenizer, max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_second_run_skips_a_finished_captioner(trained):
    cfg, io, _ = trained
    before = weights(io)
    again = tc.run(cfg, io)
    assert again.skipped and again.outputs == [io.captioner_dir]
    after = weights(io)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reuses_captioner_given_with_flag(trained, tiny_crawl, tmp_path):
    """--captioner points the stage at an existing export: nothing is trained."""
    cfg, io, _ = trained
    reuse = StageIO(input=os.path.join(tiny_crawl, "train"), out=str(tmp_path), captioner=io.captioner_dir)
    assert tc.run(cfg, reuse).skipped
    assert not Path(tmp_path, "captioner").exists()


def test_resume_from_checkpoint_equals_uninterrupted_run(trained, tiny_crawl, tmp_path):
    cfg, full_io, full = trained
    io = train_io(tiny_crawl, tmp_path)
    stopped = tc.train(cfg, io, stop_after_steps=5)  # mid-epoch, one step after the step-4 checkpoint
    ckpt = Path(io.captioner_dir, "checkpoints")
    assert stopped.metrics["steps"] == 5 and not cap.is_complete(io.captioner_dir)
    assert (ckpt / "latest").read_text().strip() == "step00000005"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000005"]  # older pruned
    resumed = tc.run(cfg, io)
    assert resumed.metrics["steps_resumed"] == 5
    assert resumed.metrics["steps"] == full.metrics["steps"]
    a, b = weights(full_io), weights(io)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_keeps_fp32_weights_and_trains(tiny_crawl, tmp_path):
    cfg = config("captioner.precision=bf16-autocast", "captioner.epochs=1")
    assert tc.deepspeed_config(cfg.captioner, total_steps=10, world=1)["bf16"]["enabled"] is False
    io = train_io(tiny_crawl, tmp_path)
    result = tc.run(cfg, io)
    assert 0 < result.metrics["final_lm_loss"] < 8
    assert all(t.dtype == torch.float32 for t in weights(io).values())


def test_deepspeed_config_from_captioner_config():
    c = config("captioner.precision=bf16", "captioner.zero_stage=1", "captioner.lr=0.002").captioner
    ds = tc.deepspeed_config(c, total_steps=100, world=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 2
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 1


def test_remote_captioner_dir_checkpoints_to_local_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TLDR_CACHE_DIR", str(tmp_path))
    local = tc.checkpoint_dir("s3://bucket/run/captioner")
    assert local.startswith(str(tmp_path)) and local.endswith("checkpoints")
    assert local == tc.checkpoint_dir("s3://bucket/run/captioner")
    assert local != tc.checkpoint_dir("memory://other/captioner")
    assert tc.checkpoint_dir(str(tmp_path / "cap")) == str(tmp_path / "cap" / "checkpoints")
    assert tc.checkpoint_dir("file://" + str(tmp_path / "cap")) == str(tmp_path / "cap" / "checkpoints")


def test_two_process_launch_matches_one_process(trained, tiny_crawl, tmp_path):
    """torchrun with 2 ranks (gloo on CPU): the global batch is split, rank 0 exports, and the
    weights equal the single-process run's within float tolerance."""
    _, full_io, _ = trained
    io = train_io(tiny_crawl, tmp_path)
    script = ("import sys, torch; torch.set_num_threads(1)\n"
              "from tldr_tasks.config import load_config\n"
              "from tldr_tasks.contract import StageIO\n"
              "from tldr_tasks.stages import train_captioner as tc\n"
              f"tc.run(load_config(None, {OVERRIDES!r}), StageIO(input={io.input!r}, out={io.out!r}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(tc._free_port())]
    (tmp_path / "train.py").write_text(script)
    proc = subprocess.run(torchrun + [str(tmp_path / "train.py")], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(full_io), weights(io)
    # The same global batches (the stream's order ignores the rank count), the LM loss normalised by
    # the global batch's tokens and the codebook usage entropy all-reduced: the same objective, so
    # only float summation order differs.
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print("max |2-rank - 1-rank| weight difference:", diff)
    assert diff < 1e-4
