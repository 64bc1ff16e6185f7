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
EXAMPLES_STAMP:= $(VENV)/.examples-stamp
SOURCES       := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
# the slowest tests at the end of every run (CI's budget: 20 minutes)
PYTEST_ARGS   ?= --durations=25
DEMO_ARGS     ?=
BENCH_ARGS    ?=

.PHONY: all install examples demo quick-demo test test-extended test-sanitize bench clean

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

# The examples' own dependencies (readers, metrics, figures); every one accepts the pinned torch.
$(EXAMPLES_STAMP): $(DEPS_STAMP) examples/requirements.txt
	$(PIP) install --quiet -r examples/requirements.txt
	touch $@

examples: install $(EXAMPLES_STAMP)

# Scribble-supervised training on the embedded synthetic cardiac phantom (no download), short CPU
# schedule; `make demo DEMO_ARGS="--data /path/to/acdc"` runs it on real data.
demo: examples
	$(PY) examples/demo.py $(DEMO_ARGS)

# The losses alone: value, gradient, time and memory of every backend against the reference.
quick-demo: install
	$(PY) examples/quick_demo.py

test: install $(EXAMPLES_STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Thousands of property-based cases instead of a few hundred, and the slow tests (int64 offsets:
# tensors past 2**31 elements, about 19 GiB of memory and 17 GiB of free disk).
test-extended: install $(EXAMPLES_STAMP)
	ATTENSCRIBBLE_HYPOTHESIS_EXAMPLES=3000 $(PY) -m pytest $(PYTEST_ARGS)

# The compiled CPU kernels' tests under AddressSanitizer and UndefinedBehaviorSanitizer: a copy of
# the package under build/sanitize with its own sanitized extension (scripts/sanitize_cpu.sh).
test-sanitize: install $(EXAMPLES_STAMP)
	PY=$(PY) bash scripts/sanitize_cpu.sh $(PYTEST_ARGS)

# Speed and memory of every op and backend against the reference and the peers (all suites; pick
# with BENCH_ARGS="--suite masked_crf --quick"); results and plots under benchmarks/results/.
bench: examples
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info attenscribble_ops/*.so $(BUILD_STAMP)
