#!/usr/bin/env bash
# Create the virtual environment ./.venv and install the pinned requirements (CPU torch 2.13.0).
# GPU machines: set TORCH_SPEC to your CUDA build first, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh
# The environment itself lives outside the checkout (VENV_DIR, default ~/.cache/openalpaca/venv-*)
# and ./.venv links to it, so searching the source tree never wades through installed packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -e .venv ]]; then
    VENV_DIR=${VENV_DIR:-$HOME/.cache/openalpaca/venv-$(pwd | sha1sum | cut -c1-12)}
    mkdir -p "$(dirname "$VENV_DIR")"
    [[ -x "$VENV_DIR/bin/python" ]] || python3 -m venv "$VENV_DIR"
    ln -s "$VENV_DIR" .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and alone: an unpinned or indirect request would pull a multi-GB CUDA build.
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
# llama-cpp-python is built from source by pip (cmake): on every core.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} .venv/bin/python -m pip install -q -r requirements.txt
# The chat page's browser test (tests/test_serve.py) drives Debian's headless Chromium: as root, install it once.
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null \
        && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null || echo "warning: no chromium or chromium-driver: the chat page's browser test will be skipped"
fi
# llama.cpp's converter for scripts/export_gguf.sh: the copy inside llama-cpp-python's source release (the version
# requirements.txt pins, so it matches the runtime pip built), kept inside the environment, never in the checkout.
LCP_VERSION=$(sed -n 's/^llama-cpp-python\[server\]==\([0-9.]*\).*/\1/p' requirements.txt)
CONVERTER=.venv/share/llama.cpp-converter-$LCP_VERSION
if [[ -n $LCP_VERSION && ! -f $CONVERTER/convert_hf_to_gguf.py ]]; then
    sdist=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" -d "$sdist"
    tar xzf "$sdist/llama_cpp_python-$LCP_VERSION.tar.gz" -C "$sdist" \
        "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/gguf-py"
    mkdir -p .venv/share && rm -rf "$CONVERTER.tmp"
    mv "$sdist/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp" "$CONVERTER.tmp" && mv "$CONVERTER.tmp" "$CONVERTER"
    rm -rf "$sdist"
fi
# The Modelfile test (tests/test_gguf.py) renders ollama's template with Go's text/template: as root, install Go once.
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null && ! command -v go >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go; } \
        >/dev/null || echo "warning: no golang-go: the Modelfile template test will be skipped"
fi
.venv/bin/python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
