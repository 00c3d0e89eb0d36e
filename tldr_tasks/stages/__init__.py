"""One module per stage: `run(cfg, io, ...) -> StageResult` does the work, `main(argv)` only parses."""
