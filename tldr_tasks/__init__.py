"""tldr-vlp: TL;DR data reduction for vision-language pre-training, as pipeline stages."""

__version__ = "0.1.0"
