"""The desktop app's main window. It only renders: the model and the session live on
the worker thread (:mod:`.worker`), requests go there by queued signals, tokens come
back one signal each, and conversations are kept in SQLite (:mod:`.store`)."""

from __future__ import annotations

import html
import math
import time

from PySide6.QtCore import (
    QCoreApplication,
    QEvent,
    QSize,
    Qt,
    QThread,
    QTimer,
    Signal,
    Slot,
)
from PySide6.QtGui import QColor, QFont, QPainter, QTextDocument
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMenu,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QStyle,
    QStyledItemDelegate,
    QVBoxLayout,
    QWidget,
)

from .store import Message, Piece, Store
from .worker import BUNDLED, Worker

# The palette of `ouro-mlx chat --show-depth` (cyan, green, yellow, red; magenta deeper),
# in shades readable on a light background.
DEPTH_COLOURS = {1: "#00838f", 2: "#2e7d32", 3: "#b8860b", 4: "#c62828"}
DEEPER = "#8e24aa"
MUTED = "#86868b"
TEXT = "#1d1d1f"
ACCENT = "#007aff"
MAX_LOOPS = 64
BUBBLE_SHARE = 0.72  # of the conversation's width

STYLE = f"""
QMainWindow, #main, #chat {{ background: #ffffff; }}
#side {{ background: #f5f5f7; border-right: 1px solid #e3e3e8; }}
#appTitle {{ font-size: 17px; font-weight: 600; color: {TEXT}; }}
QLabel {{ color: {TEXT}; }}
QPushButton {{ border: 1px solid #d2d2d7; border-radius: 7px; padding: 4px 12px;
    background: #ffffff; color: {TEXT}; }}
QPushButton:hover {{ background: #f0f0f3; }}
QPushButton:disabled {{ color: #b0b0b5; }}
#newButton {{ font-weight: 600; padding: 6px 12px; }}
#deleteButton {{ border: none; background: transparent; color: {MUTED}; }}
#deleteButton:hover {{ color: #c62828; }}
QListWidget#conversations {{ background: transparent; border: none; outline: none; }}
#header, #controls {{ background: #ffffff; }}
#header {{ border-bottom: 1px solid #ececf0; }}
#modelName {{ font-size: 15px; font-weight: 600; }}
#modelDetails, #caption, #legend, #emptyHint {{ color: {MUTED}; }}
#emptyHint {{ font-size: 15px; }}
QLineEdit {{ border: 1px solid #d2d2d7; border-radius: 7px; padding: 4px 8px;
    background: #ffffff; selection-background-color: #b3d7ff; color: {TEXT}; }}
QLineEdit:focus {{ border: 1px solid {ACCENT}; }}
#composer {{ border: 1px solid #d2d2d7; border-radius: 20px; background: #ffffff; }}
#composer QLineEdit {{ border: none; font-size: 14px; padding: 6px 6px; }}
#sendButton {{ background: {ACCENT}; color: #ffffff; border: none; border-radius: 15px;
    padding: 0px 18px; min-height: 30px; max-height: 30px; font-weight: 600; }}
#sendButton:disabled {{ background: #a9cdf9; color: #ffffff; }}
#stopButton {{ background: {TEXT}; color: #ffffff; border: none; border-radius: 15px;
    padding: 0px 18px; min-height: 30px; max-height: 30px; font-weight: 600; }}
#userBubble {{ background: {ACCENT}; border-radius: 16px; }}
#userBubble QLabel {{ color: #ffffff; font-size: 15px; }}
#assistantBubble {{ background: #f2f2f7; border-radius: 16px; }}
#assistantBubble QLabel {{ font-size: 15px; }}
QScrollArea {{ border: none; background: #ffffff; }}
#warning {{ background: #fff6e5; border: 1px solid #f3c77a; border-radius: 8px;
    padding: 6px 10px; color: #6b4a00; }}
QStatusBar {{ background: #fafafa; border-top: 1px solid #ececf0; }}
QStatusBar QLabel {{ color: {MUTED}; padding-left: 12px; }}
"""


def depth_colour(loops: int) -> str:
    return DEPTH_COLOURS.get(loops, DEEPER)


