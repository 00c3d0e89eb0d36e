"""The tldr_ingest DAG: landed crawl shards -> a new DVC crawl version -> Asset event -> tldr_compress."""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import DAG, CronTriggerTimetable, Param, task

from tldr_dagkit import settings
from tldr_dagkit.compress import CRAWL_ASSET


def ingest_params() -> dict[str, Param]:
    return {
        "landing_url": Param(settings.landing_url(), type="string", minLength=1, title="Landing URL",
                             description="Folder (local or s3://) where the crawler drops new .tar shards."),
        "data_repo": Param(settings.data_repo(), type="string", minLength=1, title="DVC data repo",
                           description="Local folder that versions the crawl with DVC (created if missing)."),
        "dvc_remote": Param(settings.dvc_remote(), type="string", minLength=1, title="DVC remote",
                            description="Where `dvc push` stores every crawl version (folder or s3://)."),
        "settle_seconds": Param(60, type="integer", minimum=0, title="Settle time (s)",
                                description="A shard without an img2dataset _stats.json counts as landed once "
                                            "unchanged this long."),
    }


def build_ingest_dag(dag_id: str, doc_md: str | None) -> DAG:
    with DAG(
        dag_id=dag_id,
        doc_md=doc_md,
        description="Register newly landed crawl shards as a DVC version; starts tldr_compress",
        schedule=CronTriggerTimetable(os.environ.get("TLDR_INGEST_CRON", "*/10 * * * *"), timezone="UTC"),
        start_date=None,
        catchup=False,
        max_active_runs=1,  # one writer of the data repo at a time
        default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
        params=ingest_params(),
        tags=["tldr-vlp", "ingest", "dvc"],
    ) as dag:

        @task.short_circuit
        def find_new_shards(params=None) -> list[str]:
            """Landed shards not registered yet; an empty list skips the rest of the run."""
            from tldr_dagkit.crawl_registry import new_shards

            found = new_shards(params["landing_url"], params["data_repo"], params["settle_seconds"])
            print(f"{len(found)} new shard(s) in {params['landing_url']}: {found[:20]}")
            return found

        @task(outlets=[CRAWL_ASSET], multiple_outputs=False)  # one XCom: the record, as the Asset event carries it
        def register_version(shards: list[str], params=None, outlet_events=None) -> dict:
            """Copy in, `dvc add` + `dvc push`; the Asset event carries the version to tldr_compress."""
            from tldr_dagkit.crawl_registry import register

            record = register(list(shards), params["data_repo"], params["dvc_remote"])
            print(f"crawl version {record['version']}: {record['shards']} shard(s), new {record['new_shards']}, "
                  f"of which replaced (a known name, other content) {record['replaced_shards']}")
            outlet_events[CRAWL_ASSET].extra = record
            return record

        register_version(find_new_shards())
    return dag
