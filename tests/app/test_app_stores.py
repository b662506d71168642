"""Every store survives (issue 12 #4): a damaged chat history or settings file is set aside, the app starts
and says what it set aside and where."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from app.controller import AppController
from app.history import ChatHistory
from app.settings import Settings, load_settings, settings_file
from contract.stores import acknowledge, open_store, pending


def _good_history(path: Path) -> None:
    history = ChatHistory(path).open()
    conversation = history.create_conversation("old chat")
    for i in range(20):  # several pages (each commit syncs to disk: keep them few)
        history.add_message(conversation, "user", f"message {i} " + "x" * 2000)
    history.close()


def _damage(path: Path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(os.urandom(5000))
        return
    if kind == "directory":
        (path / "inside").mkdir(parents=True)
        return
    _good_history(path)
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "garbage after header":
        path.write_bytes(data[:16] + os.urandom(len(data) - 16))
    elif kind == "corrupt page":
        page = int.from_bytes(data[16:18], "big")
        data[page * 3 : page * 4] = b"\xa5" * page  # a b-tree page of the messages table, overwritten
        path.write_bytes(bytes(data))
    elif kind == "wrong schema":
        path.unlink()
        db = sqlite3.connect(path)
        db.executescript("CREATE TABLE conversations (id INTEGER PRIMARY KEY, name TEXT);")
        db.execute("INSERT INTO conversations (name) VALUES ('x')")
        db.commit()
        db.close()


KINDS = ["random bytes", "truncated", "garbage after header", "directory", "corrupt page", "wrong schema"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_chat_history_is_set_aside_and_a_new_one_works(tmp_path, kind):
    path = tmp_path / "chat-history.sqlite3"
    _damage(path, kind)
    history = ChatHistory(path).open()
    try:
        # Everything a chat window does works on the fresh history, now and not only at open.
        conversation = history.create_conversation("new chat")
        history.add_message(conversation, "user", "hello")
        assert [c.title for c in history.conversations()] == ["new chat"]
        assert [m.content for m in history.messages(conversation)] == ["hello"]
    finally:
        history.close()
    assert history.set_aside is not None
    (aside,) = tmp_path.glob("chat-history.sqlite3.corrupt-*")
    assert history.set_aside.moved_to == str(aside)
    (notice,) = pending(tmp_path)
    assert notice.store == "chat history" and str(aside) in notice.message()


def test_a_sound_history_is_kept(tmp_path):
    path = tmp_path / "chat-history.sqlite3"
    _good_history(path)
    history = ChatHistory(path).open()
    assert history.set_aside is None and len(history.messages(history.conversations()[0].id)) == 20
    history.close()
    assert pending(tmp_path) == []


def test_open_store_sets_aside_only_damage(tmp_path):
    path = tmp_path / "store.json"
    path.write_text("[" * 50_000)

    def read(where: Path):
        import json

        return json.loads(where.read_text()) if where.exists() else "fresh"

    value, aside = open_store(path, read, store="test store", notices=tmp_path)
    assert value == "fresh" and aside.reason == "nested too deeply"
    assert Path(aside.moved_to).read_text() == "[" * 50_000

    def no_permission(where: Path):
        raise PermissionError("no")

    path.write_text("{}")
    with pytest.raises(PermissionError):  # not damage: nothing is moved
        open_store(path, no_permission, store="test store", notices=tmp_path)
    assert path.read_text() == "{}"
    acknowledge(tmp_path, pending(tmp_path))
    assert pending(tmp_path) == []


def test_damaged_settings_are_set_aside_with_a_notice(app_dirs):
    settings_file().write_text('{"temperature": "hot"}')
    assert load_settings() == Settings()
    (aside,) = settings_file().parent.glob("settings.json.corrupt-*")
    (notice,) = pending(app_dirs["data"])
    assert notice.store == "settings" and notice.moved_to == str(aside)


def test_the_app_starts_with_a_damaged_history_and_says_where_it_went(qtbot, app_dirs, fake_engine):
    _damage(app_dirs["data"] / "chat-history.sqlite3", "garbage after header")
    fake_engine.write_state_file(app_dirs["data"])
    controller = AppController(Settings(onboarded=True), manage_engine=False, use_system_tray=False)
    controller.confirm_quit = False
    controller.quit_app = lambda: None
    try:
        controller.start()
        (aside,) = app_dirs["data"].glob("chat-history.sqlite3.corrupt-*")
        assert "chat history" in controller.presenter.last and str(aside) in controller.presenter.last
        assert pending(app_dirs["data"]) == []  # told once
        qtbot.waitUntil(lambda: controller.engine.state == "running", timeout=5000)
        controller.show_chat()
        assert controller.history.conversations() == []
    finally:
        controller.shutdown()
        for window in (controller.dashboard, controller._chat_window):
            if window is not None:
                window.deleteLater()
        qtbot.wait(20)
