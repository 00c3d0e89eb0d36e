"""Safety: weights and checkpoints are read without unpickling arbitrary objects, and credentials
never reach logs, MLflow params/tags/metrics or output files."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tldr_tasks
from tldr_tasks import tracking
from tldr_tasks.config import load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.stages import embed

torch.set_num_threads(1)

PACKAGE = Path(tldr_tasks.__file__).parent
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Payload:
    """Unpickling this runs `open(marker, "w")`: the marker file appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> Path:
    """A torch.save'd malicious pickle at `path` (how a poisoned checkpoint looks on disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(Payload(marker), path)
    return path


def test_the_payload_is_live_when_unpickled(tmp_path):
    """Guards the tests below: the planted file does run code when loaded the unsafe way."""
    marker = tmp_path / "pwned"
    torch.load(plant(tmp_path / "evil.pt", marker), weights_only=False).close()
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# No unsafe deserialisation anywhere in the package

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_no_unsafe_deserialisation_in_the_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for call, name in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}: {ast.unparse(call)[:100]}"
            if name in ("torch.load", "torch.serialization.load"):
                if _keyword(call, "weights_only") is not True:
                    offenders.append(where)
            elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load",
                          "cloudpickle.load", "cloudpickle.loads", "pd.read_pickle", "pandas.read_pickle",
                          "torch.jit.load", "marshal.loads", "yaml.load", "yaml.unsafe_load"):
                offenders.append(where)
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                if _keyword(call, "allow_pickle") is True:
                    offenders.append(where)
    assert offenders == [], "unsafe deserialisation (use safetensors, torch.load(weights_only=True), " \
                            "np.load(allow_pickle=False), yaml.safe_load):\n" + "\n".join(offenders)


def test_the_scan_finds_unsafe_calls():
    source = "import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n" \
             "torch.load(p, weights_only=True)\n"
    names = [name for _, name in _calls(ast.parse(source))]
    assert names.count("torch.load") == 3 and "pickle.loads" in names
    unsafe = [c for c, n in _calls(ast.parse(source)) if n == "torch.load" and _keyword(c, "weights_only") is not True]
    assert len(unsafe) == 2


# ---------------------------------------------------------------------------------------------
# Poisoned files where checkpoints are expected are refused, never executed

@pytest.fixture()
def no_dist_env(monkeypatch):
    for name in DIST_VARS:  # set-then-delete records the original state, so it is restored
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def test_a_poisoned_deepspeed_checkpoint_is_refused(tiny_crawl, tmp_path, no_dist_env):
    """DeepSpeed's own loader unpickles anything (weights_only=False); the stage must not let it."""
    from tldr_tasks.stages import train_captioner

    cfg = load_config(None, ["captioner.epochs=1", "captioner.image_size=32", "captioner.batch_size=32"])
    io = StageIO(input=str(Path(tiny_crawl) / "train"), out=str(tmp_path / "run"))
    checkpoints = Path(train_captioner.checkpoint_dir(io.captioner_dir))
    marker = tmp_path / "pwned"
    plant(checkpoints / "step00000002" / "mp_rank_00_model_states.pt", marker)
    (checkpoints / "latest").write_text("step00000002")
    with pytest.raises(pickle.UnpicklingError):
        train_captioner.run(cfg, io)
    assert not marker.exists()
    assert not (tmp_path / "run" / "captioner" / "COMPLETE").exists()


@pytest.fixture()
def saved_captioner(tmp_path) -> Path:
    """A tiny random-init captioner exported the normal way (safetensors + config + tokenizer)."""
    from tldr_tasks.models.captioner import build_captioner, save_captioner
    from tldr_tasks.models.tokenizer import train_tokenizer

    cfg = load_config(None, ["captioner.image_size=32", "captioner.codebook_init=random",
                             "captioner.codebook_size=16"])
    tokenizer = train_tokenizer(["a red circle", "a blue square on green", "two small triangles"], 300)
    torch.manual_seed(0)
    folder = tmp_path / "captioner"
    save_captioner(build_captioner(cfg.captioner, tokenizer), tokenizer, cfg.to_dict(), str(folder))
    return folder


