"""Chat window: conversation list; model picker, Markdown transcript, input (Enter sends, Shift+Enter adds a
line), Stop, Retry, Regenerate and copy; options per conversation."""

from __future__ import annotations

import dataclasses

from app.qt import (
    QApplication,
    QCloseEvent,
    QComboBox,
    QDoubleSpinBox,
    QEvent,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QKeySequence,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QObject,
    QPlainTextEdit,
    QPushButton,
    QShortcut,
    QShowEvent,
    QSpinBox,
    QSplitter,
    Qt,
    QTextBrowser,
    QTimer,
    QVBoxLayout,
    QWidget,
)
from app.viewmodels.chat import ChatModel, transcript_markdown
from contract import MAX_TOKENS_LIMIT

ERROR_STYLE = "background:#fde2e1; color:#7a1410; padding:6px; border-radius:4px;"
NOTE_STYLE = "background:#e8eef7; color:#1d3557; padding:6px; border-radius:4px;"


class _EnterSends(QObject):
    """Enter sends the message, Shift+Enter adds a line (the convention of chat apps)."""

    def __init__(self, send, parent: QObject):
        super().__init__(parent)
        self._send = send

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        enter = event.type() == QEvent.Type.KeyPress and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        if enter and not event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self._send()
            return True
        return False


