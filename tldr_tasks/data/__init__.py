"""WebDataset shard I/O, the synthetic benchmark crawl and importers."""
