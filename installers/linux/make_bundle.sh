#!/usr/bin/env bash
# Makes the self-contained Linux bundle directory (and a .tar.gz of it) from the frozen GUI:
#   pollinate-linux-<arch>/
#     gui/            the PyInstaller one-folder app (no torch)
#     wheels/         the Pollinate wheel, installed into the engine's virtual environment
#     install.sh      per-user install (--uninstall [--purge] removes it again)
#     pollinate.desktop.in, pollinate.svg, engine_requirements.py
# Usage: installers/linux/make_bundle.sh [DIST_DIR (default build/dist)] [OUT_DIR (default build)]
# Build the GUI first: python installers/build_bundle.py (or pyinstaller installers/pyinstaller/pollinate.spec).
set -euo pipefail
source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dist=${1:-$source_dir/build/dist}
out=${2:-$source_dir/build}
default_python=python3
[ -x "$source_dir/.venv/bin/python" ] && default_python="$source_dir/.venv/bin/python"
python=${PYTHON:-$default_python}  # needs pip and setuptools (to build the wheel)
[ -x "$dist/pollinate/pollinate" ] || { echo "error: no frozen app in $dist/pollinate (build it first)" >&2; exit 1; }
bundle="$out/pollinate-linux-$(uname -m)"
rm -rf "$bundle"
mkdir -p "$bundle/wheels"
cp -a "$dist/pollinate" "$bundle/gui"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$bundle/wheels" "$source_dir"
cp "$source_dir/installers/linux/bundle-install.sh" "$bundle/install.sh"
cp "$source_dir/installers/linux/pollinate.desktop.in" "$source_dir/app/resources/pollinate.svg" \
  "$source_dir/installers/engine_requirements.py" "$bundle/"
chmod +x "$bundle/install.sh"
tar -C "$out" -czf "$bundle.tar.gz" "$(basename "$bundle")"
echo "$bundle"
