#!/usr/bin/env bash
# Build llama.cpp's own server (`llama-server`) and RPC server
# (`ggml-rpc-server`) from a pinned llama.cpp source and install both into a
# bin directory (default: .venv/bin of this checkout, where p2pinfer looks
# first). scripts/setup.sh calls it; it can also be run on its own, e.g. for
# a pip-installed p2pinfer:
#
#   scripts/build_llama_server.sh                   # into .venv/bin
#   scripts/build_llama_server.sh ~/.local/bin      # anywhere on PATH
#   P2PINFER_LLAMA_GPU=cuda scripts/build_llama_server.sh   # a GPU box
#
# Source: the llama.cpp copy vendored in the llama-cpp-python 0.3.36 sdist
# (llama.cpp commit 0c1e570), fetched from PyPI with pip and checked against
# its sha256 below.
#
# Cache: builds are kept under
#   ${P2PINFER_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/p2pinfer}/llama.cpp/<key>/bin
# where <key> covers the source, the GPU flavour, the compiler and this CPU's
# feature flags (a native build uses every instruction this CPU has, so it is
# only reused on a CPU with the same flags). A second run with the same key
# only copies the two binaries: a few seconds. A first build takes 10-15
# minutes on 2 cores (CPU flavour).
#
# Environment:
#   P2PINFER_LLAMA_GPU   cpu (default) | cuda (needs nvcc) | vulkan (needs the
#                        Vulkan headers and glslc)
#   P2PINFER_LLAMA_CMAKE_ARGS   extra CMake arguments (part of the cache key)
#   CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: the number of cores)
set -euo pipefail
cd "$(dirname "$0")/.."

SDIST_VERSION=0.3.36
SDIST=llama_cpp_python-$SDIST_VERSION.tar.gz
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

dest="${1:-.venv/bin}"
flavour="${P2PINFER_LLAMA_GPU:-cpu}"
extra_args="${P2PINFER_LLAMA_CMAKE_ARGS:-}"
cache="${P2PINFER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/p2pinfer}/llama.cpp"
PYTHON="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi

case "$flavour" in
    cpu) gpu_args="" ;;
    cuda) gpu_args="-DGGML_CUDA=ON" ;;
    vulkan) gpu_args="-DGGML_VULKAN=ON" ;;
    *) echo "P2PINFER_LLAMA_GPU: expected cpu, cuda or vulkan, got '$flavour'" >&2; exit 2 ;;
esac

for tool in cmake c++ cc; do
    command -v "$tool" >/dev/null || {
        echo "building llama.cpp needs $tool (apt-get install build-essential cmake)" >&2
        exit 1
    }
done

cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)"
compiler="$(c++ --version | head -1)"
# Bump when the patch below changes: it is part of what a build is.
PATCHES="json-space-1"
key="$(printf '%s\n' "$SDIST_SHA256" "$PATCHES" "$flavour" "$gpu_args $extra_args" "$compiler" \
    "$cpu_flags" | sha256sum | cut -c1-16)"
out="$cache/$key"

if [ ! -x "$out/bin/llama-server" ] || [ ! -x "$out/bin/ggml-rpc-server" ]; then
    mkdir -p "$cache/src"
    if [ ! -f "$cache/src/$SDIST" ] || \
       [ "$(sha256sum "$cache/src/$SDIST" | cut -d' ' -f1)" != "$SDIST_SHA256" ]; then
        echo "==> fetching the llama.cpp source (llama-cpp-python $SDIST_VERSION sdist)"
        rm -f "$cache/src/$SDIST"
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$SDIST_VERSION" -d "$cache/src"
        got="$(sha256sum "$cache/src/$SDIST" | cut -d' ' -f1)"
        if [ "$got" != "$SDIST_SHA256" ]; then
            echo "$SDIST: sha256 $got, expected $SDIST_SHA256" >&2
            rm -f "$cache/src/$SDIST"
            exit 1
        fi
    fi
    work="$(mktemp -d "$cache/build-$key.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    tar xzf "$cache/src/$SDIST" -C "$work" --strip-components=3 \
        "llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
    # One patch (json-space-1): the grammar llama-server builds from a JSON
    # schema (response_format, tool calls) allows at most one space between
    # two tokens of JSON, as llama.cpp's Python converter and
    # llama-cpp-python do, instead of up to two newlines and 20 spaces or
    # tabs at every such place: small models (SmolLM2) fill max_tokens with
    # that whitespace and the JSON never closes.
    rules="$work/common/json-schema-to-grammar.cpp"
    grep -q '^const std::string SPACE_RULE = ' "$rules" || {
        echo "$rules: SPACE_RULE not found; the json-space-1 patch needs updating" >&2
        exit 1
    }
    sed -i 's|^const std::string SPACE_RULE = .*|const std::string SPACE_RULE = "\\" \\"?";|' "$rules"
    echo "==> building llama-server and ggml-rpc-server ($flavour; 10-15 minutes on 2 cores)"
    generator=()
    if command -v ninja >/dev/null; then generator=(-G Ninja); fi
    # Static libraries: the two binaries are self-contained and can be copied.
    # No web UI (it would be downloaded), no TLS, tests or examples.
    # shellcheck disable=SC2086
    cmake -S "$work" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_RPC=ON \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF $gpu_args $extra_args \
        > "$work/configure.log" 2>&1 || { tail -40 "$work/configure.log" >&2; exit 1; }
    cmake --build "$work/build" --target llama-server ggml-rpc-server \
        -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
        > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
    mkdir -p "$work/out/bin"
    cp "$work/build/bin/llama-server" "$work/build/bin/ggml-rpc-server" "$work/out/bin/"
    printf '{"source": "%s", "llama_cpp_commit": "0c1e570", "patches": "%s", "flavour": "%s", "cmake_args": "%s", "built": "%s"}\n' \
        "$SDIST" "$PATCHES" "$flavour" "$gpu_args $extra_args" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        > "$work/out/build-info.json"
    rm -rf "$out"
    mv "$work/out" "$out"
    rm -rf "$work"
    trap - EXIT
fi

mkdir -p "$dest"
for bin in llama-server ggml-rpc-server; do
    # Copy to a temporary name and rename: a running llama-server keeps its
    # inode, and a reader never sees half a file.
    cp "$out/bin/$bin" "$dest/.$bin.tmp"
    mv -f "$dest/.$bin.tmp" "$dest/$bin"
done
cp "$out/build-info.json" "$dest/llama-server.build-info.json"
echo "==> llama-server ready: $dest/llama-server (cache $out)"
