"""Chat window against the fake engine: streaming, Stop, errors, conversations, history across restarts."""

from __future__ import annotations

import pytest
from fake_engine import DEMO_ID

from app.api_client import ApiClient, EngineEndpoint
from app.history import ChatHistory
from app.qt import QApplication, QInputDialog, Qt
from app.viewmodels.chat import ChatModel
from app.windows.chat import ChatWindow


@pytest.fixture
def chat(qtbot, api_client, app_dirs):
    history = ChatHistory(app_dirs["data"] / "chat-history.sqlite3").open()
    model = ChatModel(api_client, history)
    window = ChatWindow(model)
    window.confirm_delete = False
    qtbot.addWidget(window)
    window.show()
    model.set_engine_ready(True)
    qtbot.waitUntil(lambda: len(model.models) == 2, timeout=5000)
    yield window
    model.stop()
    history.close()


def send(qtbot, window, text: str) -> None:
    window.input.setPlainText(text)
    window.send_button.click()


def test_model_picker_labels_the_demo(qtbot, chat):
    texts = [chat.model_picker.itemText(i) for i in range(chat.model_picker.count())]
    assert texts[0].startswith("Llama 3.1 8B Instruct")
    assert "random weights" in texts[1]
    assert not chat.demo_label.isVisible()
    chat.model_picker.setCurrentIndex(1)
    chat.model_picker.activated.emit(1)
    assert chat.model.model_id == DEMO_ID
    assert chat.demo_label.isVisible()


def test_streamed_reply_is_rendered_saved_and_timed(qtbot, chat, fake_engine):
    send(qtbot, chat, "hello swarm")
    assert chat.input.toPlainText() == ""
    assert chat.stop_button.isEnabled() and not chat.send_button.isEnabled()
    qtbot.waitUntil(lambda: "word3" in chat.transcript.toPlainText(), timeout=5000)
    qtbot.waitUntil(lambda: not chat.model.streaming, timeout=5000)
    text = chat.transcript.toPlainText()
    assert "You said hello swarm:" in text  # **bold** rendered as Markdown, not literal stars
    assert "word11" in text
    assert "tokens/s" in chat.speed_label.text()
    assert chat.send_button.isEnabled() and not chat.stop_button.isEnabled()
    messages = chat.model.history.messages(chat.model.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].tokens == 12
    assert chat.conversation_list.item(0).text() == "hello swarm"
    chat.copy_button.click()
    assert "word11" in QApplication.clipboard().text()
    request = next(r for r in fake_engine.requests if r[1] == "/v1/chat/completions")[2]
    assert request["stream"] is True and request["messages"][-1] == {"role": "user", "content": "hello swarm"}


def test_stop_aborts_the_reply_midway(qtbot, chat, fake_engine):
    fake_engine.words, fake_engine.word_delay = 200, 0.03
    send(qtbot, chat, "long story please")
    qtbot.waitUntil(lambda: "word2" in chat.transcript.toPlainText(), timeout=5000)
    chat.stop_button.click()
    assert not chat.model.streaming
    qtbot.waitUntil(lambda: fake_engine.chats_cancelled == 1, timeout=5000)  # the server saw the disconnect
    assert fake_engine.chats_completed == 0
    saved = chat.model.history.messages(chat.model.conversation_id)[-1]
    assert saved.role == "assistant" and "(stopped)" in saved.content and "word199" not in saved.content
    assert "stopped" in chat.notice.text()


def test_swarm_unavailable_shows_missing_blocks(qtbot, chat, fake_engine):
    fake_engine.chat_error = (
        503,
        {
            "message": "blocks 2, 3 have no server",
            "type": "swarm_unavailable",
            "code": 503,
            "missing_blocks": [2, 3],
        },
    )
    send(qtbot, chat, "anyone there?")
    qtbot.waitUntil(lambda: chat.notice.isVisible(), timeout=5000)
    assert "no server holds block(s) 2, 3" in chat.notice.text()
    assert not chat.model.streaming and chat.send_button.isEnabled()


def test_system_prompt_and_sampling_are_sent(qtbot, chat, fake_engine):
    chat.options_button.click()
    chat.system_prompt.setPlainText("Be brief.")
    chat.temperature.setValue(0.2)
    chat.max_tokens.setValue(64)
    send(qtbot, chat, "hi")
    qtbot.waitUntil(lambda: not chat.model.streaming and len(chat.model.messages) == 2, timeout=5000)
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    assert request["messages"][0] == {"role": "system", "content": "Be brief."}
    assert request["temperature"] == pytest.approx(0.2) and request["max_tokens"] == 64


