"""The desktop app's main window. It only renders: the model and the session live on
the worker thread (:mod:`.worker`), requests go there by queued signals, tokens come
back one signal each, and conversations are kept in SQLite (:mod:`.store`)."""

from __future__ import annotations

from PySide6.QtCore import QCoreApplication, Qt, QThread, QUrl, Signal, Slot
from PySide6.QtGui import QColor, QFont, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from .store import Message, Piece, Store
from .worker import Worker

# The palette of `ouro-mlx chat --show-depth` (cyan, green, yellow, red; magenta deeper),
# in shades readable on a light background.
DEPTH_COLOURS = {1: "#00838f", 2: "#2e7d32", 3: "#b8860b", 4: "#c62828"}
DEEPER = "#8e24aa"
MUTED = "#757575"
MAX_LOOPS = 64


def depth_colour(loops: int) -> str:
    return DEPTH_COLOURS.get(loops, DEEPER)


def legend_html(max_loops: int) -> str:
    cells = [f'<span style="color:{depth_colour(n)}">&#9632;&nbsp;{n}</span>'
             for n in range(1, min(max_loops, 5) + 1)]
    if max_loops > 5:
        cells[-1] = f'<span style="color:{DEEPER}">&#9632;&nbsp;5&ndash;{max_loops}</span>'
    return "colour = loop steps per token: " + " &nbsp; ".join(cells)


def runs(pieces: list[Piece]) -> list[tuple[bool, list[Piece]]]:
    """Consecutive pieces grouped by thinking / answer."""
    out: list[tuple[bool, list[Piece]]] = []
    for p in pieces:
        if out and out[-1][0] == p.thinking:
            out[-1][1].append(p)
        else:
            out.append((p.thinking, [p]))
    return out


def answered(messages: list[Message]) -> list[dict]:
    """The history a new turn follows: every user turn that got an answer (a message
    that failed, e.g. too long for the model, is shown but not sent again)."""
    out = []
    for m, after in zip(messages, messages[1:]):
        if m.role == "user" and after.role == "assistant":
            out += [{"role": "user", "content": m.content},
                    {"role": "assistant", "content": after.content}]
    return out


