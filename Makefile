# Two commands: `make run` (the embedded default job) and `make test` (`make test-fast`: its quick part).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on this kind of machine; GPU images keep their own torch.
TORCH_CPU ?= torch==2.13.0
# Every package (torch excepted) at the version the suite was last green with: `make test`,
# `make run` and CI install through it, so a new release on the index never changes a run by
# surprise. `make lock` refreshes it; `make test-latest` runs the suite without it.
CONSTRAINTS ?= constraints.txt
PYTEST := -m pytest -q -n 2 --dist worksteal

.PHONY: run test test-fast test-latest lock install install-test image image-smoke stack-smoke clean

# An isolated venv, unless the system Python already has torch (GPU images): then the venv
# sees it, and the project keeps that CUDA build.
$(BIN)/python:
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip

# Install torch first where none is importable, so pip never resolves a multi-GB CUDA build.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/ftdiff train
	$(BIN)/ftdiff sample runs/ftdiff/checkpoints --out runs/ftdiff/samples.png
	@echo "checkpoints: runs/ftdiff/checkpoints   samples: runs/ftdiff/samples.png"

# Two test processes: most of the suite waits on real processes (sleeps, timeouts, restarts),
# so two run side by side in about half the time; worksteal evens out the long fault tests.
test: install-test
	$(BIN)/python $(PYTEST)

# The suite without the tests marked multiprocess (every integration test, and unit tests that
# start processes): quick feedback while editing; `make test` stays the full check.
test-fast: install-test
	$(BIN)/python $(PYTEST) -m "not multiprocess"

# The suite against the newest release of every dependency, in a venv of its own: drift is
# seen on purpose. FTDIFF_UNPINNED tells the lock test that versions may differ from the lock.
# torch stays the one the venv got (the CPU build here): the newest torch on an index is a
# multi-GB CUDA build; LATEST_TORCH=1 lets it float too.
test-latest:
	rm -rf .venv-latest
	$(MAKE) --no-print-directory VENV=.venv-latest .venv-latest/.torch
	keep=$$( [ -n "$(LATEST_TORCH)" ] || .venv-latest/bin/python -c "import torch; print('torch==' + torch.__version__)"); \
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" $$keep
	FTDIFF_UNPINNED=1 .venv-latest/bin/python $(PYTEST)

# Rewrite the lock from a fresh resolution of pyproject.toml (runtime, test and digits extras);
# run `make test` afterwards and commit both only when it is green.
lock:
	rm -rf .venv-lock
	$(MAKE) --no-print-directory VENV=.venv-lock .venv-lock/.torch
	.venv-lock/bin/python -m pip install -q -e ".[test,digits]"
	.venv-lock/bin/python -m tests.lockfile write $(CONSTRAINTS)
	rm -rf .venv-lock

# Container images, built and run for real (podman, or docker with a daemon; opt-in, not in CI:
# they take minutes and several GB). docs/deploy.md says what they need.
IMAGE ?= localhost/ftdiff:cpu
image: install
	PYTHON=$(BIN)/python docker/image.sh $(IMAGE)

image-smoke: image
	docker/smoke.sh $(IMAGE)

stack-smoke: image
	PYTHON=$(BIN)/python docker/stack_smoke.sh $(IMAGE)

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs .pytest_cache
