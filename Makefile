# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# torch/torchvision pair that imports together here (see pyproject.toml).
ifeq ($(ARCH),aarch64)
TORCH_PAIR := torch==2.9.1 torchvision==0.24.1
else
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test lint bench clean-venv

$(BIN)/igam: pyproject.toml
	test -x $(BIN)/pip || $(PY) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PAIR)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/igam

demo: $(BIN)/igam
	$(BIN)/igam demo

# --timeout: a machine three times slower than a quiet 2-core one (tests/conftest.py SLOWER) still passes;
# no test takes more than about 3 minutes on a quiet one
test: $(BIN)/igam
	$(BIN)/python -m ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --timeout 1200

bench: $(BIN)/igam
	$(BIN)/python benchmarks/step_cost.py --model small-cnn

clean-venv:
	rm -rf $(VENV)
