# Multi-stage: `build` installs the export side (torch, CPU wheels), builds ortkernels/ (the project's CPU ops, C) and
# exports the default bundle with the same make target CI uses; `runtime` carries the service and the built ops library
# only (onnxruntime-gpu, no torch, no compiler, no pip cache), as a non-root user.
#   docker build -t gpt-onnx-serve .                              # CUDA 13 + cuDNN 9 base, fp16 bundle (GPU hosts)
#   docker build -t gpt-onnx-serve:cpu --build-arg VARIANT=cpu .  # slim Python base, fp32 bundle
# Needs BuildKit (the builder of every current Docker), which builds only the stages the variant uses.
ARG VARIANT=gpu

FROM python:3.11-slim-bookworm AS build
ARG VARIANT
# gcc for ortkernels/: the library picks its code for the CPU it runs on (AVX-512 VNNI, AVX2 or plain C) at load time,
# so one build serves every x86-64 host.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Packages first (cached until pyproject.toml or the Makefile change), code after. torch only exports, on the CPU:
# its CPU wheel index (about 200 MB) instead of PyPI's Linux wheel, the CUDA build with gigabytes of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml Makefile ./
RUN mkdir export service ortkernels && touch export/__init__.py service/__init__.py ortkernels/__init__.py \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" PIP_NO_CACHE_DIR=1 make setup-export
# The export needs export/ and ortkernels/ only: a change to service/ rebuilds the runtime stage, not the bundle.
COPY export/ export/
COPY ortkernels/ ortkernels/
# fp16 for the GPU: onnxruntime's CUDA GroupQueryAttention runs fp16/bf16 only (half the weights and KV cache,
# tensor cores); fp32 for the CPU, where it is the fastest, on ortkernels/' CausalAttention and SwiGLU (`make export`
# builds the library first where a compiler is found).
ARG VARIANT
RUN make export BUNDLE=/bundle EXPORT_ARGS="$(if [ "$VARIANT" = gpu ]; then echo --dtype fp16; fi)"

# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9: the host needs NVIDIA driver 580 or newer. NVIDIA's
# CUDA 13 images are Ubuntu 22.04 (Python 3.10, too old for onnxruntime-gpu 1.31) or 24.04 (Python 3.12).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS runtime-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv make curl \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS runtime-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends make curl \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home /app app
WORKDIR /app
# Code and bundle stay root's: the service only reads them.
COPY pyproject.toml Makefile ./
RUN mkdir export service ortkernels && touch export/__init__.py service/__init__.py ortkernels/__init__.py \
    && PIP_NO_CACHE_DIR=1 make setup-serve PYTHON=python3
COPY service/ service/
# ortkernels/ as the build stage built it (no compiler here): the baked CPU bundle's CausalAttention and SwiGLU, and
# the MatMulQ4_1 of a mounted int4 bundle exported from a GGUF, run on it.
COPY ortkernels/__init__.py ortkernels/
COPY --from=build /src/ortkernels/libgpt_onnx_serve_kernels.so ortkernels/
COPY export/__init__.py export/
COPY --from=build /bundle /bundles/default
USER 10001:10001
ENV SERVE_BUNDLE=/bundles/default SERVE_HOST=0.0.0.0 SERVE_PORT=8000 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Transparent huge pages for malloc's large blocks (the packed weights): faster int4 decode (docs/BENCHMARKS.md).
ENV GLIBC_TUNABLES=glibc.malloc.hugetlb=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
# Mount another bundle read-only at /bundles/default (or set SERVE_BUNDLE) to serve it instead of the baked one.
ENTRYPOINT [".venv/bin/python", "-m", "service"]
