"""Which caption ships: the original web caption, the captioner's generated one, or both.

Generated text is used only when it is trustworthy ("do no harm"):
    - per sample, its confidence (the captioner's mean token log-probability of the generated
      caption given the image) must reach `caption.min_confidence` and its grounding (that
      log-probability minus the same given another image) `caption.min_grounding`: fluent text
      that would fit any image is not a description of this one;
    - per run, the generated captions must not have collapsed: `collapse_check` compares the entropy
      of their distribution with the originals'. A collapsed captioner (a handful of strings for
      every image) ships the original captions only, and says so.

Fusion modes (`caption.fusion`), applied to every sample whose generated caption passes the gate:
    mix        the original or the generated caption, one of them per sample (a seeded coin on the
               key, so a rerun ships the same choice): half the set gets the cleaner text, the
               other half keeps the web's vocabulary.
    generated  the generated caption (the paper reports generated-only hurts on real data).
    concat     "original; generated" (the paper's fusion).
    original   the web caption only (selection without refinement).
A sample whose generated caption fails the gate, or has none, ships its original caption. The
chosen text is what KEY.txt holds and what the evaluation trains on.

Repair (`sample.misaligned: repair`): a pair the selection kept for its cluster's coverage although its
caption is among the misaligned ones ships its generated caption instead, whatever the fusion mode, when
that passes the gate (reason `repaired`); when it does not, its original, with the gate's reason. A pair
that sample.filter passed only with its generated caption (the filter's repair) ships it: the filter is its gate.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter

# Reasons counted in the manifest, one per kept sample.
REPLACED = "replaced"  # generated caption shipped instead of the original
REPAIRED = "repaired"  # a misaligned pair kept for coverage, shipped with its generated caption
APPENDED = "appended"  # "original; generated"
ORIGINAL_BY_FUSION = "original:fusion"  # fusion=original, or the mix coin chose the original
ORIGINAL_LOW_CONFIDENCE = "original:low_confidence"
ORIGINAL_UNGROUNDED = "original:ungrounded"
ORIGINAL_COLLAPSE = "original:collapse"
ORIGINAL_NO_GENERATED = "original:no_generated"


def mix_coin(key: str, seed: int) -> bool:
    """True when `mix` ships the generated caption of sample `key`: a seeded, order-free coin."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return digest[0] < 128


def ship_caption(key: str, original: str, generated: str, confidence: float, grounding: float, *, mode: str,
                 min_confidence: float, min_grounding: float, seed: int, collapsed: bool,
                 repair: bool = False, passed_filter: bool = False) -> tuple[str, str]:
    """(the caption KEY.txt holds, the reason) for one kept sample.

    Args:
        key: the sample key (seeds the `mix` coin).
        original: the web caption.
        generated: the captioner's caption ("" when none).
        confidence: mean token log-probability of `generated` given the image (NaN when none).
        grounding: `confidence` minus the same given another image (NaN when unknown).
        mode: caption.fusion.
        min_confidence, min_grounding: generated text below either is not used.
        seed: the run's seed.
        collapsed: the run-level collapse check failed: originals only.
        repair: the selection kept this pair to be repaired (its caption is misaligned).
        passed_filter: the selection's filter passed this pair with `generated` (sample.filter's repair).
    """
    original, generated = original.strip(), generated.strip()
    if mode not in ("mix", "generated", "concat", "original"):
        raise ValueError(f"unknown fusion mode {mode!r}: use mix, generated, concat or original")
    if passed_filter and generated:
        return generated, REPAIRED
    if mode == "original" and not repair:
        return original, ORIGINAL_BY_FUSION
    if collapsed:
        return original, ORIGINAL_COLLAPSE
    if not generated:
        return original, ORIGINAL_NO_GENERATED
    if not confidence >= min_confidence:  # NaN fails too
        return original, ORIGINAL_LOW_CONFIDENCE
    if not grounding >= min_grounding:
        return original, ORIGINAL_UNGROUNDED
    if repair:
        return generated, REPAIRED
    if not original:  # nothing to keep: the generated caption is the only description
        return generated, REPLACED
    if mode == "concat":
        return f"{original}; {generated}", APPENDED
    if mode == "generated" or mix_coin(key, seed):
        return generated, REPLACED
    return original, ORIGINAL_BY_FUSION


def _entropy_bits(texts: list[str]) -> float:
    counts = Counter(texts)
    total = sum(counts.values())
    return max(0.0, -sum(c / total * math.log2(c / total) for c in counts.values())) if total else 0.0


def collapse_check(originals: list[str], generated: list[str], min_entropy_ratio: float) -> dict:
    """Whether the generated captions of a run have collapsed onto a few strings.

    Compares the entropy (bits) of the generated captions' distribution with the originals' over the
    same samples: a captioner that describes each image says about as many different things as the
    web did (the synthetic benchmark: ratio ~0.9), a collapsed one a handful (a real crawl with a
    from-scratch captioner: 14 strings for 750 images, ratio ~0.3).
    """
    usable = [g.strip() for g in generated if g.strip()]
    entropy_generated = _entropy_bits(usable)
    entropy_original = _entropy_bits([o.strip() for o in originals])
    ratio = entropy_generated / entropy_original if entropy_original > 0 else 1.0
    top_share = Counter(usable).most_common(1)[0][1] / len(usable) if usable else 0.0
    return {"collapsed": bool(generated) and ratio < min_entropy_ratio, "entropy_ratio": round(ratio, 4),
            "entropy_generated_bits": round(entropy_generated, 3),
            "entropy_original_bits": round(entropy_original, 3),
            "distinct_generated": len(set(usable)), "distinct_original": len({o.strip() for o in originals}),
            "samples": len(generated), "top_generated_share": round(top_share, 4),
            "min_entropy_ratio": min_entropy_ratio}
