"""Typed configuration: one section per stage, loaded from params.yaml plus `section.key=value`
overrides, validated before any work starts, and saved in full with every run and checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FEATURES = ("quantized_mean", "code_histogram", "cls", "code_index_pca", "tower")
KMEANS_INITS = ("kmeans++", "afk_mc2")
STRATEGIES = ("uniform", "balanced", "hard", "near_centroid", "far_centroid", "random", "clip_score", "semdedup")
ALIGNMENTS = ("cluster_pool", "global_pool", "rank", "none")
FILTERS = ("none", "clip_score")
FILTERED_STRATEGIES = ("uniform", "balanced", "semdedup")  # the coverage rules that run inside a filter
FUSIONS = ("mix", "generated", "concat", "original")
NOISE_MODES = ("iid", "correlated", "incomplete")
DEDUP_KEEPS = ("aligned", "central")
MISALIGNED = ("drop", "repair")
BUDGETS = ("compute", "epochs")
# oracle_clean needs the synthetic crawl's ground truth: the ceiling of a benchmark, not a product arm
ARMS = ("full", "tldr", "random", "random_generated", "oracle_clean")
PRECISIONS = ("fp32", "bf16", "bf16-autocast")  # bf16: bf16 weights; bf16-autocast: fp32 weights, bf16 math
AUTO = "auto"  # sample.ratio: the smallest ratio of the ratio curve that holds the full crawl's proxy score
# A carved validation split smaller than this ranks too few candidates for the curve's retrieval to tell
# ratios apart (R@1 among 100 pairs: 1% by chance, and one pair moves it by a point); the curve and `auto` are
# refused below it.
MIN_HOLDOUT = 100


MODEL_CONFIGS = Path(__file__).parent / "models" / "model_configs"  # <kind>-<preset>.json size presets


class ConfigError(ValueError):
    """A parameter is wrong; the message says which and what to change."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r} is not known (use one of {', '.join(choices)})")


def presets(kind: str) -> tuple[str, ...]:
    """The size presets `models/model_configs/<kind>-<name>.json` that exist ("captioner", "clip")."""
    return tuple(sorted(p.stem.removeprefix(f"{kind}-") for p in MODEL_CONFIGS.glob(f"{kind}-*.json")))


PRESET_PARAMS = {"captioner": "captioner.preset", "clip": "evaluate.preset"}  # the parameter naming each kind


def load_preset(kind: str, name: str) -> dict:
    """The size preset `models/model_configs/<kind>-<name>.json`; ConfigError naming the existing ones."""
    _choice(PRESET_PARAMS[kind], name, presets(kind))
    return json.loads((MODEL_CONFIGS / f"{kind}-{name}.json").read_text())


# Every numeric parameter's range, by name: (lowest, highest, open at the low end). A test keeps this
# table complete, so a new parameter cannot skip its range check.
RANGES: dict[str, tuple[float, float, bool]] = {
    "seed": (0, math.inf, False),
    "crawl.samples": (1, math.inf, False),
    "crawl.eval_samples": (2, math.inf, False),  # halved into a validation and a test split
    "crawl.image_size": (16, math.inf, False),
    "crawl.noise": (0, 1, False),
    "crawl.prototypes": (1, math.inf, False),
    "crawl.zipf": (0, math.inf, False),
    "crawl.shard_size": (1, math.inf, False),
    "captioner.image_size": (1, math.inf, False),
    "captioner.codebook_size": (2, math.inf, False),
    "captioner.beta": (0, math.inf, False),
    "captioner.max_tokens": (1, math.inf, False),
    "captioner.vocab_size": (1, math.inf, False),  # the tokenizer keeps at least its 300 base symbols
    "captioner.epochs": (1, math.inf, False),
    "captioner.batch_size": (1, math.inf, False),
    "captioner.lr": (0, math.inf, True),
    "captioner.warmup_steps": (0, math.inf, False),
    "captioner.zero_stage": (0, 3, False),
    "captioner.checkpoint_every": (1, math.inf, False),
    "captioner.data_streams": (1, math.inf, False),
    "captioner.shuffle_buffer": (1, math.inf, False),
    "captioner.loader_workers": (0, math.inf, False),
    "captioner.folds": (1, math.inf, False),
    "embed.batch_size": (1, math.inf, False),
    "cluster.clusters": (0, math.inf, False),  # 0: the size rule
    "cluster.niter": (1, math.inf, False),
    "cluster.pca_dim": (1, math.inf, False),
    "cluster.max_points_per_centroid": (1, math.inf, False),
    "cluster.assign_batch": (1, math.inf, False),
    "sample.ratio": (0, 1, True),
    "sample.aligned_share": (0, 1, True),
    "sample.score_share": (0, 1, True),
    "sample.filter_share": (0, 1, True),
    "sample.curve_seeds": (1, math.inf, False),
    "sample.auto_tolerance": (0, 1, True),
    "sample.holdout_share": (0, 0.5, True),  # at least half the crawl stays to select from
    "sample.holdout_max": (1, math.inf, False),
    "caption.num_beams": (1, math.inf, False),
    "caption.min_new_tokens": (1, math.inf, False),
    "caption.max_new_tokens": (1, math.inf, False),
    "caption.batch_size": (1, math.inf, False),
    "caption.min_confidence": (-math.inf, 0, False),  # a log-probability; -inf disables the gate
    "caption.min_grounding": (-math.inf, math.inf, False),  # nats per token; -inf disables the gate
    "caption.min_entropy_ratio": (0, 1, False),
    "materialize.shard_size": (1, math.inf, False),
    "evaluate.epochs": (1, math.inf, False),
    "evaluate.batch_size": (1, math.inf, False),
    "evaluate.lr": (0, math.inf, True),
}


