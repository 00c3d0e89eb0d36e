"""The benchmark crawls' strict judge of a caption against its ground truth (KEY.json "truth").

Used by materialize (how noisy the shipped captions are) and evaluate (how noisy each arm's training
captions are). A user's crawl carries no truth: neither measures noise there.
"""

from __future__ import annotations

import numpy as np


def describes_exactly(caption: str, truth: dict) -> bool:
    """The benchmark crawls' strict judge: the synthetic crawl's (the caption names exactly the scene's
    objects) for truths with objects, the real-image crawl's (it names this concept and no other)."""
    if "objects" in truth:
        from tldr_tasks.data.synthetic import describes_scene_exactly

        return describes_scene_exactly(caption, truth)
    from tldr_tasks.data.real_crawl import describes_concept

    return describes_concept(caption, truth)


def noise_rate(captions: list[str], truths: list[dict]) -> float:
    """Share of captions that do not describe their scene exactly (a wrong object next to the right ones
    counts as noise: "wrong caption; right caption" is not clean)."""
    return float(np.mean([not describes_exactly(c, t) for c, t in zip(captions, truths)])) if truths else 0.0
