"""
### tldr_ingest: register newly crawled shards as a DVC-versioned crawl

Every 10 minutes, looks for complete `.tar` shards in the landing folder (`landing_url`, local or
s3://) whose content is not registered yet (a new name, or a known name with other bytes: a second
crawl's `00000.tar`, listed as replaced), copies them into the DVC data repo's `crawl/` folder, runs
`dvc add crawl` and `dvc push` (the crawl folder's md5 is the version, logged in `versions.jsonl`),
and emits an event on the Asset `tldr_crawl` whose extra holds the version, URL and shard counts.
`tldr_compress` is scheduled on that Asset: it recompresses the whole crawl, reusing the captioner
and the embeddings of shard contents it has seen, so only new content is embedded.

Nothing new: the run stops after `find_new_shards` (skipped, not failed).

(An Airflow DAG file: the dag-processor only parses files that mention both words.)
"""

import os
import sys

# The dag-processor puts the dags folder on sys.path; `airflow dags ... --local` does not.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from tldr_dagkit.ingest import build_ingest_dag  # noqa: E402

dag = build_ingest_dag(dag_id=__file__.rsplit("/", 1)[-1].removesuffix(".py"), doc_md=__doc__)
