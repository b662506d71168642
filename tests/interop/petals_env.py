"""Build (once, cached) a separate virtual environment with the published Petals 2.2 for interop tests.

``pip install petals==2.2.0.post1`` does not work on a current machine without GitHub access, so the
steps are spelled out here:

1. Petals pins ``hivemind==1.1.10.post2``, which PyPI has only as an sdist whose setup.py imports
   ``pkg_resources``: it is built with ``--no-build-isolation`` after ``setuptools<70`` is installed (in
   a pip step of its own, after ``grpcio-tools``, which otherwise pulls a newer setuptools).
2. That setup.py downloads the p2pd daemon from GitHub. The p2pd inside the ``hivemind==1.1.12`` wheel
   (go-libp2p-daemon v0.5.0.hivemind1) speaks the same daemon protocol: it is copied into the unpacked
   sdist and setup.py's expected sha256 is replaced by its hash, so no download is attempted.
3. hivemind 1.1.10.post2 imports ``torch.cuda.amp.grad_scaler`` helpers that torch 2.3 removed: the import
   is pointed at ``torch.amp.grad_scaler`` (what hivemind 1.1.11 did).
4. ``multiaddr==0.0.9``: 0.2.0 breaks every streaming RPC of hivemind 1.1.10 ("Connection lost").

The venv lives in ``<repo>/.petals-venv/venv`` (git-ignored); a marker holding the build spec is written
last, so a half-built venv (or one built from another spec) is rebuilt. A file lock serialises builds.

Run ``python tests/interop/petals_env.py [--rebuild]`` to build it and print its python.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_ROOT = Path(os.environ.get("POLLINATE_PETALS_ENV", REPO_ROOT / ".petals-venv"))

PETALS_VERSION = "2.2.0.post1"
HIVEMIND_VERSION = "1.1.10.post2"
TORCH_VERSION = "2.13.0"
P2PD_DONOR_HIVEMIND = "1.1.12"  # its wheel ships p2pd v0.5.0.hivemind1
P2PD_DONOR_SHA256 = "42f8f48e62583b97cdba3c31439c08029fb2b9fc506b5bdd82c46b7cc1d279d8"

# Pins applied to every install step. transformers/tokenizers/huggingface-hub follow from Petals' own
# pins (transformers>=4.32,<4.35); numpy<2 because transformers 4.34 predates numpy 2; accelerate and
# pydantic stay at versions of Petals 2.2's time.
CONSTRAINTS = (
    f"torch=={TORCH_VERSION}",
    "multiaddr==0.0.9",
    "numpy<2",
    "transformers==4.34.1",
    "pydantic<2",
    # accelerate>=0.28 imports helpers that huggingface-hub 0.17 (pinned through transformers) lacks.
    "accelerate==0.23.0",
)
# Changing anything that shapes the venv changes the spec, and a changed spec triggers a rebuild.
BUILD_SPEC = "\n".join(
    [
        f"petals=={PETALS_VERSION}",
        f"hivemind=={HIVEMIND_VERSION}",
        f"p2pd={P2PD_DONOR_SHA256}",
        "recipe=1",
        *CONSTRAINTS,
    ]
)

VENV_DIR = ENV_ROOT / "venv"
MARKER = VENV_DIR / "pollinate-petals-ready.txt"
BUILD_LOG = ENV_ROOT / "build.log"


class PetalsEnvError(RuntimeError):
    """The Petals environment could not be built; the message ends with the tail of the build log."""


def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    return venv_dir / "bin" / "python"


def is_ready() -> bool:
    """True when a complete venv built from the current spec is in place."""
    return MARKER.is_file() and MARKER.read_text() == BUILD_SPEC and venv_python().exists()


def ensure_petals_env(rebuild: bool = False) -> Path:
    """Return the python of the Petals venv, building it first if it is missing, partial or stale."""
    ENV_ROOT.mkdir(parents=True, exist_ok=True)
    with open(ENV_ROOT / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building it right now
        if rebuild or not is_ready():
            _build()
    return venv_python()


def log_tail(lines: int = 60) -> str:
    if not BUILD_LOG.exists():
        return "(no build log)"
    return "\n".join(BUILD_LOG.read_text(errors="replace").splitlines()[-lines:])


def _build() -> None:
    shutil.rmtree(VENV_DIR, ignore_errors=True)
    work = ENV_ROOT / "src"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    with open(BUILD_LOG, "w") as log:
        try:
            _build_steps(work, log)
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            log.write(f"\nBUILD FAILED: {exc!r}\n")
            log.flush()
            raise PetalsEnvError(f"building the Petals venv failed ({exc}); log tail:\n{log_tail()}") from exc
        log.write(f"\nbuilt in {time.monotonic() - started:.0f} s\n")
    MARKER.write_text(BUILD_SPEC)  # last: its presence means the venv is complete
    shutil.rmtree(work, ignore_errors=True)


def _build_steps(work: Path, log) -> None:
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(CONSTRAINTS) + "\n")

    def run(*args: str | Path, cwd: Path | None = None) -> None:
        log.write(f"\n[{time.strftime('%H:%M:%S')}] $ {' '.join(map(str, args))}\n")
        log.flush()
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
        env.pop("PIP_REQUIRE_VIRTUALENV", None)
        subprocess.run(
            list(map(str, args)), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True
        )

    python = venv_python()
    pip = (python, "-m", "pip")
    run(base_python, "-m", "venv", VENV_DIR)
    # Torch first, from the pinned version, so no later step pulls another build.
    run(*pip, "install", "-c", constraints, f"torch=={TORCH_VERSION}")
    # Build tools for hivemind's setup.py; setuptools<70 in its own step (grpcio-tools wants a newer one).
    run(*pip, "install", "grpcio-tools", "wheel")
    run(*pip, "install", "setuptools<70")

    run(*pip, "download", "--no-deps", "--no-build-isolation", f"hivemind=={HIVEMIND_VERSION}", "-d", work)
    (sdist,) = work.glob(f"hivemind-{HIVEMIND_VERSION}.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    source = work / f"hivemind-{HIVEMIND_VERSION}"
    _patch_hivemind_source(source, _donor_p2pd(work, run, pip), log)

    wheels = work / "wheels"
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source)
    (hivemind_wheel,) = wheels.glob("hivemind-*.whl")
    run(*pip, "install", "-c", constraints, hivemind_wheel, f"petals=={PETALS_VERSION}")

    smoke = (
        "import hivemind, petals, transformers, torch; "
        "from hivemind.optim import GradScaler; "
        "import petals.cli.run_server; "
        "print('petals', petals.__version__, 'hivemind', hivemind.__version__, "
        "'transformers', transformers.__version__, 'torch', torch.__version__)"
    )
    run(python, "-c", smoke)
    run(*pip, "freeze")


def _donor_p2pd(work: Path, run, pip) -> Path:
    """The p2pd binary of hivemind 1.1.12: from this interpreter's hivemind if it is that one, else PyPI."""
    spec = importlib.util.find_spec("hivemind")
    if spec is not None and spec.origin is not None:
        local = Path(spec.origin).parent / "hivemind_cli" / "p2pd"
        if local.is_file() and _sha256(local) == P2PD_DONOR_SHA256:
            return local
    donor = work / "donor"
    run(
        *pip,
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        f"hivemind=={P2PD_DONOR_HIVEMIND}",
        "-d",
        donor,
    )
    (wheel,) = donor.glob("hivemind-*.whl")
    target = donor / "p2pd"
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read("hivemind/hivemind_cli/p2pd"))
    return target