def legend_html(max_loops: int) -> str:
    cells = [f'<span style="color:{depth_colour(n)}">&#9632;</span>&nbsp;{n}'
             for n in range(1, min(max_loops, 5) + 1)]
    if max_loops > 5:
        cells[-1] = f'<span style="color:{DEEPER}">&#9632;</span>&nbsp;5&ndash;{max_loops}'
    return "colour = loop steps per token: &nbsp;" + " &nbsp; ".join(cells)


def short_title(text: str, words: int = 5, chars: int = 32) -> str:
    """A sidebar title from a first message: its first few words."""
    parts = text.split()
    title = " ".join(parts[:words])
    if len(title) > chars:
        title = title[:chars - 1].rstrip()
    return title + "…" if title != " ".join(parts) else title or "New chat"


def friendly_date(when: float, now: float | None = None) -> str:
    """``Today 14:05``, ``Yesterday``, a weekday within the week, else ``5 Dec`` (with
    the year when it is not this one)."""
    now = time.time() if now is None else now
    t, today = time.localtime(when), time.localtime(now)
    days = (time.mktime(today[:3] + (0, 0, 0, 0, 0, -1))
            - time.mktime(t[:3] + (0, 0, 0, 0, 0, -1))) / 86400
    if 0 <= days < 0.5:
        return time.strftime("Today %H:%M", t)
    if 0.5 <= days < 1.5:
        return "Yesterday"
    if 0 < days < 7:
        return time.strftime("%A", t)
    day = str(t.tm_mday) + time.strftime(" %b", t)
    return day if t.tm_year == today.tm_year else f"{day} {t.tm_year}"


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


def coloured(pieces: list[Piece]) -> str:
    """Tokens as HTML spans in their depth colours (neighbours of one colour merged)."""
    out, text, colour = [], "", None
    for p in pieces + [None]:
        c = None if p is None else depth_colour(p.loops)
        if c != colour and text:
            out.append(f'<span style="color:{colour}">{html.escape(text)}</span>')
            text = ""
        if p is not None:
            text, colour = text + p.text, c
    return "".join(out)


def caption(m: Message) -> str:
    """The line under an answer: its length, average depth and how it ended."""
    parts = []
    answer = [p for p in m.pieces if not p.thinking]
    if m.pieces:
        avg = sum(p.loops for p in m.pieces) / len(m.pieces)
        tokens = f"{len(answer)} token{'s' * (len(answer) != 1)}"
        parts.append(f"{tokens} · avg {avg:.2f} loops")
    if m.finish == "cancelled":
        parts.append("(stopped)")
    elif m.finish == "length":
        parts.append("(cut: token or context limit)")
    return " · ".join(parts)


class Bubble(QFrame):
    """One message: a rounded frame around a rich-text label (selectable; thinking
    sections are links that fold and unfold)."""

    PAD_X, PAD_Y = 14, 9

    def __init__(self, role: str, on_link=None):
        super().__init__()
        self.role = role
        self.max_width = 480
        self.setObjectName("userBubble" if role == "user" else "assistantBubble")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(self.PAD_X, self.PAD_Y, self.PAD_X, self.PAD_Y)
        self.label = QLabel()
        self.label.setTextFormat(Qt.RichText)
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextBrowserInteraction)
        self.label.setOpenExternalLinks(False)
        if on_link is not None:
            self.label.linkActivated.connect(on_link)
        lay.addWidget(self.label)

    def set_html(self, body: str) -> None:
        self.label.setText(f'<div style="white-space:pre-wrap">{body}</div>')
        self.fit()

    def set_max_width(self, width: int) -> None:
        self.max_width = width
        self.fit()

    def fit(self) -> None:
        """As wide as its longest line, up to ``max_width``, and as tall as the
        wrapped text (a word-wrapped QLabel in a layout is not sized so by itself)."""
        self.label.ensurePolished()  # the style sheet's font
        doc = QTextDocument()
        doc.setDefaultFont(self.label.font())
        doc.setDocumentMargin(0)
        doc.setHtml(self.label.text())
        inner = max(self.max_width - 2 * self.PAD_X, 40)
        doc.setTextWidth(inner)
        width = min(math.ceil(doc.idealWidth()) + 4, inner)
        self.label.setFixedSize(width, self.label.heightForWidth(width))


