# Two entry points: `make demo` (the main job on the built-in toy world) and `make test`.
# Both create .venv when missing. torch is installed first and then held by a constraints file: on
# the dev/CI machines a CPU wheel of exactly that version is on disk, while anything that lets pip
# choose (torchvision, open_clip, ...) would otherwise pull a multi-GB CUDA build of a newer torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PIP := $(BIN)/pip install -q -c $(VENV)/constraints.txt
# laion_clap pins numpy<2 and pulls wandb; we install it without its pins, plus what its import needs
LAION_CLAP_DEPS := librosa torchlibrosa ftfy braceexpand webdataset wget h5py regex

.PHONY: demo test test-slow bench venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) "$(TORCH)"

# core + plotting: enough for the demo, fit/embed and the aggregation benchmark
$(VENV)/.installed-core: $(BIN)/python pyproject.toml
	$(PIP) -e ".[plot]"
	touch $@

# everything the tests exercise: encoders (tiny local checkpoints), media, Ray. laion_clap goes last
# and without its pins (numpy<2, wandb), so pip has no conflict to report; its tests pass on numpy 2
$(VENV)/.installed-test: $(VENV)/.installed-core
	$(PIP) -e ".[test,clip,ulip,media,ray,serve]"
	$(PIP) $(LAION_CLAP_DEPS)
	$(PIP) --no-deps "laion_clap>=1.1.6"
	touch $@

venv: $(VENV)/.installed-test

demo: $(VENV)/.installed-core
	$(BIN)/pairfree demo --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/fit_cost.py
	$(BIN)/python benchmarks/encode.py

clean:
	rm -rf $(VENV) runs .pytest_cache
