# alignloop: `make up` runs the service on the bundled model, `make test` runs the tests.
# `make setup` builds .venv with the CPU stack in the order vLLM's CPU build needs (see requirements/README.md);
# it reruns only when a requirements file or pyproject.toml changed.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.alignloop-setup
LOCK := requirements/lock.txt
MODEL ?= models/shapes-llava
PYTEST_ARGS ?=

CHROMIUM := /usr/bin/chromium

.PHONY: setup browser promtool lint test test-fast up eval model clean-venv

setup: $(STAMP) browser promtool

# Debian's Chromium for the browser tests (Playwright drives it; no browser is ever downloaded by Playwright).
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# Debian's promtool (package prometheus; its service is not started) for the alert-rule tests in tests/deploy.
promtool:
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

$(STAMP): pyproject.toml requirements/*.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "pip==26.3"
	$(PIP) install -q -c $(LOCK) -r requirements/torch.txt
	$(PIP) install -q --no-deps -c $(LOCK) -r requirements/vllm.txt
	$(PIP) install -q -c $(LOCK) -r requirements/vllm-deps.txt -r requirements/app.txt -r requirements/test.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The layout is ruff's, the lint clean, and imports run one way (import-linter's contracts in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The whole service on this machine: the gateway on http://127.0.0.1:8000 with vLLM on the bundled model.
up: setup
	$(VENV)/bin/alignloop up --model $(MODEL)

# Scores the bundled model in-process on 500 ShapesWorld test images.
eval: setup
	$(VENV)/bin/alignloop eval --model $(MODEL) --split test --num-images 500 \
		--output runs/eval/bundled.json --chart runs/eval/bundled.png

# Retrains the bundled checkpoint from scratch (about 45 minutes on 2 cores), evaluates it, rewrites its model card.
model: setup
	$(VENV)/bin/alignloop train sft --output-dir $(MODEL)
	$(VENV)/bin/alignloop eval --model $(MODEL) --split test --num-images 500 --output $(MODEL)/eval.json \
		--chart $(MODEL)/eval.png
	$(VENV)/bin/python -m training.model_card $(MODEL)

clean-venv:
	rm -rf $(VENV)
