"""
### tldr_compress: TL;DR data reduction of an image-text crawl

Compresses a WebDataset crawl into a small, better-aligned pretraining set (Wang et al., ICCV 2023):
train the codebook captioner, embed every image, k-means, sample inside every cluster, caption the
kept images, write the compressed shards; optionally evaluate full vs compressed vs random.

**Trigger** from the form (every field has a description) or the CLI:
`airflow dags trigger tldr_compress -c '{"input_url": "/data/crawl", "ratio": 0.25, "runner": "local"}'`.
The `runner` picks where stages run: `local` (on the Airflow worker) or `kubernetes` (one pod per
stage, GPU limits, the stage image from the `tldr_kubernetes` config).

**Schedule**: runs when `tldr_ingest` registers a new crawl version (Asset `tldr_crawl`) or a person
triggers it; never by the clock (unpausing starts nothing). A conf key the form does not have is refused
by `plan`, its first act.
A captioner with the run's parameters under the output root is reused (retrained when the form
asks or the crawl has grown past the set share), and the per-shard embeddings are keyed by
captioner version, so a recompression embeds only the new shards.

**Outcome**: the `publish` task's XCom holds the output URL, the captioner, the MLflow run id and
the metrics; the MLflow parent run ends FINISHED (or FAILED when a task fails for good), and every
stage's nested run carries this run's id as a tag.
"""

import os
import sys

# The dag-processor puts the dags folder on sys.path; `airflow dags ... --local` does not.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from tldr_dagkit.compress import build_compress_dag  # noqa: E402

dag = build_compress_dag(dag_id=__file__.rsplit("/", 1)[-1].removesuffix(".py"), doc_md=__doc__)