def test_captioner_weights_are_read_with_safetensors_only(saved_captioner, tmp_path):
    from tldr_tasks.models.captioner import load_captioner

    marker = tmp_path / "pwned"
    # a pickle beside the weights (what a transformers-style loader would pick up) is never read
    plant(saved_captioner / "pytorch_model.bin", marker)
    model, _ = load_captioner(str(saved_captioner))
    assert sum(p.numel() for p in model.parameters()) > 0 and not marker.exists()
    # a pickle in place of the weights is refused
    plant(saved_captioner / "model.safetensors", marker)
    with pytest.raises(Exception) as refused:
        load_captioner(str(saved_captioner))
    assert not isinstance(refused.value, AssertionError)
    assert not marker.exists()


def test_embed_parts_with_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    url = tmp_path / "00000.npz"
    np.savez(url, keys=np.array([Payload(marker)], dtype=object), features=np.zeros((1, 2), np.float16),
             loss=np.zeros(1, np.float32), reject_keys=np.array([], dtype=str),
             reject_reasons=np.array([], dtype=str), meta=np.asarray("{}"))
    with pytest.raises(ValueError, match="allow_pickle"):
        embed.load_part(str(url))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Credentials stay out of logs, MLflow and outputs

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAH6TESTKEYID00042",
    "AWS_SECRET_ACCESS_KEY": "h6-aws-secret-3f9a1c7e5b",
    "AWS_SESSION_TOKEN": "h6-session-token-8d2e4f",
    "MLFLOW_TRACKING_PASSWORD": "h6-mlflow-password-77c2e9",
    "AZURE_STORAGE_KEY": "h6-azure-key-0b3d5f",
    "HF_TOKEN": "hf_h6tokenQ1w2e3r4t5",
}


@pytest.mark.parametrize("text, expected", [
    ("s3://AKIAKEY:h6secret@bucket/crawl/{00000..00009}.tar", "s3://***@bucket/crawl/{00000..00009}.tar"),
    ("https://user:pa%2Fss@mlflow.example.com:5000/api", "https://***@mlflow.example.com:5000/api"),
    ("gs://token@bucket/x", "gs://***@bucket/x"),
    ("input s3://k:s@b/x and out s3://k2:s2@b/y", "input s3://***@b/x and out s3://***@b/y"),
    ("s3://bucket/images/logo@2x.png", "s3://bucket/images/logo@2x.png"),
    ("/data/crawl/train", "/data/crawl/train"),
    ("file:///data/crawl", "file:///data/crawl"),
])
def test_redact_strips_userinfo_from_urls(text, expected):
    assert tracking.redact(text) == expected


def test_parent_run_records_urls_without_userinfo(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TLDR_MLFLOW_EXPERIMENT", "safety")
    monkeypatch.delenv("TLDR_RUN_KEY", raising=False)
    io = StageIO(input="s3://AKIAKEY:h6-input-secret@bucket/crawl", out="s3://AKIAKEY:h6-out-secret@bucket/run")
    run_id = tracking.parent_run_id(load_config(), io)
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    recorded = json.dumps([run.data.tags, run.data.params, run.info.run_name])
    assert "h6-input-secret" not in recorded and "h6-out-secret" not in recorded
    assert run.data.tags["tldr.input"] == "s3://***@bucket/crawl" and run.data.params["sample.ratio"] == "0.25"


def _assignments(out: Path, n: int = 120) -> None:
    path = out / "cluster" / "assignments.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"key": [f"{i:07d}" for i in range(n)], "shard": ["00000"] * n,
                             "cluster": np.arange(n, dtype=np.int32) % 4, "distance": np.zeros(n, np.float32),
                             "loss": np.ones(n, np.float32)}), path)
    (path.parent / "stats.json").write_text("{}")  # cluster's done marker: what `sample` waits for