def _in_range(name: str, value: float) -> None:
    low, high, open_low = RANGES[name]
    ok = (low < value if open_low else low <= value) and value <= high  # NaN fails both
    bounds = (f"in {'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf
              else f"{'>' if open_low else '>='} {low:g}")
    _check(ok, f"{name}={value!r} is out of range (use a value {bounds})")


@dataclass
class CrawlConfig:
    """The synthetic benchmark crawl (`tldr-vlp make-crawl`)."""

    samples: int = 8000
    eval_samples: int = 2000  # halved by key into a validation and a test split
    image_size: int = 64
    noise: float = 0.3  # share of captions that are web noise
    # iid: every noisy caption on its own; correlated: whole scenes share one wrong caption (shop
    # templates, consistent mislabels) beside per-sample near misses; incomplete: captions naming only
    # part of the image (some objects, the background, a product name) (data/synthetic.py)
    noise_mode: str = "iid"
    prototypes: int = 1500  # distinct scenes; popularity is Zipf-distributed
    zipf: float = 1.1
    shard_size: int = 1000

    def validate(self):
        # make-crawl validates this section alone, without a Config around it
        for key, value in dataclasses.asdict(self).items():
            if f"crawl.{key}" in RANGES:
                _in_range(f"crawl.{key}", value)
        _choice("crawl.noise_mode", self.noise_mode, NOISE_MODES)


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
    # Cross-fitting (tldr_tasks/folds.py): K captioners, each trained without one fold of the crawl,
    # score and caption that fold, so no sample is scored or captioned by a captioner that trained on it.
    # Fold 0's captioner is the exported one whose codebook gives every sample its clustering feature.
    # 1: one captioner trained on everything (scores and captions its own training data).
    folds: int = 2

    def validate(self):
        _choice("captioner.codebook_init", self.codebook_init, ("keywords", "random"))
        _choice("captioner.precision", self.precision, PRECISIONS)
        _check(self.batch_size % self.data_streams == 0,
               f"captioner.data_streams={self.data_streams} does not divide captioner.batch_size={self.batch_size} "
               "(use a divisor of the batch size)")
        # a pretrained encoder (init_from) brings its own patch size, checked when it is loaded
        stride = image_stride(load_preset("captioner", self.preset))
        _check(bool(self.init_from) or self.image_size % stride == 0,
               f"captioner.image_size={self.image_size} does not fit preset {self.preset!r} (use a multiple of "
               f"{stride}, its patch size in pixels)")


def image_stride(preset: dict) -> int:
    """Pixels per image token of a captioner preset: a pretrained tower's grid cell (EfficientNet: 32), or the
    ViT's patch times the conv stem's downsampling."""
    if preset.get("image_tower"):
        return 32
    return preset["vision"]["patch_size"] * 2 ** len(preset.get("stem_channels", []))


@dataclass
class EmbedConfig:
    # `tower`: what the protocol's runs clustered on (tldr_tasks/protocol.py PROFILE), so what ships is what
    # was evaluated; the codebook features (the paper's `quantized_mean`, ...) stay a choice
    feature: str = "tower"
    batch_size: int = 256

    def validate(self):
        _choice("embed.feature", self.feature, FEATURES)


