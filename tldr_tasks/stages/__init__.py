"""One module per stage: `run(cfg, io, ...) -> StageResult` does the work; `tldr-vlp run <stage>`
(tldr_tasks.cli) parses the command line and runs it through the executor, tldr_tasks.runner."""