def test_credentials_in_the_environment_are_never_logged(tmp_path, random_captioner):
    """A real stage run with cloud and MLflow credentials in its environment: the secrets appear
    in none of its output, its MLflow store or any file it wrote."""
    out = tmp_path / "run"
    _assignments(out)
    shutil.copytree(random_captioner, out / "captioner")  # train-captioner's output: `sample` reads its folds
    (tmp_path / "crawl").mkdir()
    (tmp_path / "crawl" / "00000.tar").write_bytes(b"")  # sample reads the assignments, not the shards
    # img2dataset's stats beside it: the executor's preflight counts the crawl's samples from them
    (tmp_path / "crawl" / "00000_stats.json").write_text('{"successes": 120}')
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "TLDR_RUN_KEY"}
    # The username is no secret: MLflow records it as the runs' owner (tag mlflow.user), by design.
    env.update(SECRETS, MLFLOW_TRACKING_USERNAME="h6-user", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               TLDR_MLFLOW_EXPERIMENT="safety", AIRFLOW_CTX_DAG_ID="h6-visible-dag-id")
    command = [str(Path(sys.executable).with_name("tldr-vlp")), "run", "sample", "--input", str(tmp_path / "crawl"),
               "--out", str(out), "--set", "sample.ratio=0.25",
               "--set", "sample.strategy=balanced", "--set", "sample.filter=none"]  # from the assignments alone
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["metrics"]["kept"] == 30

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("safety").experiment_id])
    assert {r.data.tags.get("tldr.stage") for r in runs} >= {"sample"}
    recorded = json.dumps([[r.data.params, r.data.tags, r.data.metrics, r.info.run_name] for r in runs])
    assert "h6-visible-dag-id" in recorded and "sample.ratio" in recorded  # the check is not vacuous
    streams = done.stdout + done.stderr
    written = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # MLflow db, outputs, artifacts
    assert any(p.name == "mlflow.db" for p in written) and any(p.name == "selected.parquet" for p in written)
    for name, secret in SECRETS.items():
        assert secret not in recorded, f"{name} recorded in MLflow"
        assert secret not in streams, f"{name} printed by the stage"
        leaked = [str(p) for p, data in written.items() if secret.encode() in data]
        assert not leaked, f"{name} written to {leaked}"


def test_the_manifest_names_its_input_without_credentials(tmp_path):
    """The manifest travels with the compressed data: an input URL's userinfo must not."""
    import fsspec
    from PIL import Image

    from tldr_tasks.data.shards import ShardWriter, encode_json
    from tldr_tasks.stages import caption, materialize

    # fsspec's in-memory filesystem takes `AKIAKEY:secret@bucket/...` as a plain path, so the URL
    # below resolves without any network while carrying userinfo like a real s3:// URL would.
    bucket = f"AKIAKEY:h6-manifest-secret@{tmp_path.name}"
    crawl = f"memory://{bucket}/crawl"
    out = tmp_path / "run"
    tables = {"cluster/assignments.parquet": [{"key": f"{i:04d}", "shard": "00000", "cluster": 0, "distance": 0.0,
                                               "loss": 1.0} for i in range(4)],
              "cluster/rejects.parquet": [{"key": "0009", "shard": "00000", "reason": "undecodable image"}],
              "sample/selected.parquet": [{"key": "0001", "shard": "00000", "cluster": 0}]}
    for name, rows in tables.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / name)
    buffer = BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buffer, format="PNG")
    try:
        with ShardWriter(crawl, shard_size=4) as writer:
            for i in range(4):
                writer.write(f"{i:04d}", {"png": buffer.getvalue(), "txt": b"caption", "json": encode_json({})})
        io = StageIO(input=crawl, out=str(out))
        part = Path(caption.output_url(io, "00000"))  # named by the shard's content
        part.parent.mkdir(parents=True, exist_ok=True)
        row = {"key": "0001", "original": "caption", "generated": "a red square"}
        pq.write_table(pa.Table.from_pylist([row]), part)
        result = materialize.run(load_config(), io)
    finally:
        fsspec.filesystem("memory").rm(bucket, recursive=True)
    assert result.metrics["kept"] == 1
    manifest = (out / "shards" / "manifest.json").read_text()
    assert "h6-manifest-secret" not in manifest
    assert json.loads(manifest)["input"] == f"memory://***@{tmp_path.name}/crawl"