@dataclass
class ClusterConfig:
    clusters: int = 0  # 0: round(8 * sqrt(sample.ratio * samples)) (stages/kmeans.py: cluster_count)
    niter: int = 20
    # seeding (stages/kmeans.py): afk_mc2 (faiss' MCMC approximation of k-means++) or kmeans++ (greedy,
    # scikit-learn's: an objective within 4.5% of scikit-learn's, benchmarks/results/side_by_side.json).
    # afk_mc2 stays the default: chosen on validation, the default selection's mean R@1 over the three
    # crawls is 7.20 with it and 7.14 with kmeans++ (benchmarks/results/kmeans_init.json).
    init: str = "afk_mc2"
    pca_dim: int = 256  # only for the code_index_pca feature (the released code's 256-d whitening)
    max_points_per_centroid: int = 256  # k-means trains on at most clusters * this many points
    assign_batch: int = 262144

    def validate(self):
        _choice("cluster.init", self.init, KMEANS_INITS)


@dataclass
class SampleConfig:
    # A share in (0, 1], or `auto`: the ratio curve's choice (tldr_tasks/curve.py)
    ratio: float | str = 0.25
    # The default is docs/protocol.md's rule on its selection seeds (benchmarks/results/protocol_choices.json):
    # no candidate was eligible (on the correlated crawl none ships 5 points less noise than random), so
    # section 4 step 6 keeps the least worst-crawl excess over the input's noise: `balanced` behind the
    # clip_score filter, below its input on every crawl and seed (worst crawl 26.8% against 29.9%), 0.895 of
    # full's validation score. The previous default, semdedup, shipped more noise than its input on 3 of 4.
    strategy: str = "balanced"
    alignment: str = "none"  # which pairs fill a cluster's quota (see stages/sample.py)
    aligned_share: float = 0.5  # the pool: this share of the better-aligned pairs (released code: half)
    # What happens to the pairs outside the pool (stages/sample.py): `drop` fills each cluster's quota from
    # the pool first; `repair` fills it as if there were no pool (coverage decides) and ships the kept pairs
    # outside the pool with their generated caption where it passes the gate (tldr_tasks/fusion.py). With
    # sample.filter, `repair` captions the pairs the filter drops and passes those whose generated caption
    # scores as high as a passing original (Nguyen et al., 2023).
    misaligned: str = "drop"
    # clip_score (DataComp's baseline): the pool is the top `score_share` of the pairs by CLIP image-text
    # cosine (scoring.py), from `clip_model`: empty = the built-in reference (pretrained towers, heads aligned
    # on the crawl, cross-fitted: nothing to bring); a CLIP folder (Hugging Face CLIPModel or tldr-vlp's own);
    # or `similarity` = the crawl's own LAION score (img2dataset --save_additional_columns, KEY.json)
    clip_model: str = ""
    score_share: float = 0.3
    dedup_images: bool = True  # clip_score: identical image bytes keep only their first key
    # semdedup: which of two near-duplicates ranks higher and stays (stages/sample.py)
    dedup_keep: str = "central"
    # An alignment filter ahead of the coverage rule: `clip_score` passes exact image dedup (`dedup_images`) and
    # then the top `filter_share` of the pairs by clip_score's cosine; uniform, balanced or semdedup then keep
    # only pairs that pass (stages/sample.py: keep_mask)
    filter: str = "clip_score"
    filter_share: float = 0.5
    # The ratio curve (tldr_tasks/curve.py), always on with ratio `auto`: a validation split carved from the crawl
    # by key hash (`holdout_share` of it, at most `holdout_max` pairs; never selected from, never trained on),
    # and the selection at every `curve_ratios` (shares of the rest; 1.0, the whole rest, is auto's reference)
    # scored by the locked pretrained-towers heads trained on it, `curve_seeds` seeds each. Off by default:
    # docs/pipeline.md gives its cost next to the pipeline's.
    curve: bool = False
    curve_ratios: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    curve_seeds: int = 3
    # auto keeps the smallest curve ratio whose score's 95% interval lower bound is at least (1 - auto_tolerance)
    # times the whole rest's mean score. 0.05 is the protocol's non-inferiority margin; on the benchmark crawls
    # no tolerance tried kept auto's promise for the evaluation model on every crawl (benchmarks/results/
    # auto_ratio.json; docs/pipeline.md, "Is the proxy right?").
    auto_tolerance: float = 0.05
    holdout_share: float = 0.05
    holdout_max: int = 5000

    @property
    def clip_scored(self) -> bool:
        """Whether the selection reads clip_score's cosines: the strategy itself or the filter ahead of it."""
        return "clip_score" in (self.strategy, self.filter)

    @property
    def repairs_filter(self) -> bool:
        """Whether the filter's dropped pairs are captioned and scored again (sample.misaligned: repair)."""
        return self.misaligned == "repair" and self.filter != "none"

    @property
    def curve_on(self) -> bool:
        """Whether the run carves a validation split and scores the ratio curve."""
        return self.curve or self.ratio == AUTO

    def validate(self):
        _check(self.ratio == AUTO or not isinstance(self.ratio, str),
               f"sample.ratio={self.ratio!r} is not valid (give a share in (0, 1], e.g. 0.25, or {AUTO})")
        ratios = self.curve_ratios
        _check(bool(ratios) and all(0 < r <= 1 for r in ratios) and len(set(ratios)) == len(ratios) and 1.0 in ratios,
               f"sample.curve_ratios={ratios} is not a curve (give distinct shares in (0, 1] that include 1.0, the "
               "whole crawl auto compares with, e.g. 0.05,0.1,0.2,0.3,0.5,1.0)")
        _check(self.ratio != AUTO or self.curve_seeds >= 2,
               f"sample.ratio=auto reads an interval over seeds: sample.curve_seeds={self.curve_seeds} gives none "
               "(use 2 or more, e.g. 3)")
        _choice("sample.strategy", self.strategy, STRATEGIES)
        _choice("sample.alignment", self.alignment, ALIGNMENTS)
        _choice("sample.filter", self.filter, FILTERS)
        _check(self.filter == "none" or self.strategy in FILTERED_STRATEGIES,
               f"sample.filter={self.filter} runs ahead of a coverage rule: set sample.strategy to one of "
               f"{', '.join(FILTERED_STRATEGIES)} (it is {self.strategy!r}), or sample.filter=none (--filter none)")
        _check(self.filter == "none" or self.alignment == "none",
               f"sample.filter={self.filter} and sample.alignment={self.alignment} are two alignment filters: set one "
               "of them to none (--filter none keeps the alignment)")
        _choice("sample.dedup_keep", self.dedup_keep, DEDUP_KEEPS)
        _choice("sample.misaligned", self.misaligned, MISALIGNED)
        _check(self.misaligned == "drop" or self.alignment in ("cluster_pool", "global_pool") or self.filter != "none",
               f"sample.misaligned=repair needs a pool of aligned pairs or a filter to repair the others against: "
               f"set sample.alignment to cluster_pool or global_pool (it is {self.alignment!r}), or "
               "sample.filter=clip_score")
        _check(not self.repairs_filter or self.clip_model != "similarity",
               "sample.misaligned=repair scores the generated captions with the filter's CLIP, and "
               "sample.clip_model=similarity (the crawl's own score) cannot score new text: leave sample.clip_model "
               "empty (the built-in reference) or set sample.misaligned=drop")


