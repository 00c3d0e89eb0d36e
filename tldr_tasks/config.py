"""Typed configuration: one section per stage, loaded from params.yaml plus `section.key=value`
overrides, validated before any work starts, and saved in full with every run and checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FEATURES = ("quantized_mean", "code_histogram", "cls", "code_index_pca")
KMEANS_INITS = ("kmeans++", "afk_mc2")
STRATEGIES = ("uniform", "balanced", "hard", "near_centroid", "far_centroid", "random", "clip_score", "semdedup")
ALIGNMENTS = ("cluster_pool", "global_pool", "rank", "none")
FUSIONS = ("mix", "generated", "concat", "original")
NOISE_MODES = ("iid", "correlated")
DEDUP_KEEPS = ("aligned", "central")
BUDGETS = ("compute", "epochs")
# oracle_clean needs the synthetic crawl's ground truth: the ceiling of a benchmark, not a product arm
ARMS = ("full", "tldr", "random", "random_generated", "oracle_clean")
PRECISIONS = ("fp32", "bf16", "bf16-autocast")  # bf16: bf16 weights; bf16-autocast: fp32 weights, bf16 math


class ConfigError(ValueError):
    """A parameter is wrong; the message says which and what to change."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class CrawlConfig:
    """The synthetic benchmark crawl (`tldr-vlp make-crawl`)."""

    samples: int = 8000
    eval_samples: int = 2000  # halved by key into a validation and a test split
    image_size: int = 64
    noise: float = 0.3  # share of captions that are web noise
    # iid: every noisy caption on its own; correlated: whole scenes share one wrong caption (shop
    # templates, consistent mislabels) beside per-sample near misses (data/synthetic.py)
    noise_mode: str = "iid"
    prototypes: int = 1500  # distinct scenes; popularity is Zipf-distributed
    zipf: float = 1.1
    shard_size: int = 1000

    def validate(self):
        _check(self.samples > 0 and self.eval_samples > 0, "crawl.samples and crawl.eval_samples must be > 0")
        _check(0.0 <= self.noise <= 1.0, f"crawl.noise={self.noise} must be in [0, 1]")
        _choice("crawl.noise_mode", self.noise_mode, NOISE_MODES)
        _check(self.image_size >= 16, f"crawl.image_size={self.image_size} must be >= 16")
        _check(self.prototypes > 0 and self.shard_size > 0, "crawl.prototypes and crawl.shard_size must be > 0")


@dataclass
class CaptionerConfig:
    """The codebook captioner: ViT encoder -> VQ codebook -> cross-attending text decoder."""

    preset: str = "tiny"  # models/model_configs/captioner-<preset>.json
    image_size: int = 64
    codebook_size: int = 512
    codebook_init: str = "keywords"  # "keywords" (frequent caption words) or "random"
    beta: float = 0.25  # commitment weight of the VQ loss
    max_tokens: int = 30  # captions are capped at 30 tokens (paper)
    vocab_size: int = 2000
    epochs: int = 6
    batch_size: int = 32  # global: split over the DeepSpeed ranks
    lr: float = 2e-3
    warmup_steps: int = 100
    zero_stage: int = 0
    precision: str = "fp32"
    checkpoint_every: int = 200  # optimizer steps between DeepSpeed checkpoints
    # Hugging Face folders (local or fsspec URLs) for the encoder (vit/deit) and/or the decoder
    # (gpt2/bert, whose tokenizer is then used); empty: random init.
    init_from: list = field(default_factory=list)
    # The data stream (tldr_tasks/data/stream.py): each global batch takes batch_size / data_streams
    # samples from each of data_streams contiguous parts of the crawl; a multiple of the rank count.
    data_streams: int = 8
    shuffle_buffer: int = 1000  # undecoded samples per stream (memory: this x streams x sample bytes)
    loader_workers: int = 2  # decoding processes per rank (at most data_streams / ranks are used)

    def validate(self):
        _choice("captioner.codebook_init", self.codebook_init, ("keywords", "random"))
        _choice("captioner.precision", self.precision, PRECISIONS)
        _check(self.zero_stage in (0, 1, 2, 3), f"captioner.zero_stage={self.zero_stage} must be 0..3")
        _check(self.epochs > 0 and self.batch_size > 0 and self.lr > 0, "captioner epochs/batch_size/lr must be > 0")
        _check(self.codebook_size > 1, "captioner.codebook_size must be > 1")
        _check(self.data_streams > 0 and self.batch_size % self.data_streams == 0,
               f"captioner.data_streams={self.data_streams} must divide captioner.batch_size={self.batch_size}")
        _check(self.shuffle_buffer > 0 and self.loader_workers >= 0,
               "captioner.shuffle_buffer must be > 0 and captioner.loader_workers >= 0")