class ConversationDelegate(QStyledItemDelegate):
    """A sidebar row: the title, and the date under it, on a rounded highlight."""

    def paint(self, painter: QPainter, option, index) -> None:
        painter.save()
        painter.setRenderHint(QPainter.Antialiasing)
        r = option.rect.adjusted(6, 2, -6, -2)
        if option.state & QStyle.State_Selected:
            painter.setPen(Qt.NoPen)
            painter.setBrush(QColor("#e0e0e6"))
            painter.drawRoundedRect(r, 8, 8)
        elif option.state & QStyle.State_MouseOver:
            painter.setPen(Qt.NoPen)
            painter.setBrush(QColor("#ebebef"))
            painter.drawRoundedRect(r, 8, 8)
        text = r.adjusted(10, 5, -10, -5)
        font = QFont(option.font)
        font.setPixelSize(13)
        font.setWeight(QFont.DemiBold)
        painter.setFont(font)
        painter.setPen(QColor(TEXT))
        title = painter.fontMetrics().elidedText(index.data(Qt.DisplayRole) or "",
                                                 Qt.ElideRight, text.width())
        painter.drawText(text, Qt.AlignLeft | Qt.AlignTop, title)
        font.setPixelSize(11)
        font.setWeight(QFont.Normal)
        painter.setFont(font)
        painter.setPen(QColor(MUTED))
        painter.drawText(text, Qt.AlignLeft | Qt.AlignBottom,
                         index.data(Qt.UserRole + 1) or "")
        painter.restore()

    def sizeHint(self, option, index) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(option.rect.width(), 50)


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
        self.stream_bubble: Bubble | None = None
        self.toggled: set[str] = set()  # thinking sections opened/closed by hand
        self.model_info: dict | None = None
        self.previous_info: dict | None = None
        self.loading = False
        self.start_loops, self.start_threshold = ut_steps, exit_threshold
        self.last_stats: dict | None = None
        self.stick = True  # keep the conversation scrolled to its end

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
        try:  # a running QThread must not outlive a window that failed to open
            self.build()
            saved = store.setting("system_prompt", "", str)
            self.system_edit.setText(system_prompt if system_prompt is not None else saved)
            self.show_thinking.setChecked(store.setting("show_thinking", False, bool))
            self.refresh_conversations()
            last = store.setting("conversation", None, int)
            if last is not None and any(c.id == last for c in store.conversations()):
                self.open_conversation(last)
            else:
                self.render()
            self.model_edit.setText(model if model is not None
                                    else store.setting("model", "", str))
            self.load_model(adapter_path=adapter_path, exit_gate=exit_gate)
        except BaseException:
            self.shutdown()
            raise

    # -- layout ----------------------------------------------------------------
    def build(self) -> None:
        self.setWindowTitle("Ouro")
        self.resize(1040, 700)
        self.setStyleSheet(STYLE)

        side = QFrame()
        side.setObjectName("side")
        side.setFixedWidth(236)
        sv = QVBoxLayout(side)
        sv.setContentsMargins(10, 14, 10, 10)
        sv.setSpacing(8)
        title = QLabel("Ouro")
        title.setObjectName("appTitle")
        title.setContentsMargins(6, 0, 0, 4)
        sv.addWidget(title)
        self.new_button = QPushButton("+  New chat")
        self.new_button.setObjectName("newButton")
        self.new_button.clicked.connect(self.new_conversation)
        sv.addWidget(self.new_button)
        self.conversation_list = QListWidget()
        self.conversation_list.setObjectName("conversations")
        self.conversation_list.setItemDelegate(ConversationDelegate(self.conversation_list))
        self.conversation_list.setMouseTracking(True)
        self.conversation_list.setEditTriggers(QListWidget.DoubleClicked
                                               | QListWidget.EditKeyPressed)
        self.conversation_list.itemClicked.connect(
            lambda item: self.open_conversation(item.data(Qt.UserRole)))
        self.conversation_list.itemChanged.connect(self.on_renamed)
        self.conversation_list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.conversation_list.customContextMenuRequested.connect(self.conversation_menu)
        sv.addWidget(self.conversation_list, 1)
        self.delete_button = QPushButton("Delete chat")
        self.delete_button.setObjectName("deleteButton")
        self.delete_button.clicked.connect(self.delete_conversation)
        sv.addWidget(self.delete_button, 0, Qt.AlignLeft)

        main = QWidget()
        main.setObjectName("main")
        mv = QVBoxLayout(main)
        mv.setContentsMargins(0, 0, 0, 0)
        mv.setSpacing(0)

        header = QFrame()
        header.setObjectName("header")
        hv = QVBoxLayout(header)
        hv.setContentsMargins(20, 12, 20, 10)
        hv.setSpacing(8)
        row = QHBoxLayout()
        row.setSpacing(8)
        names = QVBoxLayout()
        names.setSpacing(0)
        self.model_name = QLabel("loading…")
        self.model_name.setObjectName("modelName")
        self.model_details = QLabel("")
        self.model_details.setObjectName("modelDetails")
        names.addWidget(self.model_name)
        names.addWidget(self.model_details)
        row.addLayout(names)
        row.addStretch(1)
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText(f"{BUNDLED}, a model directory or an HF repo id")
        self.model_edit.setToolTip(f"{BUNDLED}: the bundled model; or a local model "
                                   "directory (Browse…) or a Hugging Face repo id")
        self.model_edit.setMinimumWidth(230)
        self.model_edit.returnPressed.connect(self.load_model)
        self.browse_button = QPushButton("Browse…")
        self.browse_button.clicked.connect(self.browse)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(lambda: self.load_model())
        row.addWidget(self.model_edit)
        row.addWidget(self.browse_button)
        row.addWidget(self.load_button)
        hv.addLayout(row)

        row = QHBoxLayout()
        row.setSpacing(6)
        row.addWidget(QLabel("Loop steps"))
        self.loops = QSpinBox()
        self.loops.setRange(1, MAX_LOOPS)
        self.loops.setValue(4)
        self.loops.valueChanged.connect(self.update_legend)
        row.addWidget(self.loops)
        row.addSpacing(10)
        row.addWidget(QLabel("Exit threshold"))
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setDecimals(2)
        self.threshold.setValue(1.0)
        row.addWidget(self.threshold)
        row.addSpacing(10)
        self.single_turn = QCheckBox("Single turn")
        self.single_turn.setToolTip("Every message is answered without the earlier turns "
                                    "(the bundled model was trained on single questions).")
        row.addWidget(self.single_turn)
        self.show_thinking = QCheckBox("Show thinking")
        self.show_thinking.toggled.connect(self.on_show_thinking)
        row.addWidget(self.show_thinking)
        row.addSpacing(10)
        self.system_edit = QLineEdit()
        self.system_edit.setPlaceholderText("System prompt (none)")
        row.addWidget(self.system_edit, 1)
        hv.addLayout(row)
        mv.addWidget(header)

        self.warning = QLabel()
        self.warning.setObjectName("warning")
        self.warning.setWordWrap(True)
        self.warning.setTextFormat(Qt.RichText)
        self.warning.linkActivated.connect(lambda _: self.warning.hide())
        self.warning.hide()
        box = QHBoxLayout()
        box.setContentsMargins(20, 10, 20, 0)
        box.addWidget(self.warning)
        mv.addLayout(box)

        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        chat = QWidget()
        chat.setObjectName("chat")
        self.chat_layout = QVBoxLayout(chat)
        self.chat_layout.setContentsMargins(24, 18, 24, 18)
        self.chat_layout.setSpacing(12)
        self.chat_layout.addStretch(1)
        self.scroll.setWidget(chat)
        self.scroll.viewport().installEventFilter(self)
        bar = self.scroll.verticalScrollBar()
        bar.rangeChanged.connect(lambda _, top: self.stick and bar.setValue(top))
        bar.valueChanged.connect(lambda v: setattr(self, "stick", v >= bar.maximum() - 4))
        mv.addWidget(self.scroll, 1)

        bottom = QVBoxLayout()
        bottom.setContentsMargins(24, 6, 24, 14)
        bottom.setSpacing(8)
        self.legend = QLabel()
        self.legend.setObjectName("legend")
        self.legend.setTextFormat(Qt.RichText)
        bottom.addWidget(self.legend, 0, Qt.AlignHCenter)
        composer = QFrame()
        composer.setObjectName("composer")
        row = QHBoxLayout(composer)
        row.setContentsMargins(14, 5, 5, 5)
        self.input = QLineEdit()
        self.input.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("sendButton")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.clicked.connect(self.stop)
        row.addWidget(self.input, 1)
        row.addWidget(self.send_button)
        row.addWidget(self.stop_button)
        bottom.addWidget(composer)
        mv.addLayout(bottom)

        central = QWidget()
        lay = QHBoxLayout(central)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(side)
        lay.addWidget(main, 1)
        self.setCentralWidget(central)

        self.stats_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(200)
        self.progress.hide()
        self.statusBar().addWidget(self.stats_label, 1)
        self.statusBar().addPermanentWidget(self.progress)
        self.stream_timer = QTimer(self)  # streamed tokens redraw at most every 30 ms
        self.stream_timer.setSingleShot(True)
        self.stream_timer.setInterval(30)
        self.stream_timer.timeout.connect(self.update_stream)
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
        self.send_button.setVisible(not self.generating)  # one place: Send, or Stop
        self.stop_button.setVisible(self.generating)
        for w in (self.load_button, self.browse_button, self.model_edit, self.new_button,
                  self.delete_button, self.conversation_list):
            w.setEnabled(not busy)
        name = self.model_info["name"] if self.model_info else None
        self.input.setPlaceholderText(
            f"Message {name}…" + ("  (a shell game, e.g. 4,34,12,23)"
                                  if self.model_info and self.model_info["bundled"] else "")
            if name else "Waiting for the model…")

    def update_legend(self) -> None:
        self.legend.setText(legend_html(self.loops.value()))

    def show_warnings(self) -> None:
        """Damaged rows or settings the store skipped, named in a banner."""
        if not self.store.warnings:
            return
        prefix = f"{self.store.path}: "
        items = [w.removeprefix(prefix) for w in self.store.warnings]
        shown = "<br>".join(html.escape(w) for w in items[:4])
        more = f"<br>… and {len(items) - 4} more" if len(items) > 4 else ""
        self.warning.setText(
            f"<b>Some saved data could not be read; it is skipped and left in "
            f"{html.escape(str(self.store.path))}:</b><br>{shown}{more}"
            f' &nbsp;<a href="#dismiss">Dismiss</a>')
        self.warning.show()

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
        self.model_name.setText("Loading…")
        self.model_details.setText(self.model_edit.text().strip() or BUNDLED)
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
        # the bundled model is kept as "" (the default), shown by its short name
        self.store.set_setting("model", "" if info["bundled"] else info["name"])
        self.model_edit.setText(info["name"])
        loops = self.start_loops or info["ut_steps"]
        threshold = info["exit_threshold"] if self.start_threshold is None \
            else self.start_threshold
        self.start_loops = self.start_threshold = None  # command-line values apply once
        self.loops.setValue(min(loops, MAX_LOOPS))
        self.threshold.setValue(threshold)
        self.single_turn.setChecked(info["single_turn"])
        self.setWindowTitle(f"Ouro — {self.display_name()}")
        self.model_name.setText(self.display_name())
        self.model_name.setToolTip(info["name"])
        details = (f"hidden {info['hidden_size']} · {info['layers']} "
                   f"layer{'s' * (info['layers'] != 1)} · {info['ut_steps']} loop steps")
        self.model_details.setText(details)
        self.show_status(f"{self.display_name()} ready: {details}")
        self.update_buttons()
        if not self.messages:
            self.render()  # the empty conversation's hint names the model

    def display_name(self) -> str:
        """The loaded model as the header names it: ``demo (bundled)``, a directory's
        name, or a repo id."""
        info = self.model_info
        if info is None:
            return ""
        if info["bundled"]:
            return f"{info['name']} (bundled)"
        name = info["name"].rstrip("/")
        return name if name.count("/") == 1 and not name.startswith((".", "/", "~")) \
            else name.rsplit("/", 1)[-1]

    # -- conversations ---------------------------------------------------------
    def refresh_conversations(self) -> None:
        lst = self.conversation_list
        lst.blockSignals(True)  # filling the list is not a rename
        lst.clear()
        now = time.time()
        for c in self.store.conversations():
            item = QListWidgetItem(c.title)
            item.setData(Qt.UserRole, c.id)
            item.setData(Qt.UserRole + 1, friendly_date(c.updated, now))
            item.setToolTip(c.title)
            item.setFlags(item.flags() | Qt.ItemIsEditable)
            lst.addItem(item)
            if c.id == self.conversation_id:
                lst.setCurrentItem(item)
        lst.blockSignals(False)
        self.show_warnings()

    @Slot(QListWidgetItem)
    def on_renamed(self, item: QListWidgetItem) -> None:
        title = " ".join(item.text().split())
        if title:
            self.store.rename(item.data(Qt.UserRole), title)
        # later: the editor is still writing to this item (a rebuilt list would crash it)
        QTimer.singleShot(0, self.refresh_conversations)

    def conversation_menu(self, at) -> None:
        item = self.conversation_list.itemAt(at)
        if item is None or self.generating or self.loading:
            return
        menu = QMenu(self)
        menu.addAction("Rename", lambda: self.conversation_list.editItem(item))
        menu.addAction("Delete", lambda: (self.open_conversation(item.data(Qt.UserRole)),
                                          self.delete_conversation()))
        menu.exec(self.conversation_list.mapToGlobal(at))

    def open_conversation(self, conversation_id: int) -> None:
        if self.generating:
            return
        self.conversation_id = conversation_id
        self.messages = self.store.messages(conversation_id)
        self.toggled.clear()
        self.store.set_setting("conversation", conversation_id)
        # select it in place: a rebuilt list would swallow a double-click (rename)
        lst = self.conversation_list
        for row in range(lst.count()):
            if lst.item(row).data(Qt.UserRole) == conversation_id:
                lst.setCurrentRow(row)
        self.show_warnings()
        self.render()

    def new_conversation(self) -> None:
        if self.generating:
            return
        self.conversation_id, self.messages = None, []
        self.toggled.clear()
        self.conversation_list.clearSelection()
        self.render()
        self.input.setFocus()

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
            self.conversation_id = self.store.new_conversation(short_title(text),
                                                               self.model_info["name"])
            self.store.set_setting("conversation", self.conversation_id)
        history = [] if self.single_turn.isChecked() else answered(self.messages)
        user = Message("user", text)
        self.messages.append(user)
        self.store.add_message(self.conversation_id, user)
        self.store.set_setting("system_prompt", self.system_edit.text())
        self.refresh_conversations()
        self.streaming = Message("assistant", "")
        self.stick = True
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
        self.streaming.pieces.append(Piece(text, loops, thinking))
        if not self.stream_timer.isActive():
            self.stream_timer.start()

    def update_stream(self) -> None:
        if self.streaming is not None and self.stream_bubble is not None:
            self.stream_bubble.set_html(self.answer_html(len(self.messages), self.streaming,
                                                         streaming=True))

    @Slot(dict)
    def on_finished(self, result: dict) -> None:
        answer = self.streaming
        if answer is None:
            return
        self.stream_timer.stop()
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
        self.input.setFocus()

    @Slot(str)
    def on_failed(self, message: str) -> None:
        if self.loading:  # the worker keeps the model it had, if any
            self.loading = False
            self.model_info = self.previous_info
            self.progress.hide()
            self.model_name.setText(self.display_name() or "No model")
            self.model_details.setText("could not load "
                                       + (self.model_edit.text().strip() or BUNDLED))
            if self.model_info is not None:
                self.model_edit.setText(self.model_info["name"])
        self.stream_timer.stop()
        self.streaming = None
        self.show_status(f"error: {message}")
        self.render()
        self.update_buttons()

    @Slot(str)
    def show_status(self, text: str) -> None:
        self.stats_label.setText(text)

    # -- rendering -------------------------------------------------------------
    def answer_html(self, i: int, m: Message, streaming: bool = False) -> str:
        """An answer's tokens in their depth colours; thinking sections folded into a
        link unless opened."""
        if not m.pieces:
            if streaming:
                return f'<span style="color:{MUTED}">…</span>'
            return html.escape(m.content)
        parts = []
        sections = runs(m.pieces)
        for j, (thinking, run) in enumerate(sections):
            if j:
                parts.append("<br>")
            if not thinking:
                parts.append(coloured(run))
                continue
            key = f"think-{i}-{j}"
            open_ = self.show_thinking.isChecked() != (key in self.toggled)
            if streaming and not open_ and j == len(sections) - 1:
                parts.append(f'<span style="color:{MUTED}">▸ thinking …</span>')
                continue
            label = ("▾ thinking" if open_
                     else f"▸ thinking ({len(run)} tokens, click to show)")
            parts.append(f'<a href="#{key}" style="color:{MUTED}; text-decoration:none">'
                         f"{label}</a>")
            if open_:
                parts.append("<br><i>" + coloured(run) + "</i>")
        return "".join(parts)

    def bubbles(self) -> list[Bubble]:
        """The message bubbles shown, in order."""
        return self.scroll.widget().findChildren(Bubble)

    def render(self) -> None:
        """Draw the whole conversation (after a change that is not one more token)."""
        lay = self.chat_layout
        while lay.count() > 1:  # the last item is the stretch that keeps rows at the top
            w = lay.takeAt(0).widget()
            if w is not None:
                w.setParent(None)
                w.deleteLater()
        self.stream_bubble = None
        shown = self.messages + ([self.streaming] if self.streaming else [])
        if not shown:
            lay.insertWidget(0, self.empty_hint())
        width = int(self.scroll.viewport().width() * BUBBLE_SHARE)
        for i, m in enumerate(shown):
            bubble = Bubble(m.role, self.on_anchor)
            bubble.max_width = max(width, 240)
            if m.role == "user":
                bubble.set_html(html.escape(m.content))
            else:
                bubble.set_html(self.answer_html(i, m, streaming=m is self.streaming))
            if m is self.streaming:
                self.stream_bubble = bubble
            row = QWidget()
            rv = QVBoxLayout(row)
            rv.setContentsMargins(0, 0, 0, 0)
            rv.setSpacing(3)
            side = Qt.AlignRight if m.role == "user" else Qt.AlignLeft
            rv.addWidget(bubble, 0, side)
            note = caption(m) if m.role == "assistant" and m is not self.streaming else ""
            if note:
                label = QLabel(note)
                label.setObjectName("caption")
                label.setContentsMargins(10, 0, 10, 0)
                rv.addWidget(label, 0, side)
            lay.insertWidget(lay.count() - 1, row)
            bubble.fit()  # now under the window's style sheet: its font is known

    def empty_hint(self) -> QLabel:
        name = self.display_name()
        text = f"Chat with {name}" if name else "Loading the model…"
        if self.model_info and self.model_info["bundled"]:
            text += ("<br><br><small>It plays shell games: type the swaps, e.g. "
                     "<b>4,34,12,23</b>, and it answers where the ball ends.<br>"
                     "Each token is coloured by the loop steps it ran.</small>")
        hint = QLabel(text)
        hint.setObjectName("emptyHint")
        hint.setTextFormat(Qt.RichText)
        hint.setAlignment(Qt.AlignCenter)
        hint.setContentsMargins(0, 80, 0, 0)
        return hint

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if obj is self.scroll.viewport() and event.type() == QEvent.Resize:
            width = max(int(event.size().width() * BUBBLE_SHARE), 240)
            for b in self.bubbles():
                b.set_max_width(width)
        return super().eventFilter(obj, event)

    @Slot(str)
    def on_anchor(self, href: str) -> None:
        key = href.lstrip("#")
        if key.startswith("think-"):
            self.toggled ^= {key}
            self.render()

    @Slot(bool)
    def on_show_thinking(self, on: bool) -> None:
        self.toggled.clear()
        self.store.set_setting("show_thinking", on)
        if not self.generating:
            self.render()

    def shutdown(self) -> None:
        """End the worker thread (an answer stops at its next token); safe to repeat."""
        if self.thread_.isRunning():
            self.worker.cancel()
            self.thread_.quit()
            self.thread_.wait()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.shutdown()
        # a stopped answer's last signals are still queued: store it before closing
        QCoreApplication.sendPostedEvents(self, 0)
        super().closeEvent(event)