@dataclass
class CaptionConfig:
    num_beams: int = 3
    min_new_tokens: int = 3
    max_new_tokens: int = 30
    batch_size: int = 128
    # See tldr_tasks/fusion.py. `original` ships the crawl's own captions: chosen on validation over every
    # fusion and the filter's repair with the pretrained captioner (benchmarks/results/caption_half.json: share
    # of full's score, mean over four crawls and three seeds, original 0.890, repair 0.881, mix 0.837, concat
    # 0.825, generated 0.756): cross-fitted generated captions are noisier than the originals they would replace.
    fusion: str = "original"
    # Generated text ships only above this mean token log-probability given the image, this grounding
    # (nats per token more than given another image), and only when the run's generated captions keep
    # this share of the originals' entropy (else: collapse). See tldr_tasks/fusion.py. The thresholds are
    # chosen on validation R@1, without labels (benchmarks/results/caption_gate.json: fusion generated on
    # TL;DR's selection, mean over three crawls: -0.3/0.5 8.18, -1.0/1.5 7.84, -1.0/0.5 6.63, no gate 3.63).
    min_confidence: float = -0.3
    min_grounding: float = 0.5
    min_entropy_ratio: float = 0.5

    def validate(self):
        _choice("caption.fusion", self.fusion, FUSIONS)
        _check(self.min_new_tokens <= self.max_new_tokens,
               f"caption.min_new_tokens={self.min_new_tokens} is above caption.max_new_tokens={self.max_new_tokens} "
               "(lower the first or raise the second)")


