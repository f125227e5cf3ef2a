# tint: `make demo` runs the embedded default end to end, `make test` runs the tests.
# Both set up .venv first (idempotent: a second run only checks a stamp file).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tint-installed
APT_PACKAGES := openclipart-png dataset-fashion-mnist

.PHONY: setup apt demo test lint clean-venv

setup: $(STAMP) apt

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing Debian data packages: $(APT_PACKAGES)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
	fi

# torch is installed first and pinned so that no dependency pulls a multi-GB CUDA build.
# constraints.txt: the development venv's versions (a key is bit-identical within one environment: docs/reliability.md).
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e ".[dev,ray]"
	touch $(STAMP)

demo: setup
	OMP_NUM_THREADS=2 $(BIN)/tint run

test: setup
	$(BIN)/ruff check tint tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -p no:cacheprovider tests

lint: setup
	$(BIN)/ruff check tint tests benchmarks

clean-venv:
	rm -rf $(VENV)
