#!/usr/bin/env bash
# Installs Pollinate for the current user from this source tree (or uninstalls it with --uninstall).
set -euo pipefail
source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
prefix="$data_home/pollinate/venv"
launcher="$HOME/.local/bin/pollinate"
desktop_file="$data_home/applications/pollinate.desktop"

if [ "${1:-}" = "--uninstall" ]; then
  rm -rf "$prefix" "$launcher" "$desktop_file"
  echo "Pollinate removed (your settings, history and models stay in $data_home/pollinate)."
  exit 0
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -m venv "$prefix"
"$prefix/bin/python" -m pip install --quiet --upgrade pip
if [ -n "${POLLINATE_TORCH_INDEX_URL:-}" ]; then
  "$prefix/bin/python" -m pip install --quiet torch==2.13.0 --index-url "$POLLINATE_TORCH_INDEX_URL"
else
  "$prefix/bin/python" -m pip install --quiet torch==2.13.0
fi
"$prefix/bin/python" -m pip install --quiet "$source_dir"

mkdir -p "$(dirname "$launcher")" "$(dirname "$desktop_file")"
ln -sf "$prefix/bin/pollinate" "$launcher"
icon=$("$prefix/bin/python" -c 'import app, pathlib; print(pathlib.Path(app.__file__).parent / "resources" / "pollinate.svg")')
sed -e "s#@LAUNCHER@#$prefix/bin/pollinate#" -e "s#@ICON@#$icon#" \
  "$source_dir/installers/linux/pollinate.desktop.in" >"$desktop_file"
echo "Pollinate installed: run 'pollinate' or open it from your application menu."