@dataclass
class MaterializeConfig:
    shard_size: int = 1000


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
        load_preset("clip", self.preset)
        for arm in self.arms:
            _check(arm in ARMS or arm.removeprefix("tldr_") in FUSIONS,
                   f"evaluate.arms: unknown arm {arm!r} (use {', '.join(ARMS)} or tldr_<fusion> with a fusion of "
                   f"{', '.join(FUSIONS)})")
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
        for name, value in flat_numbers(self).items():
            _in_range(name, value)
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


def flat_numbers(cfg: Config) -> dict[str, float]:
    """Every numeric parameter by dotted name (`{"seed": 0, "sample.ratio": 0.25, ...}`): what RANGES covers."""
    out = {}
    for name, value in cfg.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        out.update({f"{name}.{k}" if k else name: v for k, v in items
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, refusing unknown sections and keys by name."""
    _check(isinstance(data or {}, dict), f"params must be a mapping of sections, got {data!r}")
    cfg = Config()
    for section_name, values in (data or {}).items():
        if section_name == "seed":
            cfg.seed = _coerce("seed", values, int)
            continue
        _check(hasattr(cfg, section_name), f"unknown params section {section_name!r} (use one of "
               + ", ".join(f.name for f in dataclasses.fields(Config)) + ")")
        _check(isinstance(values, dict), f"params section {section_name} is {values!r}, not a mapping "
               f"(set its keys, e.g. {section_name}.<key>=<value>)")
        section = getattr(cfg, section_name)
        types = typing.get_type_hints(type(section))
        for key, value in values.items():
            _check(key in types, f"unknown parameter {section_name}.{key} (use one of {', '.join(types)})")
            setattr(section, key, _coerce(f"{section_name}.{key}", value, types[key]))
    return cfg


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_EXPECTED = {int: "a whole number, e.g. 3", float: "a number, e.g. 0.25", bool: "true or false", str: "a text"}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Cast `value` to the parameter's declared type so 'ratio=0.3' from a CLI becomes a float; a value
    of another type (`seed=abc`, `dedup_images=maybe`) is refused by name."""
    if typing.get_origin(kind) is list or kind is list:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        (item_kind,) = typing.get_args(kind) or (str,)
        return [_coerce(name, item, item_kind) for item in items]
    if isinstance(kind, types.UnionType):  # `float | str` (sample.ratio): the first type that takes the value
        *first, last = typing.get_args(kind)
        for option in first:
            try:
                return _coerce(name, value, option)
            except ConfigError:
                pass
        return _coerce(name, value, last)
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _BOOLS[str(value).lower()]
        if isinstance(value, (bool, dict, list)):  # YAML's true, {...} and [...] are never a number or a name
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return kind(value)  # float or str
    except (TypeError, ValueError, KeyError, OverflowError):
        raise ConfigError(f"{name}={value!r} is not valid (give {_EXPECTED[kind]})") from None


# A shortcut -> the parameter it sets: the CLI's flags (--ratio ...) and the Airflow trigger form's
# params (captioner_preset ...) both go through `shortcut_overrides`.
SHORTCUTS = {"ratio": "sample.ratio", "clusters": "cluster.clusters", "feature": "embed.feature",
             "strategy": "sample.strategy", "filter": "sample.filter", "alignment": "sample.alignment",
             "fusion": "caption.fusion",
             "seed": "seed", "samples": "crawl.samples", "noise": "crawl.noise", "captioner_preset": "captioner.preset"}


def shortcut_overrides(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
    """The `section.key=value` overrides of the shortcuts given in `values` (None: not given), then
    `overrides`, which come last and so win."""
    out = [f"{key}={values[name]}" for name, key in SHORTCUTS.items() if values.get(name) is not None]
    return out + [str(item) for item in overrides]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['sample.ratio=0.3', 'seed=1'] -> {'sample': {'ratio': 0.3}, 'seed': 1}."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        _check("=" in item, f"override {item!r} must look like section.key=value (e.g. sample.ratio=0.3)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {_one_line(err)} (quote it or fix "
                              "the brackets)") from None
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
        _check(path.is_file(), f"params file not found: {path} (check --params)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"params file {path} is not valid YAML: {_one_line(err)} (fix that line)") from None
    return from_dict(_merge(data, parse_overrides(overrides or []))).validate()


def _one_line(err: Exception) -> str:
    """The problem a YAML error names ("expected ',' or ']'"), without its multi-line excerpt."""
    return " ".join(str(getattr(err, "problem", None) or err).split())
