# Two entry points do all set-up on a fresh machine (see README):
#   make table11   -> installs, fetches CIFAR-10 into data/, runs the default DAG to results/table11.csv
#   make test      -> installs, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
SHARED_CIFAR ?= ../shared/data/cifar-10-python.tar.gz

.PHONY: install data table11 all test lint docs clean-results

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds available offline on the project machines
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name rpg --display-name "RPG (.venv)"
	touch $@

install: $(VENV)/.installed

data/cifar-10-python.tar.gz:
	@mkdir -p data
	@if [ -f "$(SHARED_CIFAR)" ]; then cp "$(SHARED_CIFAR)" $@; \
	else echo "CIFAR-10 not found: put cifar-10-python.tar.gz into data/ (or set data.download: true in config)"; exit 1; fi

data: data/cifar-10-python.tar.gz

table11: install data
	$(VENV)/bin/snakemake --cores $(CORES) results/table11.csv

all: install data
	$(VENV)/bin/snakemake --cores $(CORES) all

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/snakefmt --check workflow
	$(VENV)/bin/snakemake --lint

# README.md and docs/*.md: rewrite the numbers rendered from docs/reference/ (rpg docs check only compares)
docs: install
	$(VENV)/bin/rpg docs render
