"""The ordered stage list with resources: the one source of truth for the local runner, the
Airflow DAGs and dvc.yaml. Imports nothing heavy and no stage code (it names each stage's module;
the executor, `tldr_tasks.runner`, loads it), so DAG parsing stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from tldr_tasks import storage
from tldr_tasks.contract import Resources, StageIO


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    Attributes:
        name: the CLI name: `tldr-vlp run <name>`.
        module: the module under tldr_tasks.stages with `run(cfg, io, ...) -> StageResult`.
        resources: what one worker needs.
        sharded: takes --shard-index/--num-shards; a cluster runs one worker per shard group.
        deps: stages whose outputs it reads.
        params: the params.yaml sections it depends on (dvc.yaml mirrors them).
        optional: only runs when asked for (the evaluation).
        output: the StageIO property naming the folder it writes; its params record lives there.
        done_marker: the file under `output` written last once the whole stage is done; None for
            sharded stages, whose parts (one file per input shard) are each done on their own.
        keyed_output: `output` is shared between runs and its sub-folders are named by what made
            them (embed: `<captioner version>-<feature>`), so it needs no params record.
    """

    name: str
    module: str
    resources: Resources
    sharded: bool = False
    deps: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    optional: bool = False
    output: str = ""
    done_marker: str | None = None
    keyed_output: bool = False

    def output_dir(self, io: StageIO) -> str:
        return getattr(io, self.output)

    def is_done(self, io: StageIO) -> bool:
        """True when the done marker exists (stages without one decide part by part in `run`)."""
        return bool(self.done_marker) and storage.exists(storage.join(self.output_dir(io), self.done_marker))


STAGES: tuple[StageSpec, ...] = (
    # its DataLoader workers (captioner.loader_workers per rank) hand batches over in /dev/shm
    StageSpec("train-captioner", "train_captioner", Resources(cpus=8, memory_gb=32, gpus=1, shm_gb=2),
              params=("seed", "captioner"), output="captioner_dir", done_marker="COMPLETE"),
    StageSpec("embed", "embed", Resources(cpus=4, memory_gb=16, gpus=1), sharded=True,
              deps=("train-captioner",), params=("embed",), output="embed_dir", keyed_output=True),
    # k-means trains on a bounded sample; memory holds the crawl's keys, never its features
    StageSpec("kmeans", "kmeans", Resources(cpus=8, memory_gb=16, gpus=1),
              deps=("embed",), params=("seed", "cluster", "sample.ratio"), output="kmeans_dir",
              done_marker="stats.json"),
    # nearest centroid, one embed part at a time: memory does not grow with the crawl
    StageSpec("assign", "assign", Resources(cpus=4, memory_gb=4), sharded=True,
              deps=("kmeans",), params=("cluster",), output="assign_dir"),
    # streams the assign parts into one table and counts the clusters
    StageSpec("cluster", "cluster", Resources(cpus=2, memory_gb=4),
              deps=("assign",), output="cluster_dir", done_marker="stats.json"),
    # semdedup also reads the embed parts, which every cluster output was made from; the filter's repair
    # (sample.misaligned: repair) captions the pairs the filter drops, as the caption stage would
    StageSpec("sample", "sample", Resources(cpus=2, memory_gb=8),
              deps=("train-captioner", "cluster"),
              params=("seed", "sample", "caption.num_beams", "caption.min_new_tokens", "caption.max_new_tokens",
                      "caption.batch_size"),
              output="sample_dir", done_marker="stats.json"),
    StageSpec("caption", "caption", Resources(cpus=4, memory_gb=16, gpus=1), sharded=True,
              deps=("train-captioner", "sample"), params=("caption",), output="caption_dir"),
    StageSpec("materialize", "materialize", Resources(cpus=2, memory_gb=8),
              deps=("cluster", "sample", "caption"), params=("seed", "caption", "materialize"),
              output="shards_dir", done_marker="manifest.json"),
    # decodes the crawl, the compressed set and the held-out set to $TMPDIR: ~12 KB a 64-px image
    StageSpec("evaluate", "evaluate", Resources(cpus=8, memory_gb=32, gpus=1, scratch_gb=20),
              deps=("materialize",), params=("seed", "evaluate"), optional=True, output="evaluate_dir",
              done_marker="report.json"),
)

STAGE_NAMES = tuple(s.name for s in STAGES)
PARAMS_RECORD = "params.json"  # in a stage's output folder: the parameters its parts were made with


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def upstream(name: str) -> list[str]:
    """`name` and every stage it reads from, directly or not, in pipeline order."""
    needed, todo = set(), [name]
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += get_stage(stage).deps
    return [s for s in STAGE_NAMES if s in needed]


def stage_params(cfg, name: str) -> dict:
    """The parameters a stage's output depends on, its own and its upstream stages', as dotted keys
    (`{"sample.ratio": 0.25, "seed": 0, ...}`): what its params record holds and compares."""
    resolved = cfg.to_dict()
    out = {}
    for stage in upstream(name):
        for item in get_stage(stage).params:
            value = resolved
            for part in item.split("."):
                value = value[part]
            out.update({f"{item}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {item: value})
    return dict(sorted(out.items()))
