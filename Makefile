# video-ktr: one-command set-up, demo and tests on a fresh CPU machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-arch lint clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c requirements-cpu.txt -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(PY) -m video_ktr demo --output_dir runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# the whole suite on another family's tiny model (docs/models.md; CI runs the default family only):
#   make test-arch ARCH=qwen3_vl      (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe)
test-arch: setup
	@test -n "$(ARCH)" || { echo "usage: make test-arch ARCH=qwen3_vl (a family of docs/models.md)"; exit 2; }
	VK_TEST_ARCH=$(ARCH) $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests

clean-demo:
	rm -rf runs/demo