def test_new_rename_delete_conversations(qtbot, chat, monkeypatch):
    send(qtbot, chat, "first")
    qtbot.waitUntil(lambda: not chat.model.streaming, timeout=5000)
    chat.new_button.click()
    assert chat.transcript.toPlainText().startswith("Start a conversation")
    send(qtbot, chat, "second")
    qtbot.waitUntil(lambda: not chat.model.streaming, timeout=5000)
    assert [chat.conversation_list.item(i).text() for i in range(2)] == ["second", "first"]
    monkeypatch.setattr(QInputDialog, "getText", staticmethod(lambda *a, **k: ("Renamed", True)))
    chat.rename_button.click()
    assert chat.conversation_list.item(0).text() == "Renamed"
    chat.delete_button.click()
    assert chat.conversation_list.count() == 1
    chat.conversation_list.setCurrentRow(0)
    assert "first" in chat.transcript.toPlainText()


def test_history_survives_restart(qtbot, app_dirs, fake_engine):
    from fake_engine import TOKEN

    path = app_dirs["data"] / "chat-history.sqlite3"
    for round_ in range(2):
        client = ApiClient()
        client.set_endpoint(EngineEndpoint(fake_engine.base_url, TOKEN))
        history = ChatHistory(path).open()
        model = ChatModel(client, history)
        model.set_engine_ready(True)
        qtbot.waitUntil(lambda model=model: bool(model.models), timeout=5000)
        if round_ == 0:
            model.send("remember me")
            qtbot.waitUntil(lambda model=model: not model.streaming, timeout=5000)
        else:
            conversations = history.conversations()
            assert [c.title for c in conversations] == ["remember me"]
            window = ChatWindow(model)
            qtbot.addWidget(window)
            window.conversation_list.setCurrentRow(0)
            assert (
                "remember me" in window.transcript.toPlainText()
                and "word11" in window.transcript.toPlainText()
            )
        history.close()
        client.set_endpoint(None)


def test_engine_down_disables_send_and_explains(qtbot, chat):
    chat.model.set_engine_ready(False, "The engine stopped unexpectedly (exit code -9). Restarting in 1 s…")
    assert not chat.send_button.isEnabled()
    assert "Restarting" in chat.notice.text()
    chat.model.set_engine_ready(True)
    assert chat.send_button.isEnabled()


def test_engine_notice_goes_once_the_engine_runs(qtbot, chat):
    """Any notice that came from the engine's state ("Starting the engine…") is cleared when it runs."""
    chat.model.set_engine_ready(False, "Starting the engine…")
    assert chat.notice.text() == "Starting the engine…"
    chat.model.set_engine_ready(True)
    assert chat.notice.isHidden()


# ---- chat that never hits the wall (issue 11) ------------------------------------------------------------


def pick_demo(chat) -> None:
    index = chat.model_picker.findData(DEMO_ID)
    chat.model_picker.setCurrentIndex(index)
    chat.model_picker.activated.emit(index)


def wait_reply(qtbot, chat, count: int) -> None:
    qtbot.waitUntil(lambda: not chat.model.streaming and len(chat.model.messages) == count, timeout=5000)


def test_ten_turn_chat_on_a_small_context_never_fails(qtbot, chat, fake_engine):
    """The demo reads 512 tokens: with the default Max tokens (256) the 2nd message used to be refused."""
    pick_demo(chat)
    chat.options_button.click()
    assert "512 tokens" in chat.context_label.text()
    for turn in range(10):
        send(qtbot, chat, f"turn {turn} " + "blah " * 60)
        wait_reply(qtbot, chat, 2 * (turn + 1))
        assert not chat.model.notice_is_error, chat.notice.text()
    # The engine was asked to fit each request; later ones left the oldest turns out, and the app said so.
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    assert request["pollinate"] == {"fit_context": True}
    assert fake_engine.fits[-1].dropped_messages > 0
    assert "oldest messages were left out" in chat.notice.text() and "512 tokens" in chat.notice.text()
    assert chat.notice.isVisible() and not chat.model.notice_is_error


def test_max_tokens_takes_any_count_and_is_lowered_with_a_note(qtbot, chat, fake_engine):
    pick_demo(chat)
    chat.options_button.click()
    chat.max_tokens.clear()
    qtbot.keyClicks(chat.max_tokens, "9000")
    chat.max_tokens.interpretText()
    assert chat.max_tokens.value() == 9000  # (the box used to stop at 8192: typing 9000 gave 900)
    send(qtbot, chat, "hello")
    wait_reply(qtbot, chat, 2)
    assert fake_engine.fits[-1].max_tokens < 512
    assert f"Max tokens lowered to {fake_engine.fits[-1].max_tokens}" in chat.notice.text()


