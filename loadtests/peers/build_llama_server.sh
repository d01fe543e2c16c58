#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (and `llama-quantize`) from the llama-cpp-python source distribution on
# PyPI, which vendors llama.cpp with its server: the benchmark peer of `make bench`. About ten minutes on
# two cores; the result lands in $OUT/bin (default .cache/llama.cpp/bin) and is reused afterwards.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=${OUT:-.cache/llama.cpp}
PIP=${PIP:-.venv/bin/pip}
if [[ -x $OUT/bin/llama-server ]]; then echo "$OUT/bin/llama-server is built"; exit 0; fi
mkdir -p "$OUT/src"
if [[ ! -f $OUT/src/llama_cpp_python-$VERSION.tar.gz ]]; then
  "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src"
fi
rm -rf "$OUT/src/llama_cpp_python-$VERSION"
tar -xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
SRC=$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp
# GGML_NATIVE: the peer gets this machine's own instruction set (AVX-512/VNNI where present), as ours does.
cmake -S "$SRC" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
cmake --build "$OUT/build" --target llama-server llama-quantize -j "$(nproc)"
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/llama-server" "$OUT/build/bin/llama-quantize" "$OUT/bin/"
echo "built $OUT/bin/llama-server"