class ChatWindow(QMainWindow):
    """Shows a ChatModel; all state lives in the model."""

    def __init__(self, model: ChatModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.confirm_delete = True
        self.setWindowTitle("Pollinate — Chat")
        self.resize(980, 700)
        splitter = QSplitter()

        left = QWidget()
        left_layout = QVBoxLayout(left)
        self.conversation_list = QListWidget()
        self.conversation_list.currentItemChanged.connect(self._conversation_picked)
        self.new_button = QPushButton("New chat")
        self.rename_button = QPushButton("Rename")
        self.delete_button = QPushButton("Delete")
        self.new_button.clicked.connect(self.model.new_conversation)
        self.rename_button.clicked.connect(self._rename)
        self.delete_button.clicked.connect(self._delete)
        left_layout.addWidget(self.new_button)
        left_layout.addWidget(self.conversation_list, 1)
        row = QHBoxLayout()
        row.addWidget(self.rename_button)
        row.addWidget(self.delete_button)
        left_layout.addLayout(row)
        splitter.addWidget(left)

        right = QWidget()
        layout = QVBoxLayout(right)
        top = QHBoxLayout()
        top.addWidget(QLabel("Model:"))
        self.model_picker = QComboBox()
        self.model_picker.setMinimumWidth(320)
        self.model_picker.activated.connect(self._model_picked)
        top.addWidget(self.model_picker, 1)
        self.options_button = QPushButton("Options")
        self.options_button.setCheckable(True)
        top.addWidget(self.options_button)
        layout.addLayout(top)
        self.demo_label = QLabel(
            "This is the demo model: tiny, with random weights. Its replies are gibberish by design; "
            "it shows the swarm working. Pick a real model when the swarm serves one."
        )
        self.demo_label.setWordWrap(True)
        self.demo_label.setStyleSheet("background:#fff3c4; color:#5a4300; padding:6px; border-radius:4px;")
        layout.addWidget(self.demo_label)

        self.options = QGroupBox("Conversation options")
        form = QFormLayout(self.options)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("System prompt (optional), e.g. 'You are a concise assistant.'")
        self.system_prompt.setMaximumHeight(70)
        self.system_prompt.textChanged.connect(
            lambda: self.model.set_system_prompt(self.system_prompt.toPlainText())
        )
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.max_tokens = QSpinBox()
        # Any count may be typed; what the model's context cannot hold is lowered per reply, with a note.
        self.max_tokens.setRange(1, MAX_TOKENS_LIMIT)
        for widget in (self.temperature, self.top_p, self.max_tokens):
            widget.valueChanged.connect(self._sampling_changed)
        self.context_label = QLabel()
        form.addRow("System prompt", self.system_prompt)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max tokens", self.max_tokens)
        form.addRow("Context", self.context_label)
        self.options.setVisible(False)
        self.options_button.toggled.connect(self.options.setVisible)
        layout.addWidget(self.options)

        self.transcript = QTextBrowser()
        self.transcript.setOpenExternalLinks(True)
        layout.addWidget(self.transcript, 1)
        notice_row = QHBoxLayout()
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setStyleSheet(ERROR_STYLE)
        self.retry_button = QPushButton("Retry")
        self.retry_button.setToolTip("Send the message that failed again (or edit it below and press Enter)")
        self.retry_button.clicked.connect(self.retry)
        notice_row.addWidget(self.notice, 1)
        notice_row.addWidget(self.retry_button)
        layout.addLayout(notice_row)

        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message the swarm… (Enter sends, Shift+Enter adds a line)")
        self.input.setMaximumHeight(90)
        self.input.installEventFilter(_EnterSends(self.send, self.input))
        layout.addWidget(self.input)
        bottom = QHBoxLayout()
        self.speed_label = QLabel("")
        self.copy_button = QPushButton("Copy reply")
        self.regenerate_button = QPushButton("Regenerate")
        self.stop_button = QPushButton("Stop")
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.copy_button.clicked.connect(self.copy_last_reply)
        self.regenerate_button.clicked.connect(self.model.regenerate)
        self.stop_button.clicked.connect(lambda: self.model.stop())
        self.send_button.clicked.connect(self.send)
        bottom.addWidget(self.speed_label, 1)
        bottom.addWidget(self.copy_button)
        bottom.addWidget(self.regenerate_button)
        bottom.addWidget(self.stop_button)
        bottom.addWidget(self.send_button)
        layout.addLayout(bottom)
        QShortcut(QKeySequence("Ctrl+Return"), self, activated=self.send)
        splitter.addWidget(right)
        splitter.setSizes([240, 740])
        self.setCentralWidget(splitter)

        self._listed: list[tuple[int, str]] = []
        self.set_sampling_widgets()
        model.changed.connect(self.refresh)
        model.models_changed.connect(self.refresh_models)
        model.notice_changed.connect(self._show_notice)
        self.refresh_models()
        self.refresh()
        self._show_notice(model.notice)

    # ---- actions

    def send(self) -> None:
        if self.model.send(self.input.toPlainText()):
            self.input.clear()

    def retry(self) -> None:
        # An edited message in the input wins over the one that failed.
        edited = self.input.toPlainText().strip()
        if edited and edited != (self.model.failed_text or ""):
            self.model.failed_text = None
            self.send()
        elif self.model.retry():
            self.input.clear()

    def copy_last_reply(self) -> None:
        replies = [m.content for m in self.model.messages if m.role == "assistant"]
        text = self.model.reply.text if self.model.reply else replies[-1] if replies else ""
        QApplication.clipboard().setText(text)

    def _conversation_picked(self, item: QListWidgetItem | None, _previous=None) -> None:
        if item is not None and item.data(Qt.ItemDataRole.UserRole) != self.model.conversation_id:
            self.model.open_conversation(item.data(Qt.ItemDataRole.UserRole))

    def _rename(self) -> None:
        if self.model.conversation_id is None:
            return
        item = self.conversation_list.currentItem()
        title, ok = QInputDialog.getText(self, "Rename chat", "Name:", text=item.text() if item else "")
        if ok:
            self.model.rename_conversation(self.model.conversation_id, title)

    def _delete(self) -> None:
        if self.model.conversation_id is None:
            return
        if self.confirm_delete:
            answer = QMessageBox.question(
                self, "Delete chat", "Delete this conversation? This cannot be undone."
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        self.model.delete_conversation(self.model.conversation_id)

    def _model_picked(self, index: int) -> None:
        self.model.select_model(self.model_picker.itemData(index))

    def _sampling_changed(self) -> None:
        sampling = dataclasses.replace(
            self.model.sampling,
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            max_tokens=self.max_tokens.value(),
        )
        if sampling != self.model.sampling:
            self.model.set_sampling(sampling)

    def set_sampling_widgets(self) -> None:
        sampling = self.model.sampling
        for widget, value in (
            (self.temperature, sampling.temperature),
            (self.top_p, sampling.top_p),
            (self.max_tokens, sampling.max_tokens),
        ):
            widget.blockSignals(True)
            widget.setValue(value)
            widget.blockSignals(False)

    # ---- showing the model

    def refresh_models(self) -> None:
        self.model_picker.clear()
        for choice in self.model.models:
            self.model_picker.addItem(choice.display, choice.id)
        if not self.model.models:
            why = "not connected to a swarm" if self.model.join_problem else "the engine is starting"
            self.model_picker.addItem(f"No model yet ({why})", "")
        index = self.model_picker.findData(self.model.model_id)
        self.model_picker.setCurrentIndex(max(0, index))
        self.refresh()

    def refresh(self) -> None:
        model = self.model
        listed = [(c.id, c.title) for c in model.conversations()]
        if listed != self._listed:
            self._listed = listed
            self.conversation_list.blockSignals(True)
            self.conversation_list.clear()
            for conversation_id, title in listed:
                item = QListWidgetItem(title)
                item.setData(Qt.ItemDataRole.UserRole, conversation_id)
                self.conversation_list.addItem(item)
            self.conversation_list.blockSignals(False)
        for row in range(self.conversation_list.count()):
            if self.conversation_list.item(row).data(Qt.ItemDataRole.UserRole) == model.conversation_id:
                self.conversation_list.blockSignals(True)
                self.conversation_list.setCurrentRow(row)
                self.conversation_list.blockSignals(False)
        if self.system_prompt.toPlainText() != model.system_prompt:
            self.system_prompt.blockSignals(True)
            self.system_prompt.setPlainText(model.system_prompt)
            self.system_prompt.blockSignals(False)
        choice = model.current_model()
        self.demo_label.setVisible(bool(choice and choice.random_weights))
        self.set_sampling_widgets()
        self.context_label.setText(
            f"{choice.context_length} tokens (prompt and reply); older messages are left out to fit"
            if choice
            else ""
        )
        index = self.model_picker.findData(model.model_id)
        if index >= 0 and index != self.model_picker.currentIndex():
            self.model_picker.setCurrentIndex(index)
        streaming = model.streaming
        self.send_button.setEnabled(model.can_send())
        self.stop_button.setEnabled(streaming)
        self.regenerate_button.setEnabled(model.can_regenerate() and model.can_send())
        self.retry_button.setVisible(bool(model.failed_text) and not streaming)
        self.retry_button.setEnabled(model.can_send())
        if model.failed_text and not self.input.toPlainText().strip():
            self.input.setPlainText(model.failed_text)  # there to edit, or to Retry as it is
        self.model_picker.setEnabled(not streaming)
        self.rename_button.setEnabled(model.conversation_id is not None)
        self.delete_button.setEnabled(model.conversation_id is not None)
        if model.messages or streaming:
            markdown = transcript_markdown(model.messages, model.reply.text if model.reply else None)
        else:
            markdown = "*Start a conversation: type a message below.*"
        self.transcript.setMarkdown(markdown)
        self._scroll_to_latest()
        speed = f"{model.last_speed:.1f} tokens/s" if model.last_speed else ""
        self.speed_label.setText(("Generating… " if streaming else "") + speed)

    def _show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.setStyleSheet(ERROR_STYLE if self.model.notice_is_error else NOTE_STYLE)
        self.notice.setVisible(bool(text))

    def _scroll_to_latest(self) -> None:
        bar = self.transcript.verticalScrollBar()
        bar.setValue(bar.maximum())

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        # Filled while hidden, the transcript had no size to scroll by: show the latest messages once shown.
        QTimer.singleShot(0, self._scroll_to_latest)

    def closeEvent(self, event: QCloseEvent) -> None:
        event.ignore()
        self.hide()