@dataclass
class EmbedConfig:
    feature: str = "quantized_mean"
    batch_size: int = 256

    def validate(self):
        _choice("embed.feature", self.feature, FEATURES)


@dataclass
class ClusterConfig:
    clusters: int = 0  # 0: round(8 * sqrt(sample.ratio * samples)) (stages/cluster.py: cluster_count)
    niter: int = 20
    # seeding (stages/kmeans.py): kmeans++ (greedy, scikit-learn's) or afk_mc2 (faiss' MCMC approximation)
    init: str = "kmeans++"
    pca_dim: int = 256  # only for the code_index_pca feature (the released code's 256-d whitening)
    max_points_per_centroid: int = 256  # k-means trains on at most clusters * this many points
    assign_batch: int = 262144

    def validate(self):
        _check(self.clusters >= 0, f"cluster.clusters={self.clusters} must be >= 1, or 0 for the size rule")
        _check(self.niter >= 1, f"cluster.niter={self.niter} must be >= 1")
        _choice("cluster.init", self.init, KMEANS_INITS)


@dataclass
class SampleConfig:
    ratio: float = 0.25
    # Mean validation R@1 over the three benchmark crawls (benchmarks/results/benchmark_<crawl>.json,
    # chosen_on_validation): semdedup 7.20, clip_score 7.13, balanced + cluster_pool 7.07, a tie within the
    # seeds' spread. The benchmark's rule makes semdedup the default; that switch is not landed yet (README).
    strategy: str = "balanced"
    alignment: str = "cluster_pool"  # which pairs fill a cluster's quota (see stages/sample.py)
    aligned_share: float = 0.5  # the pool: this share of the better-aligned pairs (released code: half)
    # clip_score (DataComp's baseline): the pool is the top `score_share` of the pairs by CLIP image-text
    # cosine, from `clip_model` (a CLIP folder: Hugging Face CLIPModel or tldr-vlp's own) or, when
    # empty, from the crawl's own `similarity` (img2dataset --save_additional_columns, KEY.json)
    clip_model: str = ""
    score_share: float = 0.3
    dedup_images: bool = True  # clip_score: identical image bytes keep only their first key
    # semdedup: which of two near-duplicates ranks higher and stays (stages/sample.py)
    dedup_keep: str = "aligned"

    def validate(self):
        _check(0.0 < self.ratio <= 1.0, f"sample.ratio={self.ratio} must be in (0, 1], e.g. 0.25 keeps a quarter")
        _choice("sample.strategy", self.strategy, STRATEGIES)
        _choice("sample.alignment", self.alignment, ALIGNMENTS)
        _check(0.0 < self.aligned_share <= 1.0,
               f"sample.aligned_share={self.aligned_share} must be in (0, 1], e.g. 0.5 for the better half")
        _check(0.0 < self.score_share <= 1.0,
               f"sample.score_share={self.score_share} must be in (0, 1], e.g. 0.3 for DataComp's top 30%")
        _choice("sample.dedup_keep", self.dedup_keep, DEDUP_KEEPS)


