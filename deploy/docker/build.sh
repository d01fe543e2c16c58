#!/usr/bin/env bash
# `docker build` of this repository's Dockerfile with BuildKit and the host's network, as a user builds it:
#   deploy/docker/build.sh -t gpt-onnx-serve:cpu --build-arg VARIANT=cpu .
# BuildKit is `docker buildx build` where the buildx plugin is installed, and built into Debian's docker.io (20.10)
# CLI, which has no plugin. Where download.pytorch.org cannot be reached but pip's find-links on this host hold the
# CPU torch wheel, that wheel is served to the build on loopback as TORCH_INDEX_URL (set it yourself to override).
set -euo pipefail
docker=${DOCKER:-docker}
major() { "$1" version -f '{{.Client.Version}}' 2>/dev/null | cut -d. -f1; }

if "$docker" buildx version >/dev/null 2>&1; then
  build=("$docker" buildx build --load)
else
  cli=""
  for candidate in "$docker" /usr/bin/docker; do
    if command -v "$candidate" >/dev/null && [ "$(major "$candidate")" -lt 23 ]; then cli=$candidate; break; fi
  done
  [ -n "$cli" ] || { echo "BuildKit needed: install the docker buildx plugin (or Debian's docker.io CLI)" >&2; exit 1; }
  build=(env DOCKER_BUILDKIT=1 "$cli" build)
fi

args=()
if [ -z "${TORCH_INDEX_URL:-}" ] && ! curl -fsS -m 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
  links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
  wheel=$(ls "${links:-/nonexistent}"/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
  [ -n "$wheel" ] || { echo "download.pytorch.org unreachable and no CPU torch wheel in pip's find-links" >&2; exit 1; }
  index=$(mktemp -d)
  mkdir "$index/torch" && ln -s "$wheel" "$index/torch/"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 --directory "$index" "$port" >/dev/null 2>&1 &
  server=$!
  trap 'kill $server; rm -rf "$index"' EXIT
  args+=(--build-arg "TORCH_INDEX_URL=http://127.0.0.1:$port/")
  echo "torch index for the build: $(basename "$wheel") on loopback" >&2
fi
"${build[@]}" --network host "${args[@]}" "$@"