class MainWindow(QMainWindow):
    request_load = Signal(dict)
    request_send = Signal(list, str, dict)

    def __init__(self, store: Store, *, model: str | None = None,
                 adapter_path: str | None = None, exit_gate: str | None = None,
                 ut_steps: int | None = None, exit_threshold: float | None = None,
                 system_prompt: str | None = None, session_kwargs: dict | None = None):
        super().__init__()
        self.store = store
        self.messages: list[Message] = []
        self.conversation_id: int | None = None
        self.streaming: Message | None = None
        self.toggled: set[str] = set()  # thinking sections opened/closed by hand
        self.model_info: dict | None = None
        self.previous_info: dict | None = None
        self.loading = False
        self.start_loops, self.start_threshold = ut_steps, exit_threshold
        self.last_stats: dict | None = None

        self.thread_ = QThread(self)
        self.worker = Worker(session_kwargs=session_kwargs)
        self.worker.moveToThread(self.thread_)
        self.request_load.connect(self.worker.load)
        self.request_send.connect(self.worker.send)
        self.worker.status.connect(self.show_status)
        self.worker.progress.connect(self.on_progress)
        self.worker.loaded.connect(self.on_loaded)
        self.worker.token.connect(self.on_token)
        self.worker.finished.connect(self.on_finished)
        self.worker.failed.connect(self.on_failed)
        self.thread_.start()

        self.build()
        self.system_edit.setText(system_prompt if system_prompt is not None
                                 else store.setting("system_prompt", "") or "")
        self.show_thinking.setChecked(bool(store.setting("show_thinking", False)))
        self.refresh_conversations()
        last = store.setting("conversation")
        if type(last) is int and any(c.id == last for c in store.conversations()):
            self.open_conversation(last)
        name = model if model is not None else store.setting("model", "") or ""
        self.model_edit.setText(str(name))
        self.load_model(adapter_path=adapter_path, exit_gate=exit_gate)

    # -- layout ----------------------------------------------------------------
    def build(self) -> None:
        self.setWindowTitle("Ouro")
        self.resize(1000, 680)

        side = QWidget()
        sv = QVBoxLayout(side)
        self.new_button = QPushButton("New conversation")
        self.new_button.clicked.connect(self.new_conversation)
        self.conversation_list = QListWidget()
        self.conversation_list.itemClicked.connect(
            lambda item: self.open_conversation(item.data(Qt.UserRole)))
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_conversation)
        sv.addWidget(self.new_button)
        sv.addWidget(self.conversation_list)
        sv.addWidget(self.delete_button)

        main = QWidget()
        mv = QVBoxLayout(main)
        row = QHBoxLayout()
        row.addWidget(QLabel("Model"))
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText(
            "bundled demo model — or a local directory or Hugging Face repo id")
        self.model_edit.returnPressed.connect(self.load_model)
        self.browse_button = QPushButton("Browse…")
        self.browse_button.clicked.connect(self.browse)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(lambda: self.load_model())
        row.addWidget(self.model_edit, 1)
        row.addWidget(self.browse_button)
        row.addWidget(self.load_button)
        mv.addLayout(row)

        row = QHBoxLayout()
        row.addWidget(QLabel("Loop steps"))
        self.loops = QSpinBox()
        self.loops.setRange(1, MAX_LOOPS)
        self.loops.setValue(4)
        self.loops.valueChanged.connect(self.update_legend)
        row.addWidget(self.loops)
        row.addWidget(QLabel("Exit threshold"))
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setDecimals(3)
        self.threshold.setValue(1.0)
        row.addWidget(self.threshold)
        self.single_turn = QCheckBox("Single turn")
        self.single_turn.setToolTip("Every message is answered without the earlier turns "
                                    "(the bundled model was trained on single questions).")
        row.addWidget(self.single_turn)
        self.show_thinking = QCheckBox("Show thinking")
        self.show_thinking.toggled.connect(self.on_show_thinking)
        row.addWidget(self.show_thinking)
        row.addStretch(1)
        mv.addLayout(row)

        row = QHBoxLayout()
        row.addWidget(QLabel("System prompt"))
        self.system_edit = QLineEdit()
        self.system_edit.setPlaceholderText("(none)")
        row.addWidget(self.system_edit, 1)
        mv.addLayout(row)

        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)
        self.transcript.setOpenExternalLinks(False)
        self.transcript.anchorClicked.connect(self.on_anchor)
        font = self.transcript.font()
        font.setPointSizeF(font.pointSizeF() * 1.3)
        self.transcript.setFont(font)
        mv.addWidget(self.transcript, 1)
        self.legend = QLabel()
        self.legend.setTextFormat(Qt.RichText)
        mv.addWidget(self.legend)

        row = QHBoxLayout()
        self.input = QLineEdit()
        self.input.setPlaceholderText("Type a message (bundled model: a game such as 2,23,14,31)")
        self.input.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        row.addWidget(self.input, 1)
        row.addWidget(self.send_button)
        row.addWidget(self.stop_button)
        mv.addLayout(row)

        split = QSplitter()
        split.addWidget(side)
        split.addWidget(main)
        split.setStretchFactor(1, 1)
        split.setSizes([220, 780])
        self.setCentralWidget(split)

        self.stats_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(200)
        self.progress.hide()
        self.statusBar().addWidget(self.stats_label, 1)
        self.statusBar().addPermanentWidget(self.progress)
        self.update_legend()
        self.update_buttons()

    @property
    def generating(self) -> bool:
        return self.streaming is not None

    def update_buttons(self) -> None:
        ready = self.model_info is not None and not self.loading
        busy = self.generating or self.loading
        self.send_button.setEnabled(ready and not self.generating)
        self.input.setEnabled(ready and not self.generating)
        self.stop_button.setEnabled(self.generating)
        for w in (self.load_button, self.browse_button, self.model_edit, self.new_button,
                  self.delete_button, self.conversation_list):
            w.setEnabled(not busy)

    def update_legend(self) -> None:
        self.legend.setText(legend_html(self.loops.value()))

    # -- model -----------------------------------------------------------------
    def browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model directory")
        if path:
            self.model_edit.setText(path)
            self.load_model()

    @Slot()
    def load_model(self, adapter_path: str | None = None, exit_gate: str | None = None):
        if self.generating:
            return
        self.loading = True
        self.previous_info, self.model_info = self.model_info, None
        self.update_buttons()
        self.progress.setRange(0, 0)
        self.progress.show()
        self.request_load.emit({"model": self.model_edit.text().strip(),
                                "adapter_path": adapter_path or "",
                                "exit_gate": exit_gate or ""})

    @Slot(int, int, str)
    def on_progress(self, done: int, total: int, unit: str) -> None:
        self.progress.setRange(0, total)
        self.progress.setValue(min(done, total))
        self.progress.setFormat(f"%v/%m {unit}" if total else "")

    @Slot(dict)
    def on_loaded(self, info: dict) -> None:
        self.loading = False
        self.model_info = info
        self.progress.hide()
        self.store.set_setting("model", self.model_edit.text().strip())
        loops = self.start_loops or info["ut_steps"]
        threshold = info["exit_threshold"] if self.start_threshold is None \
            else self.start_threshold
        self.start_loops = self.start_threshold = None  # command-line values apply once
        self.loops.setValue(min(loops, MAX_LOOPS))
        self.threshold.setValue(threshold)
        self.single_turn.setChecked(info["name"] == "bundled demo model")
        self.setWindowTitle(f"Ouro — {info['name']}")
        self.show_status(f"{info['name']}: hidden {info['hidden_size']}, "
                         f"{info['layers']} layer(s), {info['ut_steps']} loop steps")
        self.update_buttons()

    # -- conversations ---------------------------------------------------------
    def refresh_conversations(self) -> None:
        self.conversation_list.clear()
        for c in self.store.conversations():
            item = QListWidgetItem(c.title)
            item.setData(Qt.UserRole, c.id)
            self.conversation_list.addItem(item)
            if c.id == self.conversation_id:
                self.conversation_list.setCurrentItem(item)

    def open_conversation(self, conversation_id: int) -> None:
        if self.generating:
            return
        self.conversation_id = conversation_id
        self.messages = self.store.messages(conversation_id)
        self.toggled.clear()
        self.store.set_setting("conversation", conversation_id)
        self.refresh_conversations()
        self.render()

    def new_conversation(self) -> None:
        if self.generating:
            return
        self.conversation_id, self.messages = None, []
        self.toggled.clear()
        self.conversation_list.clearSelection()
        self.render()

    def delete_conversation(self) -> None:
        if self.generating or self.conversation_id is None:
            return
        self.store.delete(self.conversation_id)
        self.new_conversation()
        self.refresh_conversations()

    # -- chatting --------------------------------------------------------------
    @Slot()
    def send(self) -> None:
        text = self.input.text().strip()
        if not text or self.generating or self.model_info is None or self.loading:
            return
        self.input.clear()
        if self.conversation_id is None:
            title = text if len(text) <= 40 else text[:39] + "…"
            self.conversation_id = self.store.new_conversation(title, self.model_info["name"])
            self.store.set_setting("conversation", self.conversation_id)
        history = [] if self.single_turn.isChecked() else answered(self.messages)
        user = Message("user", text)
        self.messages.append(user)
        self.store.add_message(self.conversation_id, user)
        self.store.set_setting("system_prompt", self.system_edit.text())
        self.refresh_conversations()
        self.streaming = Message("assistant", "")
        self.render()
        self.update_buttons()
        self.show_status("generating …")
        self.request_send.emit(history, text, {
            "system_prompt": self.system_edit.text().strip(),
            "ut_steps": self.loops.value(),
            "exit_threshold": self.threshold.value(),
        })

    @Slot()
    def stop(self) -> None:
        if self.generating:
            self.worker.cancel()  # thread-safe; the answer ends at its next token

    @Slot(str, int, bool)
    def on_token(self, text: str, loops: int, thinking: bool) -> None:
        if self.streaming is None:
            return
        piece = Piece(text, loops, thinking)
        pieces = self.streaming.pieces
        cursor = self.end_cursor()
        if thinking and not self.show_thinking.isChecked():
            if not pieces or not pieces[-1].thinking:
                cursor.insertText("▸ thinking …", self.muted_format())
        else:
            if pieces and pieces[-1].thinking != thinking and not thinking:
                cursor.insertBlock()
            cursor.insertText(text, self.piece_format(piece))
        pieces.append(piece)
        self.transcript.ensureCursorVisible()

    @Slot(dict)
    def on_finished(self, result: dict) -> None:
        answer = self.streaming
        if answer is None:
            return
        answer.content = result["content"]
        answer.finish = result["finish_reason"]
        self.streaming = None
        self.messages.append(answer)
        if self.conversation_id is not None:
            self.store.add_message(self.conversation_id, answer)
        self.last_stats = result["stats"]
        s = self.last_stats
        note = "stopped" if answer.finish == "cancelled" else s["finish"]
        self.show_status(
            f"{s['generation_tps']:.1f} tok/s · avg loops {s['avg_loops']:.2f} · "
            f"peak memory {s['peak_memory']:.3f} GB · KV {s['kv_bytes'] / 2**20:.2f} MiB"
            + (f" · {note}" if note else ""))
        self.render()
        self.update_buttons()

    @Slot(str)
    def on_failed(self, message: str) -> None:
        if self.loading:  # the worker keeps the model it had, if any
            self.loading = False
            self.model_info = self.previous_info
            self.progress.hide()
        self.streaming = None
        self.show_status(f"error: {message}")
        self.render()
        self.update_buttons()

    @Slot(str)
    def show_status(self, text: str) -> None:
        self.stats_label.setText(text)

    # -- rendering -------------------------------------------------------------
    def end_cursor(self) -> QTextCursor:
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.End)
        return cursor

    def piece_format(self, piece: Piece) -> QTextCharFormat:
        fmt = QTextCharFormat()
        fmt.setForeground(QColor(depth_colour(piece.loops)))
        fmt.setFontItalic(piece.thinking)
        return fmt

    def muted_format(self, href: str | None = None) -> QTextCharFormat:
        fmt = QTextCharFormat()
        fmt.setForeground(QColor(MUTED))
        if href:
            fmt.setAnchor(True)
            fmt.setAnchorHref(href)
        return fmt

    def render(self) -> None:
        """Draw the whole conversation (after a change that is not one more token)."""
        self.transcript.clear()
        cursor = self.end_cursor()
        shown = self.messages + ([self.streaming] if self.streaming else [])
        for i, m in enumerate(shown):
            if i:
                cursor.insertBlock()
                cursor.insertBlock()
            head = QTextCharFormat()
            head.setFontWeight(QFont.Bold)
            cursor.insertText("You" if m.role == "user" else "Ouro", head)
            cursor.insertBlock()
            if m.role == "user" or not m.pieces:
                cursor.insertText(m.content, QTextCharFormat())
            else:
                self.render_pieces(cursor, i, m.pieces)
            if m.finish == "cancelled":
                cursor.insertText("  (stopped)", self.muted_format())
            elif m.finish == "length":
                cursor.insertText("  (cut: token or context limit)", self.muted_format())
        self.transcript.ensureCursorVisible()

    def render_pieces(self, cursor: QTextCursor, i: int, pieces: list[Piece]) -> None:
        for j, (thinking, run) in enumerate(runs(pieces)):
            if j:
                cursor.insertBlock()
            if not thinking:
                for p in run:
                    cursor.insertText(p.text, self.piece_format(p))
                continue
            key = f"think-{i}-{j}"
            open_ = self.show_thinking.isChecked() != (key in self.toggled)
            label = (f"▾ thinking" if open_
                     else f"▸ thinking ({len(run)} tokens, click to show)")
            cursor.insertText(label, self.muted_format("#" + key))
            if open_:
                cursor.insertBlock()
                for p in run:
                    cursor.insertText(p.text, self.piece_format(p))

    @Slot(QUrl)
    def on_anchor(self, url: QUrl) -> None:
        key = url.fragment()
        if key.startswith("think-"):
            self.toggled ^= {key}
            self.render()

    @Slot(bool)
    def on_show_thinking(self, on: bool) -> None:
        self.toggled.clear()
        self.store.set_setting("show_thinking", on)
        if not self.generating:
            self.render()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.worker.cancel()
        self.thread_.quit()
        self.thread_.wait()
        # a stopped answer's last signals are still queued: store it before closing
        QCoreApplication.sendPostedEvents(self, 0)
        super().closeEvent(event)