def test_failed_message_is_offered_to_retry_not_resent(qtbot, chat, fake_engine):
    fake_engine.chat_error = (400, {"message": "nope", "type": "invalid_request", "code": 400})
    send(qtbot, chat, "first try")
    qtbot.waitUntil(lambda: chat.retry_button.isVisible(), timeout=5000)
    assert chat.model.notice_is_error and "nope" in chat.notice.text()
    # The failed message left the conversation and waits in the input, to edit or retry.
    assert chat.model.messages == [] and chat.input.toPlainText() == "first try"
    fake_engine.chat_error = None
    chat.retry_button.click()
    wait_reply(qtbot, chat, 2)
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    assert [m["content"] for m in request["messages"]] == ["first try"]
    assert not chat.retry_button.isVisible() and chat.input.toPlainText() == ""
    # A failure, then a different message: only the new one is sent.
    fake_engine.chat_error = (400, {"message": "nope", "type": "invalid_request", "code": 400})
    send(qtbot, chat, "second")
    qtbot.waitUntil(lambda: chat.retry_button.isVisible(), timeout=5000)
    fake_engine.chat_error = None
    chat.input.setPlainText("second, edited")
    chat.retry_button.click()
    wait_reply(qtbot, chat, 4)
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    users = [m["content"] for m in request["messages"] if m["role"] == "user"]
    assert users == ["first try", "second, edited"]


