"""Render every app window offscreen, against the fake engine, to PNG files.

    python scripts/screenshots.py OUT_DIR

Writes dashboard.png, dashboard-idle.png, chat.png, chat-demo.png, settings.png, onboarding.png, tray-menu.png
and the tray icons. Uses tests/app/fake_engine.py, so no engine, GPU or network is needed.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "app")]

REPLY = (
    "Here is a short **overview** of how the swarm answered you:\n\n"
    "1. Your prompt was embedded on *this* computer.\n"
    "2. Blocks 0–15 ran on a server in Berlin, blocks 16–31 on yours.\n"
    "3. The final layer norm and LM head ran here again.\n\n"
    "```python\nfor token in session.generate(prompt):\n    print(token, end='')\n```\n\n"
    "Each server keeps the attention cache for your session, so only the new token travels."
)


def pump(app, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def wait_for(app, condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the window never reached the state to capture")
        pump(app, 0.02)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pollinate-shots-"))
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["POLLINATE_DATA_DIR"] = str(tmp / "data")
    os.environ["POLLINATE_CONFIG_DIR"] = str(tmp / "config")
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "xdg")
    os.environ["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"

    import dataclasses

    from fake_engine import FakeEngine

    from app.controller import AppController
    from app.qt import QApplication, QSize
    from app.settings import Settings
    from app.tray import state_icon
    from app.viewmodels.dashboard import with_stats
    from app.windows.onboarding import OnboardingDialog

    app = QApplication([])
    app.setApplicationName("Pollinate")
    fake = FakeEngine(num_blocks=32, word_delay=0.005)
    first_half = [3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 1, 1]
    fake.servers_per_block = first_half + [2] * 8 + [1, 1, 0, 0, 1, 1, 2, 2]
    fake.start()
    fake.write_state_file(Path(os.environ["POLLINATE_DATA_DIR"]))
    controller = AppController(Settings(onboarded=True), manage_engine=False, use_system_tray=False)
    controller.confirm_quit = False
    controller.start()
    wait_for(app, lambda: controller.engine.state == "running" and controller.feed.connected)
    wait_for(app, lambda: controller.dashboard_model.snapshot.plan is not None)

    dashboard = controller.dashboard
    dashboard.resize(QSize(820, 760))
    pump(app, 0.3)
    dashboard.grab().save(str(out / "dashboard-idle.png"))

    # Sharing, with fifteen minutes of made-up history for the plot.
    fake.load_delay = 0.01
    dashboard.share_button.click()
    wait_for(app, lambda: controller.tray.state == "serving")
    now = time.time()
    model = controller.dashboard_model
    snapshot, tokens, requests = model.snapshot, 0.0, 0.0
    for i in range(300, 0, -1):
        tokens += max(0.0, 18 + 12 * math.sin(i / 17) + 6 * math.sin(i / 5))
        requests += 0.05
        snapshot = with_stats(snapshot, {"tokens_served": tokens, "requests_served": requests}, now - i)
    model._replace(dataclasses.replace(snapshot, history=snapshot.history))
    fake.add_stats(
        tokens=int(tokens) + 22,
        requests=int(requests),
        uptime_seconds=5410,
        hosting_seconds=4980,
        sessions_active=3,
        points=1284.5,
        priority=1.42,
    )
    wait_for(app, lambda: (model.snapshot.stats or {}).get("sessions_active") == 3)
    pump(app, 0.3)
    dashboard.grab().save(str(out / "dashboard.png"))

    # Chat with a real model, then the demo model.
    controller.show_chat()
    chat = controller.chat_window
    chat.resize(QSize(980, 700))
    wait_for(app, lambda: len(controller.chat_model.models) == 2)
    fake.reply_text = REPLY
    chat.input.setPlainText("How did the swarm answer me?")
    chat.send_button.click()
    wait_for(app, lambda: not controller.chat_model.streaming and len(controller.chat_model.messages) == 2)
    chat.input.setPlainText("Thanks! Can it ")
    pump(app, 0.3)
    chat.grab().save(str(out / "chat.png"))

    controller.chat_model.new_conversation()
    chat.model_picker.setCurrentIndex(1)
    chat.model_picker.activated.emit(1)
    fake.reply_text = "ozone fridge ??? luminous the the ## banana relay 42 quietly"
    chat.input.setPlainText("Hello demo!")
    chat.send_button.click()
    wait_for(app, lambda: not controller.chat_model.streaming and len(controller.chat_model.messages) == 2)
    pump(app, 0.2)
    chat.grab().save(str(out / "chat-demo.png"))

    dialog = controller.settings_dialog()
    dialog.show()
    pump(app, 0.2)
    dialog.grab().save(str(out / "settings.png"))
    dialog.close()

    onboarding = OnboardingDialog(Settings(), free_bytes=21 * 2**30)
    onboarding.show()
    pump(app, 0.2)
    onboarding.grab().save(str(out / "onboarding.png"))
    onboarding.close()

    menu = controller.tray.menu
    menu.adjustSize()
    menu.grab().save(str(out / "tray-menu.png"))
    for state in ("idle", "loading", "serving", "paused", "error", "app"):
        state_icon(state).pixmap(64, 64).save(str(out / f"icon-{state}.png"))

    controller.shutdown()
    fake.stop()
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
