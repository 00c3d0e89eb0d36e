"""The ordered stage list with resources: the one source of truth for the local runner, the
Airflow DAGs and dvc.yaml. Imports nothing heavy, so DAG parsing stays fast."""

from __future__ import annotations

from dataclasses import dataclass

from tldr_tasks.stages.base import Resources


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    Attributes:
        name: the CLI name: `tldr-vlp run <name>`.
        module: the module under tldr_tasks.stages with `run(cfg, io, ...)` and `main(argv)`.
        resources: what one worker needs.
        sharded: takes --shard-index/--num-shards; a cluster runs one worker per shard group.
        deps: stages whose outputs it reads.
        params: the params.yaml sections it depends on (dvc.yaml mirrors them).
        optional: only runs when asked for (the evaluation).
    """

    name: str
    module: str
    resources: Resources
    sharded: bool = False
    deps: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    optional: bool = False


STAGES: tuple[StageSpec, ...] = (
    StageSpec("train-captioner", "train_captioner", Resources(cpus=8, memory_gb=32, gpus=1),
              params=("seed", "captioner")),
    StageSpec("embed", "embed", Resources(cpus=4, memory_gb=16, gpus=1), sharded=True,
              deps=("train-captioner",), params=("embed",)),
    StageSpec("cluster", "cluster", Resources(cpus=8, memory_gb=32, gpus=1),
              deps=("embed",), params=("seed", "cluster")),
    StageSpec("sample", "sample", Resources(cpus=2, memory_gb=8),
              deps=("cluster",), params=("seed", "sample")),
    StageSpec("caption", "caption", Resources(cpus=4, memory_gb=16, gpus=1), sharded=True,
              deps=("train-captioner", "sample"), params=("caption",)),
    StageSpec("materialize", "materialize", Resources(cpus=2, memory_gb=8),
              deps=("cluster", "sample", "caption"), params=("caption.fusion", "materialize")),
    StageSpec("evaluate", "evaluate", Resources(cpus=8, memory_gb=32, gpus=1),
              deps=("materialize",), params=("seed", "evaluate"), optional=True),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def load_stage_module(name: str):
    """Import the stage module lazily: its heavy imports load only when it runs."""
    import importlib

    return importlib.import_module(f"tldr_tasks.stages.{get_stage(name).module}")
