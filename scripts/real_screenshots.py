"""The README's screenshots, from the real app on the real engine: the local demo swarm serving SmolLM2.

    python scripts/real_screenshots.py OUT_DIR

Starts the desktop app offscreen with a fresh data directory (it starts `pollinate-engine run`, whose two
demo servers host SmolLM2-135M-Instruct), turns sharing on, asks two questions in the chat window at
temperature 0, and writes demo-dashboard.png and demo-chat.png. A prepared SmolLM2 in the usual data
directory is linked in, so the run skips the ~20 s preparation. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUESTIONS = ("What is the capital of France?", "Name three colours of the rainbow.")


def pump(app, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def wait_for(app, condition, what: str, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what}")
        pump(app, 0.05)


def link_prepared_model(data_dir: Path) -> None:
    """Reuse a SmolLM2 the engine already prepared in the usual data directory (if there is one)."""
    from engine.smollm2 import read_marker, smollm2_path

    prepared = smollm2_path()
    if read_marker(prepared) is not None:
        target = smollm2_path(data_dir / "models")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(prepared.resolve(), target_is_directory=True)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pollinate-real-shots-"))
    link_prepared_model(tmp / "data")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["POLLINATE_DATA_DIR"] = str(tmp / "data")
    os.environ["POLLINATE_CONFIG_DIR"] = str(tmp / "config")
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "xdg")
    os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"

    from app.controller import AppController
    from app.qt import QApplication
    from app.settings import Settings

    app = QApplication.instance() or QApplication(sys.argv)
    ctl = AppController(Settings(onboarded=True, swarm="local"), use_system_tray=False)
    ctl.confirm_quit = False
    ctl.quit_app = lambda: None
    ctl.start()
    try:
        dashboard = ctl.dashboard
        dashboard.resize(980, 700)
        wait_for(app, lambda: dashboard.share_button.isEnabled(), "the engine to be ready")
        dashboard.share_button.click()
        wait_for(app, lambda: ctl.tray.state == "serving", "sharing to start")
        pump(app, 3.0)  # a stats event or two
        dashboard.grab().save(str(out / "demo-dashboard.png"))

        ctl.show_chat()
        chat = ctl.chat_window
        chat.resize(980, 700)
        wait_for(app, lambda: bool(ctl.chat_model.models), "the model list")
        chat.temperature.setValue(0.0)
        chat.max_tokens.setValue(64)
        for question in QUESTIONS:
            chat.input.setPlainText(question)
            chat.send_button.click()
            pump(app, 0.5)
            wait_for(app, lambda: not ctl.chat_model.streaming, "the reply")
        pump(app, 1.0)
        chat.grab().save(str(out / "demo-chat.png"))
        print("\n".join(f"{m.role}: {m.content}" for m in ctl.chat_model.messages))
    finally:
        ctl.shutdown()
    print(f"wrote {out / 'demo-dashboard.png'} and {out / 'demo-chat.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
