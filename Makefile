# mnistlab: `make report` and `make test` each build .venv when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where the MNIST IDX files are; unset: torchvision downloads them into ./data.
export MNIST_DIR
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: report quick-report test test-fast lint format bench frontier-gpu gpu-bundle zip colab-links clean help

help:
	@echo "make report          run every notebook on the real data, write report/ (~15 min on a 2-core CPU)"
	@echo "make test            run the test suite (includes quick notebook runs on the real data)"
	@echo "make test-fast       the tests not marked slow"
	@echo "make lint / format   ruff check / ruff format"
	@echo "make bench           training-throughput benchmark, writes report/bench.json"
	@echo "make frontier-gpu    issue 21's GPU studies (time to 99%, best accuracy), ~7 min on an H100"
	@echo "make gpu-bundle      MNIST (.gz) into build/gpu/, for a bare GPU machine"
	@echo "make zip ROLLNO=...  PA2_<ROLLNO>.zip with the report and the code"
	@echo "make colab-links     point the Colab badges and install cells at pyproject's Repository"
	@echo "                     (REMOTE=origin: take it from that git remote; BRANCH=...: the branch)"
	@echo "MNIST_DIR=/path/to/MNIST/raw selects local IDX files (raw or .gz)"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

report: $(STAMP)
	$(PY) -m mnistlab.tools.report --out report

quick-report: $(STAMP)
	$(PY) -m mnistlab.tools.report --quick --out build/quick-report

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests notebooks
	$(VENV)/bin/ruff format --check src tests notebooks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests notebooks

bench: $(STAMP)
	$(PY) -m mnistlab.tools.bench --out report/bench.json

# README "GPU studies (issue 21)": writes report/frontier_cuda.json, merges into report/bench_cuda.json.
frontier-gpu: $(STAMP)
	$(PY) -m mnistlab.tools.frontier --device cuda --out-dir report

# What a bare GPU machine lacks (README "GPU studies"): the data.
gpu-bundle: $(STAMP)
	@test -n "$(MNIST_DIR)" || { echo "set MNIST_DIR to the folder of the four MNIST IDX files"; exit 2; }
	mkdir -p build/gpu/MNIST
	for f in $(MNIST_DIR)/*-ubyte; do gzip -c $$f > build/gpu/MNIST/$$(basename $$f).gz; done

zip: $(STAMP)
	@test -n "$(ROLLNO)" || { echo "usage: make zip ROLLNO=<your roll number>"; exit 2; }
	$(PY) -m mnistlab.tools.submission PA2_$(ROLLNO).zip

# Badges, install cells and run-time lines from pyproject.toml (and report/metrics_h200.json).
colab-links: $(STAMP)
	$(PY) -m mnistlab.tools.colab $(if $(REMOTE),--remote $(REMOTE)) $(if $(BRANCH),--branch $(BRANCH))

clean:
	rm -rf build report.new .pytest_cache PA2_*.zip
