#!/usr/bin/env bash
# UNTESTED (written and checked on Linux only): builds Pollinate.app and a .dmg on a Mac.
#   build/dist/Pollinate.app                            the GUI (PyInstaller, no torch)
#   Pollinate.app/Contents/Resources/engine/            the Pollinate wheel and install-engine.sh
#   build/Pollinate-<version>.dmg                       the app, an Applications link, "Install the engine.command"
# The engine runs in a virtual environment beside the app: ~/Library/Application Support/pollinate/engine-venv
# (made by install-engine.sh; the app finds it there). Hosting uses MPS on Apple silicon or the CPU; there is
# no bitsandbytes quantization on macOS. Usage: PYTHON=python3.11 installers/macos/build_app.sh
set -euo pipefail
source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}
cd "$source_dir"
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
"$python" -m PyInstaller --noconfirm --distpath build/dist --workpath build/work installers/pyinstaller/pollinate.spec
app=build/dist/Pollinate.app
[ -d "$app" ] || { echo "error: PyInstaller made no $app" >&2; exit 1; }
engine="$app/Contents/Resources/engine"
mkdir -p "$engine"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$engine" "$source_dir"
cp installers/macos/install-engine.sh installers/engine_requirements.py "$engine/"
chmod +x "$engine/install-engine.sh"
# Ad-hoc signature so Gatekeeper runs it on this Mac; distribution needs a Developer ID and notarization.
codesign --force --deep --sign - "$app"
staging=build/dmg
rm -rf "$staging"
mkdir -p "$staging"
cp -R "$app" "$staging/"
ln -s /Applications "$staging/Applications"
printf '#!/bin/sh\nexec "/Applications/Pollinate.app/Contents/Resources/engine/install-engine.sh"\n' \
  >"$staging/Install the engine.command"
chmod +x "$staging/Install the engine.command"
hdiutil create -volname Pollinate -srcfolder "$staging" -ov -format UDZO "build/Pollinate-$version.dmg"
echo "build/Pollinate-$version.dmg"