def _patch_hivemind_source(source: Path, p2pd: Path, log) -> None:
    digest = _sha256(p2pd)
    if digest != P2PD_DONOR_SHA256:
        raise ValueError(f"p2pd at {p2pd} has sha256 {digest}, expected {P2PD_DONOR_SHA256}")
    binary = source / "hivemind" / "hivemind_cli" / "p2pd"
    shutil.copyfile(p2pd, binary)
    binary.chmod(0o755)

    setup_py = source / "setup.py"
    text, count = re.subn(r'("p2pd-linux-amd64": )"[0-9a-f]{64}"', rf'\1"{digest}"', setup_py.read_text())
    if count != 1:
        raise ValueError("could not find the p2pd-linux-amd64 hash in hivemind's setup.py")
    setup_py.write_text(text)

    scaler = source / "hivemind" / "optim" / "grad_scaler.py"
    old = "from torch.cuda.amp.grad_scaler import OptState, _refresh_per_optimizer_state"
    new = "from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state"
    if old not in scaler.read_text():
        raise ValueError(f"could not find {old!r} in {scaler}")
    scaler.write_text(scaler.read_text().replace(old, new))
    log.write(f"patched hivemind source: p2pd sha256 {digest}, grad_scaler import\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a complete venv exists")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        python = ensure_petals_env(rebuild=args.rebuild)
    except PetalsEnvError as exc:
        sys.exit(str(exc))
    print(f"{python}  (ready in {time.monotonic() - started:.0f} s; build log: {BUILD_LOG})")


if __name__ == "__main__":
    main()
