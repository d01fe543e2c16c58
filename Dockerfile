# syntax=docker/dockerfile:1
# Multi-stage: `build` installs the export side (torch) and exports the default bundle with the same make target
# CI uses; `runtime` carries the service only (onnxruntime-gpu, no torch), as a non-root user.
#   docker build -t gpt-onnx-serve .                              # CUDA + cuDNN runtime base (GPU hosts)
#   docker build -t gpt-onnx-serve:cpu --build-arg VARIANT=cpu .  # slim Python base
ARG VARIANT=gpu

FROM python:3.11-slim-bookworm AS build
ARG VARIANT
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Packages first (cached until pyproject.toml or the Makefile change), code after.
COPY pyproject.toml Makefile ./
RUN mkdir export service && touch export/__init__.py service/__init__.py && make setup-export
COPY export/ export/
COPY service/ service/
# The GPU image bakes an fp16 bundle: onnxruntime's CUDA GroupQueryAttention runs fp16/bf16 only.
RUN make export BUNDLE=/bundle EXPORT_ARGS="$(if [ "$VARIANT" = gpu ]; then echo --dtype fp16; fi)"

# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9.
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
COPY pyproject.toml Makefile ./
RUN mkdir export service && touch export/__init__.py service/__init__.py \
    && make setup-serve PYTHON=python3 && chown -R app:app /app
COPY --chown=app:app service/ service/
COPY --chown=app:app export/__init__.py export/
COPY --from=build --chown=app:app /bundle /bundles/default
USER 10001:10001
ENV SERVE_BUNDLE=/bundles/default SERVE_HOST=0.0.0.0 SERVE_PORT=8000 PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
# Mount another bundle read-only at /bundles/default (or set SERVE_BUNDLE) to serve it instead of the baked one.
ENTRYPOINT [".venv/bin/python", "-m", "service"]
