"""Shared fixtures. `tiny_crawl`: a small synthetic crawl (made once per test session)."""

from __future__ import annotations

import pytest

from tldr_tasks.config import CrawlConfig

TINY_CRAWL = CrawlConfig(samples=200, eval_samples=60, image_size=32, noise=0.3, prototypes=40, zipf=1.1,
                         shard_size=100)


@pytest.fixture(scope="session")
def tiny_crawl(tmp_path_factory) -> str:
    """Folder of a synthetic crawl: train/{00000,00001}.tar (200 samples, 30% noisy captions),
    eval/00000.tar (60 clean samples), crawl.json; 32x32 px, seed 0. Read-only: do not write into it."""
    from tldr_tasks.data.synthetic import make_crawl

    out = tmp_path_factory.mktemp("tiny_crawl")
    make_crawl(str(out), TINY_CRAWL, seed=0)
    return str(out)
