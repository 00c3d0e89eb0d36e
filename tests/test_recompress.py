"""Content-addressed increments: a second crawl's 00000.tar, landed under the old name, is ingested as a
new crawl version, embedded again (reported `replaced`) and changes the output; the first version
stays retrievable with DVC."""

import shutil
from pathlib import Path

import pytest
from tldr_dagkit.crawl_registry import checkout_version, new_shards, register

from tldr_tasks import content
from tldr_tasks.config import CrawlConfig, load_config
from tldr_tasks.contract import StageIO
from tldr_tasks.data.synthetic import make_crawl
from tldr_tasks.runner import compress
from tldr_tasks.stages import embed

TINY = ["captioner.epochs=1", "captioner.image_size=32", "captioner.batch_size=32", "caption.num_beams=1",
        "caption.max_new_tokens=12", "materialize.shard_size=20", "cluster.clusters=4", "sample.ratio=0.3"]


def _crawl(folder: Path, seed: int) -> Path:
    """One 100-sample shard, train/00000.tar; another seed gives the same keys with other images and captions."""
    make_crawl(str(folder), CrawlConfig(samples=100, eval_samples=10, image_size=32, prototypes=20,
                                        shard_size=100), seed=seed)
    return folder / "train" / "00000.tar"


def _land(tar: Path, landing: Path) -> None:
    landing.mkdir(exist_ok=True)
    for f in tar.parent.glob(tar.stem + "*"):  # the tar and its img2dataset sidecars
        shutil.copy(f, landing / f.name)


def _shard_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))]


@pytest.mark.slow
def test_a_relanded_shard_is_embedded_again_reported_replaced_and_changes_the_output(tmp_path, mlflow_store):
    first_tar, second_tar = _crawl(tmp_path / "crawl-a", 0), _crawl(tmp_path / "crawl-b", 1)
    landing, repo, remote = tmp_path / "landing", tmp_path / "data-repo", tmp_path / "dvc-remote"
    cfg = load_config(None, TINY)
    cache = str(tmp_path / "embed-cache")  # shared by the runs, as tldr_compress shares <root>/embed

    _land(first_tar, landing)
    v1 = register(new_shards(str(landing), str(repo), 0), str(repo), str(remote))
    run1 = StageIO(input=v1["url"], out=str(tmp_path / "run1"), embed_cache=cache)
    first = compress(cfg, run1)
    assert first["results"]["embed"]["shards_embedded"] == 1
    assert embed.shard_status(run1)["00000"]["status"] == "embedded"

    _land(second_tar, landing)
    v2 = register(new_shards(str(landing), str(repo), 0), str(repo), str(remote))
    assert v2["replaced_shards"] == ["00000.tar"] and v2["version"] != v1["version"]
    # the captioner is shared too, so only the shard's content decides whether it is embedded again
    run2 = StageIO(input=v2["url"], out=str(tmp_path / "run2"), embed_cache=cache,
                   captioner=str(tmp_path / "run1" / "captioner"))
    second = compress(cfg, run2)
    metrics = second["results"]["embed"]
    assert (metrics["shards_embedded"], metrics["shards_replaced"], metrics["shards_reused"]) == (1, 1, 0)
    status = embed.shard_status(run2)["00000"]
    assert status["status"] == "replaced" and status["digest"] == content.file_md5(str(second_tar))
    assert status["replaced_digests"] == [content.file_md5(str(first_tar))]
    assert _shard_bytes(tmp_path / "run2") != _shard_bytes(tmp_path / "run1")
    # the first crawl version is still there, byte for byte
    old = checkout_version(str(repo), v1["version"])
    assert (old / "00000.tar").read_bytes() == first_tar.read_bytes()
