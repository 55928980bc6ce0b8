# vlmserve — two commands: `make demo` (offline stack on tiny models) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmserve-installed

.PHONY: install llamacpp demo serve export bench loadtest test test-unit test-integration test-e2e chaos image lint clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch 2.13.0 CPU is the wheel this platform has on disk; the rest comes from PyPI.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	@# The client SDK is its own distribution (clients/python); tests and docs use it.
	$(PY) -m pip install -q -e 'clients/python[pillow]'
	@# The real tritonserver (Python backend) ships in this wheel; its own dependency pins are for
	@# pytriton's Python API, which we do not use.
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	@touch $(STAMP)

install: $(STAMP)

llamacpp: install ## llama.cpp's Python bindings for this CPU (built from the sdist once, ~6 min; cached): the chat engine export may choose
	$(PY) -m vlmserve.export.llamacpp

demo: install ## offline: tiny random models, Triton + gateway in the foreground (Ctrl-C stops)
	$(VENV)/bin/vlmserve demo

serve: install ## real checkpoints from the Hub or the HF cache (VLMSERVE_<FAMILY>_MODEL=..., e.g. VLMSERVE_SIGLIP_MODEL)
	$(VENV)/bin/vlmserve serve

export: install
	$(VENV)/bin/vlmserve export --set tiny

bench: install ## vlmserve vs the one-request-at-a-time baseline on the perf models; report in loadtests/reports/
	$(VENV)/bin/vlmserve bench

test: install ## unit + integration + e2e (Docker e2e runs when an engine is reachable; CI provides one)
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q tests/integration

chaos: install ## reliability suite incl. kill -9 Triton under load, 10 min soak; report: loadtests/reports/chaos.{md,json}
	VLMSERVE_CHAOS=1 VLMSERVE_CHAOS_REPORT=loadtests/reports/chaos $(PY) -m pytest -q tests/reliability

test-e2e: install ## Docker e2e (a Docker Engine: `bash docker/engine.sh` installs/starts one)
	$(PY) -m pytest -q tests/e2e

image: install ## the CPU image, offline (base image from debootstrap, local wheelhouse)
	bash docker/offline-base.sh
	$(VENV)/bin/vlmserve image build --image cpu

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy vlmserve tests/fakes.py --exclude '^vlmserve/loadtests/' && $(VENV)/bin/lint-imports
	$(VENV)/bin/mypy --config-file clients/python/pyproject.toml clients/python/src

clean:
	rm -rf .vlmserve

# Locust, headless, against an already running gateway (`make demo` in another terminal). Override on the command
# line: make loadtest USERS=16 TIME=2m TAGS="chat ocr"  (TAGS= runs every user class). Reports: $(REPORT)*.
HOST = http://127.0.0.1:8080
USERS = 8
SPAWN = 4
TIME = 30s
TAGS = embeddings
REPORT = loadtests/reports/loadtest

.PHONY: loadtest
loadtest: install ## Locust suite against a running `make demo` (HOST, USERS, SPAWN, TIME, TAGS, REPORT)
	$(VENV)/bin/locust -f loadtests/locustfile.py --headless -u $(USERS) -r $(SPAWN) -t $(TIME) --host $(HOST) \
		$(if $(strip $(TAGS)),--tags $(TAGS)) --csv $(REPORT) --html $(REPORT).html