def test_enter_sends_and_shift_enter_adds_a_line(qtbot, chat):
    chat.input.setFocus()
    qtbot.keyClicks(chat.input, "line one")
    qtbot.keyClick(chat.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(chat.input, "line two")
    assert chat.input.toPlainText() == "line one\nline two" and not chat.model.streaming
    qtbot.keyClick(chat.input, Qt.Key.Key_Return)
    assert chat.model.streaming and chat.input.toPlainText() == ""
    wait_reply(qtbot, chat, 2)
    assert chat.model.messages[0].content == "line one\nline two"


def test_regenerate_replaces_the_last_reply(qtbot, chat, fake_engine):
    assert not chat.regenerate_button.isEnabled()
    send(qtbot, chat, "tell me")
    wait_reply(qtbot, chat, 2)
    assert chat.regenerate_button.isEnabled()
    fake_engine.reply_text = "another answer"
    chat.regenerate_button.click()
    wait_reply(qtbot, chat, 2)
    assert [m.content for m in chat.model.messages] == ["tell me", "another answer"]
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    assert [m["role"] for m in request["messages"]] == ["user"]


def test_options_belong_to_each_conversation_and_are_saved(qtbot, chat, app_dirs):
    chat.options_button.click()
    send(qtbot, chat, "first chat")
    wait_reply(qtbot, chat, 2)
    chat.max_tokens.setValue(64)
    chat.temperature.setValue(0.1)
    first = chat.model.conversation_id
    chat.new_button.click()
    chat.max_tokens.setValue(300)
    second = chat.model.conversation_id
    chat.model.open_conversation(first)
    assert chat.max_tokens.value() == 64 and chat.temperature.value() == pytest.approx(0.1)
    chat.model.open_conversation(second)
    assert chat.max_tokens.value() == 300
    # Saved: a new app session (same history file) reads them back.
    history = ChatHistory(app_dirs["data"] / "chat-history.sqlite3").open()
    saved = history.conversation(first)
    assert (saved.max_tokens, saved.temperature) == (64, pytest.approx(0.1))
    history.close()


def test_notices_stay_with_their_conversation_and_stop_is_not_an_error(qtbot, chat, fake_engine):
    fake_engine.words, fake_engine.word_delay = 200, 0.03
    send(qtbot, chat, "long story")
    qtbot.waitUntil(lambda: "word2" in chat.transcript.toPlainText(), timeout=5000)
    chat.stop_button.click()
    assert "stopped" in chat.notice.text() and not chat.model.notice_is_error
    assert "fde2e1" not in chat.notice.styleSheet()  # not the error colour
    chat.new_button.click()
    assert chat.notice.isHidden()


def test_a_reply_that_never_comes_times_out_with_retry(qtbot, chat, fake_engine):
    fake_engine.stalled = {"/v1/chat/completions"}
    chat.model.client.chat_idle_timeout_ms = 400
    send(qtbot, chat, "are you there?")
    qtbot.waitUntil(lambda: chat.retry_button.isVisible(), timeout=5000)
    assert "did not answer within 0.4 s" in chat.notice.text() and not chat.model.streaming
    assert chat.input.toPlainText() == "are you there?"
    fake_engine.closing.set()


def test_a_failed_message_keeps_its_explanation_across_an_engine_restart(qtbot, chat, fake_engine):
    """The walk: a message failed, the engine restarted (back to the local demo), and a bare Retry button
    was left with no word about what it would do."""
    fake_engine.chat_error = (503, {"message": "not in a swarm", "type": "engine_not_ready", "code": 503})
    send(qtbot, chat, "are you there?")
    qtbot.waitUntil(lambda: chat.retry_button.isVisible(), timeout=5000)
    fake_engine.chat_error = None
    chat.model.set_engine_ready(False, "Settings changed: restarting the engine.")
    chat.model.set_engine_ready(True)
    assert chat.retry_button.isVisible() and chat.retry_button.isEnabled()
    assert chat.notice.isVisible() and "Retry" in chat.notice.text() and not chat.model.notice_is_error
    assert chat.input.toPlainText() == "are you there?"
    chat.retry_button.click()
    wait_reply(qtbot, chat, 2)
    assert chat.notice.isHidden() and not chat.retry_button.isVisible()


def test_a_message_of_several_lines_is_shown_on_several_lines(qtbot, chat):
    """The walk: "Write two lines:" Shift+Enter "one about cats." showed as one line in the transcript."""
    chat.input.setFocus()
    qtbot.keyClicks(chat.input, "Write two lines:")
    qtbot.keyClick(chat.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(chat.input, "one about cats.")
    qtbot.keyClick(chat.input, Qt.Key.Key_Return)
    wait_reply(qtbot, chat, 2)
    assert "Write two lines:\none about cats." in chat.transcript.toPlainText()
    assert chat.model.messages[0].content == "Write two lines:\none about cats."  # saved as typed


def test_opening_the_chat_window_shows_the_latest_messages(qtbot, api_client, app_dirs):
    """The walk, after a relaunch: the chat window opened on the first messages of a long conversation."""
    history = ChatHistory(app_dirs["data"] / "chat-history.sqlite3").open()
    conversation = history.create_conversation("long", DEMO_ID, "")
    for turn in range(20):
        history.add_message(conversation, "user", f"question {turn}")
        history.add_message(conversation, "assistant", f"answer {turn} " + "blah " * 60)
    model = ChatModel(api_client, history)
    window = ChatWindow(model)  # built hidden, as the app does, then the conversation, then shown
    qtbot.addWidget(window)
    model.open_conversation(conversation)
    window.show()
    qtbot.waitExposed(window)
    bar = window.transcript.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0 and bar.value() == bar.maximum(), timeout=2000)
    history.close()


def test_the_speed_shown_is_the_open_conversations_and_matches_its_transcript(qtbot, chat):
    """The walk: the bottom line kept the speed of another chat's reply, and said 11.9 tokens/s where the
    transcript said 12.4 for the same reply."""
    send(qtbot, chat, "hello")
    wait_reply(qtbot, chat, 2)
    first = chat.model.conversation_id
    shown = chat.speed_label.text()
    assert shown.endswith(" tokens/s") and f"· {shown}" in chat.transcript.toPlainText()
    chat.new_button.click()
    assert chat.speed_label.text() == ""
    chat.model.open_conversation(first)
    assert chat.speed_label.text() == shown


def test_the_stopped_mark_is_shown_but_never_sent_to_the_model(qtbot, chat, fake_engine):
    """The walk: after a Stop, "*(stopped)*" went to the model with the history, and SmolLM2 took it up:
    every later reply ended in a line of italics."""
    fake_engine.words, fake_engine.word_delay = 200, 0.03
    send(qtbot, chat, "long story please")
    qtbot.waitUntil(lambda: "word2" in chat.transcript.toPlainText(), timeout=5000)
    chat.stop_button.click()
    assert "(stopped)" in chat.transcript.toPlainText()
    fake_engine.words, fake_engine.word_delay = 3, 0.0
    send(qtbot, chat, "and now?")
    wait_reply(qtbot, chat, 4)
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    replies = [m["content"] for m in request["messages"] if m["role"] == "assistant"]
    assert len(replies) == 1 and "word1" in replies[0] and "stopped" not in replies[0]
    assert replies[0] == replies[0].strip()


def test_a_stop_before_any_reply_gives_the_message_back_not_resent_later(qtbot, chat, fake_engine):
    """The walk: Stop before the first token left the question in the chat without a reply, Regenerate off,
    and the next message was sent with it (two questions in a row)."""
    fake_engine.stalled = {"/v1/chat/completions"}  # no token comes before the Stop
    send(qtbot, chat, "write a long essay")
    qtbot.waitUntil(lambda: chat.stop_button.isEnabled(), timeout=3000)
    chat.stop_button.click()
    assert chat.model.messages == [] and chat.input.toPlainText() == "write a long essay"
    assert "stopped" in chat.notice.text().lower() and not chat.model.notice_is_error
    fake_engine.stalled = set()
    chat.input.setPlainText("what colour is the sky?")
    chat.send_button.click()
    wait_reply(qtbot, chat, 2)
    request = [r for r in fake_engine.requests if r[1] == "/v1/chat/completions"][-1][2]
    assert [m["content"] for m in request["messages"] if m["role"] == "user"] == ["what colour is the sky?"]
