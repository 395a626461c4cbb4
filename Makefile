# Two commands do all the set-up on a fresh machine:
#   make test   - create .venv, install torch (CPU build, pinned) then llamakin[test], run the tests
#   make demo   - (arrives with the inference issue) pull the default model and generate
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test test-fast install demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, from its pinned version (a CPU wheel on these machines); everything else under a
# constraints file that pins the same torch, so no dependency can pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	@echo "make demo arrives with the inference issue (tokenizers, GGUF, default model)."
	@echo "Until then: $(VENV)/bin/llamakin inspect DIR  or  $(VENV)/bin/llamakin --help"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