@dataclass
class CaptionConfig:
    num_beams: int = 3
    min_new_tokens: int = 3
    max_new_tokens: int = 30
    batch_size: int = 128
    # See tldr_tasks/fusion.py. `original` ships the crawl's own captions: what the benchmark's selections
    # are measured with (benchmarks/results/benchmark_<crawl>.json); generated text is not yet shown to help.
    fusion: str = "original"
    # Generated text ships only above this mean token log-probability given the image, this grounding
    # (nats per token more than given another image), and only when the run's generated captions keep
    # this share of the originals' entropy (else: collapse). See tldr_tasks/fusion.py.
    min_confidence: float = -1.0
    min_grounding: float = 0.5
    min_entropy_ratio: float = 0.5

    def validate(self):
        _choice("caption.fusion", self.fusion, FUSIONS)
        _check(self.min_confidence <= 0.0, f"caption.min_confidence={self.min_confidence} is a log-probability: "
               "use a value <= 0 (e.g. -1.0); -inf disables the per-sample gate")
        _check(0.0 <= self.min_entropy_ratio <= 1.0,
               f"caption.min_entropy_ratio={self.min_entropy_ratio} must be in [0, 1] (0 disables the collapse check)")
        _check(self.num_beams >= 1, "caption.num_beams must be >= 1")
        _check(0 < self.min_new_tokens <= self.max_new_tokens, "caption needs 0 < min_new_tokens <= max_new_tokens")


@dataclass
class MaterializeConfig:
    shard_size: int = 1000

    def validate(self):
        _check(self.shard_size > 0, "materialize.shard_size must be > 0")


@dataclass
class EvaluateConfig:
    """Downstream check: the same tiny CLIP trained on full, TL;DR and random subsets."""

    preset: str = "tiny"  # models/model_configs/clip-<preset>.json
    # 5 epochs of the full set fix the compute-matched budget: 5 * ceil(8000 / 128) = 315 steps per arm.
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3  # a protocol setting shared by every arm, not tuned per arm
    arms: list[str] = field(default_factory=lambda: ["full", "tldr", "random"])
    # compute: every arm evaluate.epochs of the full crawl's steps (DataComp); epochs: every arm
    # evaluate.epochs of its own data (the paper's protocol; a quarter-size arm trains a quarter as long)
    budgets: list[str] = field(default_factory=lambda: ["compute"])
    # The learning curve: every arm is also scored after these shares of its steps.
    curve_points: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 0.75])

    def validate(self):
        for arm in self.arms:
            _check(arm in ARMS or arm.startswith("tldr_"),
                   f"evaluate.arms: unknown arm {arm!r} ({', '.join(ARMS)} or tldr_<fusion>)")
        _check(bool(self.budgets), "evaluate.budgets needs at least one of " + ", ".join(BUDGETS))
        for budget in self.budgets:
            _choice("evaluate.budgets", budget, BUDGETS)
        for point in self.curve_points:
            _check(0.0 < point < 1.0, f"evaluate.curve_points: {point} must be a share of the steps in (0, 1)")


@dataclass
class Config:
    seed: int = 0
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    materialize: MaterializeConfig = field(default_factory=MaterializeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short, stable digest of the resolved config (goes into manifests and checkpoints)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, refusing unknown sections and keys by name."""
    cfg = Config()
    for section_name, values in (data or {}).items():
        if section_name == "seed":
            cfg.seed = int(values)
            continue
        _check(hasattr(cfg, section_name) and isinstance(values, dict),
               f"unknown params section {section_name!r}; known: "
               + ", ".join(f.name for f in dataclasses.fields(Config)))
        section = getattr(cfg, section_name)
        known = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            _check(key in known, f"unknown parameter {section_name}.{key}; known: {', '.join(known)}")
            setattr(section, key, _coerce(f"{section_name}.{key}", value, getattr(section, key)))
    return cfg


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Cast `value` to the type of the default so 'ratio=0.3' from a CLI becomes a float."""
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            return list(value) if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {type(default).__name__}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['sample.ratio=0.3', 'seed=1'] -> {'sample': {'ratio': 0.3}, 'seed': 1}."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        _check("=" in item, f"override {item!r} must look like section.key=value (e.g. sample.ratio=0.3)")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if "." not in dotted:
            nested[dotted] = value
            continue
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def load_config(params_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- params.yaml <- overrides, validated. `params_path=None` means the built-in defaults
    (the repository's params.yaml holds the same values; a test keeps them equal)."""
    data = {}
    if params_path:
        path = Path(params_path)
        _check(path.exists(), f"params file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    return from_dict(_merge(data, parse_overrides(overrides or []))).validate()
