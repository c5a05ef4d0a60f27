# The two set-up commands of the README: `make demo` (install + the main job) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
# A CPU build of torch, pinned so that pip never resolves a newer CUDA build; override with
# TORCH='torch==X.Y.Z' (or an index option) on machines with other wheels.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,dask,spark
BIN     = $(VENV)/bin

.PHONY: install demo test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: install
	$(BIN)/deeptransfer demo
	@echo "to use deeptransfer in this shell, activate its environment: . $(VENV)/bin/activate"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
