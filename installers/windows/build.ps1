# UNTESTED (written on Linux, where only makensis could check pollinate.nsi): builds Pollinate-<version>-Setup.exe
# on Windows. Needs Python 3.11 (python.org), NSIS 3 (makensis on PATH) and internet access.
#   powershell -ExecutionPolicy Bypass -File installers\windows\build.ps1
$ErrorActionPreference = "Stop"
$Root = Resolve-Path "$PSScriptRoot\..\.."
Set-Location $Root
$Version = (python -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])").Trim()

# 1. The GUI, frozen (PySide6 and the app only; no torch).
python -m venv build\win-venv
build\win-venv\Scripts\python -m pip install --quiet --upgrade pip
build\win-venv\Scripts\python -m pip install --quiet "PySide6-Essentials>=6.7,<6.12" psutil keyring platformdirs "pyinstaller>=6.10"
build\win-venv\Scripts\python -m PyInstaller --noconfirm --distpath build\dist --workpath build\work installers\pyinstaller\pollinate.spec

# 2. The payload from which the app creates the Pollinate WSL distribution on its first start.
$Payload = "build\wsl-payload"
Remove-Item -Recurse -Force $Payload -ErrorAction SilentlyContinue
New-Item -ItemType Directory $Payload | Out-Null
build\win-venv\Scripts\python -m pip wheel --quiet --no-deps --wheel-dir $Payload .
Copy-Item installers\windows\setup-engine.sh, installers\engine_requirements.py $Payload
# Ubuntu's minimal root file system (about 30 MB), checked against Ubuntu's published SHA256SUMS.
$Base = "https://cdimage.ubuntu.com/ubuntu-base/releases/24.04/release"
$Sums = (Invoke-WebRequest "$Base/SHA256SUMS" -UseBasicParsing).Content
$Line = ($Sums -split "`n" | Where-Object { $_ -match "ubuntu-base-24\.04(\.\d+)?-base-amd64\.tar\.gz$" } | Select-Object -Last 1)
$Hash, $Name = ($Line -split "\s+\*?")
Invoke-WebRequest "$Base/$Name" -OutFile "$Payload\rootfs.tar.gz" -UseBasicParsing
if ((Get-FileHash "$Payload\rootfs.tar.gz" -Algorithm SHA256).Hash -ne $Hash.ToUpper()) { throw "rootfs checksum mismatch" }

# 3. The installer.
makensis "-DDIST=$Root\build\dist\pollinate" "-DPAYLOAD=$Root\$Payload" "-DVERSION=$Version" "-DOUTFILE=$Root\build\Pollinate-$Version-Setup.exe" installers\windows\pollinate.nsi
Write-Output "build\Pollinate-$Version-Setup.exe"
