"""tldr_ingest: landed shards -> DVC crawl versions -> Asset event; recompression embeds only new shards."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from test_airflow_e2e import migrated_db  # noqa: E402,F401  (fixture: the session's migrated Airflow DB)
from tldr_dagkit.crawl_registry import checkout_version, landed_shards, new_shards, register  # noqa: E402


def land(landing: Path, name: str, stats: bool = True, payload: bytes = b"") -> None:
    landing.mkdir(parents=True, exist_ok=True)
    (landing / f"{name}.tar").write_bytes(payload or f"tar {name}".encode())
    (landing / f"{name}.parquet").write_bytes(b"parquet " + name.encode())
    if stats:
        (landing / f"{name}_stats.json").write_text(json.dumps({"count": 1}))


def test_landed_means_stats_written_or_settled(tmp_path):
    landing = tmp_path / "landing"
    assert landed_shards(str(landing)) == []  # no folder yet: nothing, no error
    land(landing, "00000")
    land(landing, "00001", stats=False)  # still being written, as far as we can tell
    (landing / "notes.txt").write_text("not a shard")
    assert [Path(u).name for u in landed_shards(str(landing), settle_seconds=60)] == ["00000.tar"]
    assert [Path(u).name for u in landed_shards(str(landing), settle_seconds=60, now=time.time() + 61)] == \
        ["00000.tar", "00001.tar"]
    assert len(landed_shards(str(landing), settle_seconds=0)) == 2


def test_register_versions_with_dvc(tmp_path):
    landing, repo, remote = tmp_path / "landing", tmp_path / "repo", tmp_path / "remote"
    land(landing, "00000")
    land(landing, "00001")
    first = register(new_shards(str(landing), str(repo), 0), str(repo), str(remote))
    assert re.fullmatch(r"[0-9a-f]{32}", first["version"])
    assert first["shards"] == 2 and first["new_shards"] == ["00000.tar", "00001.tar"]
    assert first["url"] == str(repo / "crawl")
    assert sorted(p.name for p in (repo / "crawl").iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push stored nothing in the remote"
    assert new_shards(str(landing), str(repo), 0) == []  # registered shards are not new any more

    land(landing, "00002", payload=b"a new shard")
    second = register(new_shards(str(landing), str(repo), 0), str(repo), str(remote))
    assert second["new_shards"] == ["00002.tar"] and second["shards"] == 3
    assert second["version"] != first["version"]
    versions = [json.loads(line) for line in (repo / "versions.jsonl").read_text().splitlines()]
    assert [v["version"] for v in versions] == [first["version"], second["version"]]
    # Registering the same content again gives the same version: the md5 is the crawl's identity.
    third = register([], str(repo), str(remote))
    assert third["version"] == second["version"]


def test_a_relanded_name_with_new_content_is_a_new_version_and_the_old_one_stays_retrievable(tmp_path):
    landing, repo, remote = tmp_path / "landing", tmp_path / "repo", tmp_path / "remote"
    land(landing, "00000", payload=b"first crawl, shard 0")
    land(landing, "00001", payload=b"first crawl, shard 1")
    first = register(new_shards(str(landing), str(repo), 0), str(repo), str(remote))
    assert first["replaced_shards"] == []
    # the same bytes copied again (a new mtime): read, recognised, not new
    land(landing, "00001", payload=b"first crawl, shard 1")
    assert new_shards(str(landing), str(repo), 0) == []
    # a second crawl numbers its shards from 00000 again
    land(landing, "00000", payload=b"second crawl, shard 0")
    assert [Path(u).name for u in new_shards(str(landing), str(repo), 0)] == ["00000.tar"]
    second = register(new_shards(str(landing), str(repo), 0), str(repo), str(remote))
    assert second["new_shards"] == ["00000.tar"] and second["replaced_shards"] == ["00000.tar"]
    assert second["version"] != first["version"] and second["shards"] == 2
    assert (repo / "crawl" / "00000.tar").read_bytes() == b"second crawl, shard 0"
    assert new_shards(str(landing), str(repo), 0) == []
    # the first version from DVC, also with the local cache gone (pulled from the remote)
    shutil.rmtree(repo / ".dvc" / "cache")
    old = checkout_version(str(repo), first["version"])
    assert (old / "00000.tar").read_bytes() == b"first crawl, shard 0"
    assert (old / "00001.tar").read_bytes() == b"first crawl, shard 1"


def test_ingest_dag_shape():
    from tldr_dagkit.compress import CRAWL_ASSET
    from tldr_dagkit.ingest import build_ingest_dag

    dag = build_ingest_dag("tldr_ingest", "doc")
    find, reg = dag.task_dict["find_new_shards"], dag.task_dict["register_version"]
    assert type(find).__name__ == "_ShortCircuitDecoratedOperator"
    assert reg.upstream_task_ids == {"find_new_shards"} and CRAWL_ASSET in reg.outlets
    assert dag.params["landing_url"].endswith("landing")
    assert all(t.retries >= 2 for t in dag.tasks)


@pytest.mark.slow
@pytest.mark.usefixtures("migrated_db")
def test_ingest_then_recompress_embeds_only_new_shards(tmp_path):
    from test_airflow_e2e import TINY_CONF, airflow_env, dags_test, latest

    from tldr_tasks.config import CrawlConfig
    from tldr_tasks.data.synthetic import make_crawl

    crawl = tmp_path / "crawl"
    make_crawl(str(crawl), CrawlConfig(samples=200, eval_samples=20, image_size=32, prototypes=40,
                                       shard_size=50), seed=0)
    shards = sorted((crawl / "train").glob("*.tar"))
    assert len(shards) == 4
    data_root = tmp_path / "data"
    env = airflow_env(data_root)
    landing = data_root / "landing"
    landing.mkdir(parents=True)

    def land_shards(paths):
        for tar in paths:
            for f in tar.parent.glob(tar.stem + "*"):  # the tar and its img2dataset sidecars
                shutil.copy(f, landing / f.name)

    # The crawl doubles below; a higher growth limit keeps the captioner, so reuse is down to the embed cache.
    conf = {**TINY_CONF, "output_url": str(data_root / "compressed"), "captioner_max_growth": 2.0}
    land_shards(shards[:2])
    dags_test("tldr_ingest", {"settle_seconds": 0}, env)
    _, first = latest("tldr_ingest", "register_version")
    assert first["shards"] == 2 and first["url"] == str(data_root / "data-repo" / "crawl")
    assert asset_event_versions()[-1] == first["version"]
    dags_test("tldr_compress", conf, env)
    _, summary = latest("tldr_compress", "publish")
    assert summary["input"] == first["url"]
    assert summary["embed"] == {"shards_embedded": 2, "shards_reused": 0, "shards_replaced": 0}

    land_shards(shards[2:])
    dags_test("tldr_ingest", {"settle_seconds": 0}, env)
    _, second = latest("tldr_ingest", "register_version")
    assert second["shards"] == 4 and second["new_shards"] == ["00002.tar", "00003.tar"]
    assert second["version"] != first["version"]
    assert asset_event_versions()[-1] == second["version"]
    dags_test("tldr_compress", conf, env)
    _, summary = latest("tldr_compress", "publish")
    assert summary["embed"] == {"shards_embedded": 2, "shards_reused": 2, "shards_replaced": 0}
    assert summary["metrics"]["input_samples"] == 200


def asset_event_versions() -> list[str]:
    """Versions carried by the tldr_crawl Asset events, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                  .filter(AssetModel.name == "tldr_crawl").order_by(AssetEvent.id).all())
        return [e.extra.get("version") for e in events]
