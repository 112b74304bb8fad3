#!/usr/bin/env bash
# Prepares a fresh machine for napari-mil: the Xvfb packages on Debian/Ubuntu, a virtual
# environment in .venv, torch (CPU build unless an NVIDIA GPU is present) and the package with
# its test tools. Safe to re-run: finished steps are skipped.
#   NAPARI_MIL_QT=pyqt6   use PyQt6 instead of the default PyQt5
#   NAPARI_MIL_VENV=DIR   put the environment elsewhere
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${NAPARI_MIL_VENV:-.venv}
QT=${NAPARI_MIL_QT:-pyqt5}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=$(sed -n 's/^torch==//p' scripts/constraints.txt)
say() { printf '[setup] %s\n' "$*" >&2; }

# Qt under a virtual X server needs these libraries; napari cannot draw offscreen.
SYSTEM_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0
  libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 libxkbcommon-x11-0
  libdbus-1-3 libgl1 libegl1 libfontconfig1"
if command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then
  missing=""
  for pkg in $SYSTEM_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    say "installing system packages:$missing"
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; }; then
      say "could not install$missing (no root?); the GUI tests and the headless demo need them"
    fi
  fi
else
  command -v Xvfb >/dev/null 2>&1 || say "not Debian/Ubuntu: install Xvfb yourself for the GUI tests and the headless demo"
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "installing torch $TORCH_VERSION (CUDA build)"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  else
    # CPU build. A torch wheel that pip's configuration provides locally comes first (its
    # dependencies then come from the index); otherwise PyTorch's CPU index. Plain PyPI would
    # pull several GB of CUDA libraries that a machine without a GPU cannot use.
    say "installing torch $TORCH_VERSION (CPU build)"
    if "${PIP[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
      "${PIP[@]}" install -q "torch==$TORCH_VERSION"
    else
      "${PIP[@]}" install -q "torch==$TORCH_VERSION" \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
  fi
fi

stamp="$VENV/.napari-mil-installed"
want="$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-16)-$QT"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing napari-mil[$QT,testing]"
  "${PIP[@]}" install -q -c scripts/constraints.txt -e ".[$QT,testing]"
  echo "$want" > "$stamp"
fi
