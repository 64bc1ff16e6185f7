# Two commands do all the set-up on a fresh machine (Python 3.10+ and a C++ compiler):
#   make demo   - virtual environment, pinned torch, the package, then the demonstration
#   make test   - the same set-up, then the test suite
PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
DEPS_STAMP    := $(VENV)/.deps-$(TORCH_VERSION)
BUILD_STAMP   := $(VENV)/.build-stamp
SOURCES       := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
PYTEST_ARGS   ?=

.PHONY: all install demo test test-fast clean

all: install

# torch first and pinned: an unpinned torch in an empty environment pulls a multi-GB CUDA build.
$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# The extension is built against the torch above (no build isolation), in place, so that the
# checkout itself is the installed package.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILD_STAMP)

demo: install
	$(PY) examples/quick_demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info attenscribble_ops/*.so $(BUILD_STAMP)
