# Two commands: `make run` (the embedded default job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch that lies on this kind of machine; GPU images keep their own torch.
TORCH_CPU ?= torch==2.13.0

.PHONY: run test install install-test clean

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

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e ".[test]"
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
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

clean:
	rm -rf $(VENV) runs .pytest_cache
