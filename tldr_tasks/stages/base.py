"""The stage contract shared by every stage, both runners and the DAG builder."""

from __future__ import annotations

from dataclasses import dataclass, field

from tldr_tasks import storage


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the Kubernetes runner turns it into pod requests/limits."""

    cpus: float = 1.0
    memory_gb: float = 2.0
    gpus: int = 0

    def __post_init__(self):
        if self.cpus <= 0 or self.memory_gb <= 0 or self.gpus < 0:
            raise ValueError(f"resources must be positive: {self}")


@dataclass
class StageIO:
    """Where a run reads and writes. Every field is an fsspec URL.

    Attributes:
        input: the crawl: brace pattern, glob or folder of WebDataset shards.
        out: the run folder; every stage writes only below it.
        eval_input: clean held-out shards for `evaluate` (the synthetic crawl writes them).
        captioner: a trained captioner folder to reuse instead of `out/captioner`.
        embed_cache: where per-shard embeddings live; shared between runs so recompression
            only embeds new shards. Defaults to `out/embed`.
    """

    input: str
    out: str
    eval_input: str | None = None
    captioner: str | None = None
    embed_cache: str | None = None

    @property
    def captioner_dir(self) -> str:
        return self.captioner or storage.join(self.out, "captioner")

    @property
    def embed_dir(self) -> str:
        return self.embed_cache or storage.join(self.out, "embed")

    @property
    def cluster_dir(self) -> str:
        return storage.join(self.out, "cluster")

    @property
    def sample_dir(self) -> str:
        return storage.join(self.out, "sample")

    @property
    def caption_dir(self) -> str:
        return storage.join(self.out, "caption")

    @property
    def shards_dir(self) -> str:
        return storage.join(self.out, "shards")

    @property
    def evaluate_dir(self) -> str:
        return storage.join(self.out, "evaluate")

    def input_shards(self) -> list[str]:
        return storage.expand_shards(self.input)


@dataclass
class StageResult:
    """What a stage reports: metrics (numbers, logged to MLflow) and the URLs it wrote."""

    metrics: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    skipped: bool = False  # True when every part was already done (a resumed run)


def my_parts(items: list, shard_index: int, num_shards: int) -> list:
    """The items worker `shard_index` of `num_shards` owns: every num_shards-th, so groups stay even."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards); got {shard_index} of {num_shards}")
    return items[shard_index::num_shards]
