"""The stage contract: what a stage is given (`StageIO`: where to read and write), what it needs
(`Resources`) and what it reports (`StageResult`), with the small helpers every stage shares.

It sits below both the spec (`tldr_tasks.pipeline`, which the DAGs parse) and the stages, and knows
neither. A stage module has `run(cfg, io, ...) -> StageResult`; its contract is declared once in
`tldr_tasks.pipeline.STAGES`: where it writes (`StageSpec.output`), the file written last when the
whole stage is done (`done_marker`), and whether it is sharded into parts (one per input shard).
`tldr_tasks.runner.execute_stage` is the one way a stage runs, whoever orchestrates it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tldr_tasks import storage

TIMINGS_DIR = "timings"  # in the run folder: one {stage}[-i-of-n].json per stage part that did work


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the Kubernetes runner turns it into pod requests/limits and
    volumes.

    Attributes:
        shm_gb: shared memory (/dev/shm) for processes that pass tensors through it (DataLoader
            workers, NCCL); counted in `memory_gb`. 0: the container's own 64 MiB.
        scratch_gb: local disk for temporary files ($TMPDIR). 0: only /tmp, sized by the node.
    """

    cpus: float = 1.0
    memory_gb: float = 2.0
    gpus: int = 0
    shm_gb: float = 0.0
    scratch_gb: float = 0.0

    def __post_init__(self):
        if self.cpus <= 0 or self.memory_gb <= 0 or min(self.gpus, self.shm_gb, self.scratch_gb) < 0:
            raise ValueError(f"resources must be positive: {self}")
        if self.shm_gb >= self.memory_gb:
            raise ValueError(f"shm_gb is counted in memory_gb and must be smaller: {self}")


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
    def kmeans_dir(self) -> str:
        return storage.join(self.out, "kmeans")

    @property
    def assign_dir(self) -> str:
        return storage.join(self.out, "assign")

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


def numeric(stats: dict) -> dict[str, float]:
    """The numbers of a stats dict (booleans and strings left out): a StageResult's metrics."""
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def my_parts(items: list, shard_index: int, num_shards: int) -> list:
    """The items worker `shard_index` of `num_shards` owns: every num_shards-th, so groups stay even."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards); got {shard_index} of {num_shards}")
    return items[shard_index::num_shards]


def cpu_limit() -> int:
    """Cores this process may really use: the smaller of its CPU affinity (taskset, cpusets) and the
    cgroup CPU quota (`cpu.max`, a container's CPU limit), at least 1. A pod limited to 2 CPUs on a
    64-core node gets 2: more threads than that only wait on CFS throttling."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The tightest CPU limit on this process's cgroup and its parents, rounded down (cgroup v2
    `cpu.max`; v1 `cpu.cfs_quota_us`); None when unlimited or unknown."""
    try:
        own = next((line.split(":", 2)[2].strip() for line in Path(proc_cgroup).read_text().splitlines()
                    if line.startswith("0::")), "/")
    except OSError:
        own = "/"
    limits = []
    folder = Path(root, own.lstrip("/"))
    while True:  # v2: the process's own cgroup up to the root (a container sees its own as the root)
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]  # "200000 100000" or "max 100000"
            if quota != "max":
                limits.append(max(1, int(quota) // int(period)))
        except (OSError, ValueError):
            pass
        if folder == Path(root) or Path(root) not in folder.parents:
            break
        folder = folder.parent
    try:
        quota = int(Path(root, "cpu", "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        if quota > 0:
            limits.append(max(1, quota // int(Path(root, "cpu", "cpu.cfs_period_us").read_text())))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None
