"""ouro-mlx app: the real window offscreen (pytest-qt) on the bundled model, and its
SQLite store."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import time

import pytest

from ouro_mlx.desktop.store import SCHEMA_VERSION, Message, Piece, Store, data_dir

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
HAVE_QT = all(importlib.util.find_spec(m) for m in ("PySide6", "pytestqt"))
needs_qt = pytest.mark.skipif(not HAVE_QT, reason="PySide6 and pytest-qt are not installed "
                                                   "(pip install -e '.[dev]')")
LOAD_MS, ANSWER_MS = 60_000, 60_000


# -- the store (no Qt) ------------------------------------------------------------

def test_store_keeps_conversations_and_settings(tmp_path):
    store = Store(tmp_path / "c.sqlite3")
    cid = store.new_conversation("game", "bundled demo model")
    store.add_message(cid, Message("user", "2,23,14,31"))
    store.add_message(cid, Message("assistant", "=133", [Piece("=", 1), Piece("133", 4, True)],
                                   "stop"))
    store.set_setting("model", "/some/dir")
    store.close()
    store = Store(tmp_path / "c.sqlite3")
    [c] = store.conversations()
    assert (c.id, c.title, c.model) == (cid, "game", "bundled demo model")
    user, answer = store.messages(cid)
    assert (user.role, user.content, user.pieces) == ("user", "2,23,14,31", [])
    assert answer.pieces == [Piece("=", 1, False), Piece("133", 4, True)]
    assert answer.finish == "stop" and store.setting("model") == "/some/dir"
    assert store.setting("missing", 7) == 7
    store.delete(cid)
    assert store.conversations() == [] and store.messages(cid) == []


def test_store_schema_version_and_damaged_rows(tmp_path):
    path = tmp_path / "c.sqlite3"
    store = Store(path)
    cid = store.new_conversation()
    store.add_message(cid, Message("assistant", "plain text", [Piece("x", 2)]))
    with store.db:  # a damaged pieces column, an unknown role, a bad setting
        store.db.execute("UPDATE messages SET pieces = ?", (json.dumps([["x", "2", 1]]),))
        store.db.execute("INSERT INTO messages (conversation_id, role, content, created) "
                         "VALUES (?, 'tool', 'x', 0)", (cid,))
        store.db.execute("INSERT INTO settings VALUES ('model', '{not json')")
    [m] = store.messages(cid)
    assert (m.content, m.pieces) == ("plain text", [])  # shown as plain text
    assert store.setting("model", "") == ""
    assert store.warnings == [
        f"{path}: message 2 of conversation {cid} skipped (its role is 'tool').",
        f"{path}: setting 'model' ignored (not readable)."]
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    with db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(ValueError, match=f"c.sqlite3: schema version {SCHEMA_VERSION + 1}"):
        Store(path)
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="bad.sqlite3: not a readable conversation store"):
        Store(bad)


def test_data_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("OURO_MLX_APP_DIR", str(tmp_path / "app"))
    assert data_dir() == tmp_path / "app"
    assert Store().path == tmp_path / "app" / "conversations.sqlite3"


def test_app_refuses_bad_flags_in_one_line(capsys):
    from ouro_mlx.cli import main

    assert main(["app", "--max-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert err == "ouro-mlx app: error: --max-tokens must be >= 1, got 0.\n"


def test_app_help_describes_every_flag():
    from ouro_mlx.commands.app import build_parser

    p = build_parser()
    assert all(a.help for a in p._actions)
    text = p.format_help()
    assert "usage: ouro-mlx app" in text and "OURO_MLX_APP_DIR" in text
    assert "--data-dir" in text and "(default: 512)" in text


# -- the window -------------------------------------------------------------------

def document(bubble):
    """A bubble's rich text as Qt lays it out."""
    from PySide6.QtGui import QTextDocument

    doc = QTextDocument()
    doc.setHtml(bubble.label.text())
    return doc


def fragments(bubble) -> list[tuple[str, str]]:
    """(text, colour) of every fragment of a bubble, as rendered."""
    out, doc = [], document(bubble)  # the document outlives its blocks
    block = doc.begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            f = it.fragment()
            out.append((f.text().replace("\u2028", "\n"),
                        f.charFormat().foreground().color().name()))
            it += 1
        block = block.next()
    return out


def shown(window) -> list[tuple[str, str]]:
    """(role, text) of every message bubble, in order."""
    return [(b.role, document(b).toPlainText()) for b in window.bubbles()]


def captions(window) -> list[str]:
    from PySide6.QtWidgets import QLabel

    return [c.text() for c in window.scroll.widget().findChildren(QLabel, "caption")]


def titles(window) -> list[str]:
    lst = window.conversation_list
    return [lst.item(i).text() for i in range(lst.count())]


def merge(pieces) -> list[tuple[str, str]]:
    """(text, colour) runs of tokens as drawn: Qt merges neighbours of one colour."""
    from ouro_mlx.desktop.window import depth_colour

    merged = []
    for p in pieces:
        colour = depth_colour(p.loops)
        if merged and merged[-1][1] == colour:
            merged[-1] = (merged[-1][0] + p.text, colour)
        else:
            merged.append((p.text, colour))
    return merged


@pytest.fixture
def open_window(qtbot, tmp_path):
    from ouro_mlx.desktop.window import MainWindow

    stores = []

    def make(**kwargs):
        store = Store(tmp_path / "conversations.sqlite3")
        stores.append(store)
        window = MainWindow(store, **kwargs)
        qtbot.addWidget(window)
        window.show()
        qtbot.waitUntil(lambda: window.model_info is not None or not window.loading,
                        timeout=LOAD_MS)
        return window

    yield make
    for s in stores:
        s.close()


def send(qtbot, window, text: str) -> None:
    from PySide6.QtCore import Qt

    window.input.setText(text)
    with qtbot.waitSignal(window.worker.finished, timeout=ANSWER_MS):
        qtbot.mouseClick(window.send_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not window.generating)


@needs_qt
def test_game_answer_colours_and_restart(open_window, qtbot):
    w = open_window()
    assert w.model_info["name"] == "demo" and w.model_info["bundled"]
    assert w.single_turn.isChecked()
    # the loaded model is named: header, model field, window title, input hint
    assert w.model_name.text() == "demo (bundled)" and w.model_edit.text() == "demo"
    assert w.windowTitle() == "Ouro — demo (bundled)"
    assert "1 layer" in w.model_details.text() and "Message demo" in w.input.placeholderText()
    assert w.store.setting("model") == ""  # kept as the default, not as a name
    assert w.loops.value() == 4 and "4" in w.legend.text()
    send(qtbot, w, "2,23,14,31")
    answer = w.messages[-1]
    assert (answer.role, answer.content, answer.finish) == ("assistant", "=133", "stop")
    assert "".join(p.text for p in answer.pieces) == "=133"
    # one bubble per message
    assert shown(w) == [("user", "2,23,14,31"), ("assistant", "=133")]
    user, reply = w.bubbles()
    assert (user.objectName(), reply.objectName()) == ("userBubble", "assistantBubble")
    # every answer token is drawn in its loop depth's colour, inside the bubble
    merged = merge(answer.pieces)
    assert fragments(reply) == merged
    assert len({p.loops for p in answer.pieces}) > 1  # the demo model exits early
    avg = sum(p.loops for p in answer.pieces) / 4
    assert captions(w) == [f"4 tokens · avg {avg:.2f} loops"]
    status = w.stats_label.text()
    assert "tok/s" in status and "avg loops" in status and "GB" in status
    assert titles(w) == ["2,23,14,31"]
    assert w.conversation_list.item(0).data(0x0100 + 1).startswith("Today ")  # its date
    w.close()

    again = open_window()  # a restart: the conversation comes back from SQLite
    assert titles(again) == ["2,23,14,31"] and again.model_name.text() == "demo (bundled)"
    assert shown(again) == [("user", "2,23,14,31"), ("assistant", "=133")]
    assert fragments(again.bubbles()[1]) == merged


@needs_qt
def test_bubbles_sit_right_for_the_user_and_left_for_the_model(open_window, qtbot):
    w = open_window()
    w.resize(900, 600)
    long = "a longer message " * 30
    w.messages = [Message("user", "2,23,14,31"), Message("assistant", "=133", [
        Piece("=", 1), Piece("133", 3)], "stop"), Message("user", long)]
    w.render()
    qtbot.waitUntil(lambda: all(b.isVisible() for b in w.bubbles()))
    qtbot.wait(50)  # the layout settles
    chat = w.scroll.widget()
    width = w.scroll.viewport().width()
    spans = [(b.mapTo(chat, b.rect().topLeft()).x(), b.mapTo(chat, b.rect().topRight()).x())
             for b in w.bubbles()]
    (ul, ur), (al, ar), (ll, lr) = spans
    assert ur > width - 40 and ul > width / 2  # the user's: at the right
    assert al < 40 and ar < width / 2  # the model's: at the left
    assert lr - ll <= 0.75 * width and lr > width - 40  # a long one wraps, still right
    assert document(w.bubbles()[2]).toPlainText() == long  # its spaces kept
    label = w.bubbles()[2].label  # wrapped onto lines, and tall enough for all of them
    assert label.height() >= 4 * label.fontMetrics().lineSpacing()
    assert label.height() >= label.heightForWidth(label.width())


def test_titles_are_a_few_words_and_dates_read_as_dates():
    from datetime import datetime

    from ouro_mlx.desktop.window import friendly_date, short_title

    assert short_title("2,23,14,31") == "2,23,14,31"
    assert short_title("  What is the  capital of France, and why?\n") \
        == "What is the capital of…"
    assert short_title("x" * 80) == "x" * 31 + "…" and short_title(" ") == "New chat"
    now = datetime(2026, 12, 5, 15, 30).timestamp()
    at = lambda *a: datetime(*a).timestamp()  # noqa: E731
    assert friendly_date(at(2026, 12, 5, 9, 7), now) == "Today 09:07"
    assert friendly_date(at(2026, 12, 4, 23, 59), now) == "Yesterday"
    assert friendly_date(at(2026, 12, 2, 8), now) == "Wednesday"
    assert friendly_date(at(2026, 11, 3), now) == "3 Nov"
    assert friendly_date(at(2025, 11, 3), now) == "3 Nov 2025"


@needs_qt
def test_conversations_are_titled_short_and_can_be_renamed(open_window, qtbot):
    w = open_window()
    w.single_turn.setChecked(True)
    send(qtbot, w, "2,23,14,31 and then some more words here")
    assert titles(w) == ["2,23,14,31 and then some more…"]
    w.new_conversation()
    assert shown(w) == [] and "4,34,12,23" in w.scroll.widget().findChild(
        type(w.legend), "emptyHint").text()
    send(qtbot, w, "4,34,12,23")
    assert titles(w) == ["4,34,12,23", "2,23,14,31 and then some more…"]
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QAbstractItemView, QLineEdit

    lst = w.conversation_list
    at = lst.visualItemRect(lst.item(1)).center()
    qtbot.mouseClick(lst.viewport(), Qt.LeftButton, pos=at)
    qtbot.mouseDClick(lst.viewport(), Qt.LeftButton, pos=at)  # a double-click edits
    assert lst.state() == QAbstractItemView.EditingState
    editor = lst.viewport().findChild(QLineEdit)
    assert editor.text() == "2,23,14,31 and then some more…"
    editor.setText("  my   first game ")
    qtbot.keyClick(editor, Qt.Key_Return)
    qtbot.waitUntil(lambda: titles(w) == ["4,34,12,23", "my first game"])
    first = w.store.conversations()[1]
    assert first.title == "my first game"
    item = w.conversation_list.item(1)
    w.open_conversation(item.data(0x0100))
    assert shown(w)[0] == ("user", "2,23,14,31 and then some more words here")


@needs_qt
def test_stop_mid_answer_keeps_partial_and_session_usable(open_window, qtbot):
    from PySide6.QtCore import Qt

    w = open_window()
    slow = [0.15]  # slow every token down (on the worker thread) so Stop lands mid-answer
    w.worker.token.connect(lambda *a: time.sleep(slow[0]), Qt.DirectConnection)
    w.input.setText("1,12,23,34,41,13,24,12")  # 7 swaps: an 8-letter answer
    with qtbot.waitSignal(w.worker.finished, timeout=ANSWER_MS):
        qtbot.mouseClick(w.send_button, Qt.LeftButton)
        qtbot.waitUntil(lambda: bool(w.streaming and w.streaming.pieces),
                        timeout=ANSWER_MS)
        assert w.stop_button.isEnabled() and not w.send_button.isEnabled()
        assert w.stop_button.isVisible() and not w.send_button.isVisible()  # one place
        qtbot.mouseClick(w.stop_button, Qt.LeftButton)
    answer = w.messages[-1]
    assert answer.finish == "cancelled"
    assert 1 <= len(answer.pieces) < 8
    assert captions(w)[-1].endswith("(stopped)") and "stopped" in w.stats_label.text()
    assert w.send_button.isEnabled() and not w.stop_button.isEnabled()
    assert w.send_button.isVisible() and not w.stop_button.isVisible()
    # the session is consistent after the stop: the next game is answered right
    slow[0] = 0.0
    send(qtbot, w, "2,23,14,31")
    assert w.messages[-1].content == "=133" and w.messages[-1].finish == "stop"
    stored = w.store.messages(w.conversation_id)
    assert [m.finish for m in stored] == ["", "cancelled", "", "stop"]


@needs_qt
def test_closing_mid_answer_keeps_the_partial_answer(open_window, qtbot):
    from PySide6.QtCore import Qt

    w = open_window()
    w.worker.token.connect(lambda *a: time.sleep(0.15), Qt.DirectConnection)
    w.input.setText("1,12,23,34,41,13,24,12")
    qtbot.mouseClick(w.send_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: bool(w.streaming and w.streaming.pieces), timeout=ANSWER_MS)
    w.close()
    again = open_window()
    user, answer = again.messages
    assert user.content == "1,12,23,34,41,13,24,12" and answer.finish == "cancelled"
    assert 1 <= len(answer.pieces) < 8 and captions(again)[-1].endswith("(stopped)")


@needs_qt
def test_a_message_too_long_for_the_model_is_one_line_and_not_resent(open_window, qtbot):
    from PySide6.QtCore import Qt

    w = open_window()
    w.single_turn.setChecked(False)
    w.input.setText(",".join(["12"] * 40))  # beyond the bundled model's 64 positions
    with qtbot.waitSignal(w.worker.failed, timeout=ANSWER_MS):
        qtbot.mouseClick(w.send_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.generating)
    status = w.stats_label.text()
    assert status.startswith("error: ") and "\n" not in status
    assert w.send_button.isEnabled() and w.messages[-1].role == "user"
    send(qtbot, w, "2,23,14,31")  # the failed turn is not part of the history
    assert w.messages[-1].content == "=133"


@needs_qt
def test_thinking_sections_collapse(open_window, qtbot):
    w = open_window()
    w.messages = [Message("user", "q"), Message("assistant", "<think>hmm</think>ok", [
        Piece("hmm", 4, True), Piece("ok", 2)], "stop")]
    w.render()
    answer = lambda: shown(w)[-1][1]  # noqa: E731
    assert answer() == "▸ thinking (1 tokens, click to show)\nok"
    link = w.bubbles()[-1].label
    link.linkActivated.emit("#think-1-0")  # a click on the section opens it
    assert answer() == "▾ thinking\nhmm\nok"
    assert ("hmm", "#c62828") in fragments(w.bubbles()[-1])  # in its depth colour
    w.bubbles()[-1].label.linkActivated.emit("#think-1-0")
    assert "hmm" not in answer()
    w.show_thinking.setChecked(True)  # all sections open
    assert "hmm" in answer()
    # while streaming: a folded section is one line, the answer follows it
    w.show_thinking.setChecked(False)
    w.messages, w.streaming = [], Message("assistant", "")
    w.render()
    assert shown(w) == [("assistant", "…")]  # waiting for the first token
    w.on_token("let me", 4, True)
    w.on_token(" see", 3, True)
    qtbot.waitUntil(lambda: shown(w) == [("assistant", "▸ thinking …")])
    w.on_token("=1", 1, False)  # once the answer begins, the section can be opened
    qtbot.waitUntil(lambda: shown(w) == [
        ("assistant", "▸ thinking (2 tokens, click to show)\n=1")])
    w.on_finished({"content": "<think>let me see</think>=1", "finish_reason": "stop",
                   "stats": {"generation_tps": 9.0, "avg_loops": 2.7, "peak_memory": 0.1,
                             "kv_bytes": 0, "finish": "finished: end of answer"}})
    assert shown(w) == [("assistant", "▸ thinking (2 tokens, click to show)\n=1")]
    assert "9.0 tok/s · avg loops 2.70" in w.stats_label.text()
    assert captions(w) == ["1 token · avg 2.67 loops"]


@needs_qt
def test_model_picker_loads_a_directory_and_reports_errors(open_window, qtbot, tiny_dir,
                                                           tmp_path):
    from PySide6.QtCore import Qt

    w = open_window()
    w.model_edit.setText(str(tmp_path / "missing"))
    qtbot.mouseClick(w.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.loading, timeout=LOAD_MS)
    assert w.stats_label.text().startswith("error: could not load")
    assert "\n" not in w.stats_label.text() and "missing" in w.stats_label.text()
    # the model in use stays usable, and named
    assert w.model_info["name"] == "demo" and w.send_button.isEnabled()
    assert w.model_name.text() == "demo (bundled)" and w.model_edit.text() == "demo"
    send(qtbot, w, "2,23,14,31")
    assert w.messages[-1].content == "=133"
    w.model_edit.setText(str(tiny_dir))
    qtbot.mouseClick(w.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: w.model_info is not None, timeout=LOAD_MS)
    assert w.model_info["name"] == str(tiny_dir) and not w.single_turn.isChecked()
    assert w.store.setting("model") == str(tiny_dir)
    assert w.model_edit.text() == str(tiny_dir) and w.model_name.text() == tiny_dir.name
    w.model_edit.setText("demo")  # the bundled model by its short name
    qtbot.mouseClick(w.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: w.model_info is not None, timeout=LOAD_MS)
    assert w.model_info["bundled"] and w.model_name.text() == "demo (bundled)"
    w.model_edit.setText(str(tiny_dir))
    qtbot.mouseClick(w.load_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: w.model_info is not None, timeout=LOAD_MS)
    w.loops.setValue(2)
    send(qtbot, w, "hello")
    assert w.messages[-1].role == "assistant"
    assert {p.loops for p in w.messages[-1].pieces} <= {1, 2}


@needs_qt
def test_hub_progress_bar_reports_files_or_bytes(open_window):
    from ouro_mlx.desktop.worker import hub_progress_bar

    seen = []
    bar = hub_progress_bar(lambda *a: seen.append(a))(total=3, desc="Fetching 3 files")
    bar.update(1)
    bar.update(2)
    bar.close()
    assert seen[0] == (0, 3, "files") and seen[-1] == (3, 3, "files")
    # huggingface_hub >= 1.0: byte bars too; the files bar is then silent, and the bar of
    # network bytes leaves the report to the bar of bytes written
    seen.clear()
    Bar = hub_progress_bar(lambda *a: seen.append(a))
    net = Bar(total=0, unit="B", desc="Downloading bytes")
    disk = Bar(total=0, unit="B", desc="Reconstructing")
    files = Bar(total=2, desc="Fetching 2 files")
    disk.total = net.total = 3 << 20
    net.update(1 << 20)
    disk.update(2 << 20)
    files.update(1)
    assert seen[-1] == (2, 3, "MiB") and all(unit == "MiB" for *_, unit in seen)
    for b in (net, disk, files):
        b.close()
    w = open_window()
    w.on_progress(2, 3, "MiB")
    assert w.progress.format() == "%v/%m MiB" and w.progress.value() == 2


@needs_qt
def test_command_line_options_reach_the_window(open_window, qtbot, tmp_path, monkeypatch):
    """`ouro-mlx app` flags: the start values of the controls and the session options."""
    import ouro_mlx.desktop.app as desktop_app
    from ouro_mlx.cli import main

    seen = {}
    monkeypatch.setattr(desktop_app, "run", lambda store, **kw: seen.update(kw, store=store))
    assert main(["app", "--ut-steps", "6", "--exit-threshold", "0.3", "--kv-mode", "last",
                 "-m", "3", "--system-prompt", "Be brief.", "--data-dir",
                 str(tmp_path / "d")]) == 0
    assert seen.pop("store") == tmp_path / "d" / "conversations.sqlite3"
    w = open_window(**seen)
    assert (w.loops.value(), w.threshold.value()) == (6, 0.3)
    assert w.system_edit.text() == "Be brief." and "5&ndash;6" in w.legend.text()
    session = w.worker.session
    assert session.kv["kv_mode"] == "last" and session.sampling["max_tokens"] == 3
    send(qtbot, w, "2,23,14,31")
    assert len(w.messages[-1].pieces) <= 3 and w.messages[-1].finish == "length"
    assert captions(w)[-1].endswith("(cut: token or context limit)")


def damaged_store(path) -> None:
    """A store as a crash, a sync tool or another program may leave it: good
    conversations next to rows of the wrong types, NULLs (its tables made without NOT
    NULL) and settings of the wrong types; conversations 1 and 4 are good."""
    db = sqlite3.connect(path)
    with db:  # this version's tables, less the constraints a damaged file may lack
        db.executescript("""
            CREATE TABLE schema_version (version INTEGER);
            INSERT INTO schema_version VALUES (1);
            CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT, model TEXT,
                                        created REAL, updated REAL);
            CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER,
                                   role TEXT, content TEXT, pieces TEXT, finish TEXT,
                                   created REAL);
            CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);""")
        rows = [(1, "older game", "demo", 100.0, 100.0),
                (2, "broken time", "demo", 200.0, "yesterday"),
                (3, None, "demo", 300.0, 300.0),
                (4, "newer game", None, 400.0, 400.0),
                (5, "no time", "demo", 500.0, None),
                (6, b"\x00\xff", "demo", 600.0, 600.0),
                (7, "far future", "demo", 700.0, 1e300)]
        db.executemany("INSERT INTO conversations VALUES (?,?,?,?,?)", rows)
        pieces = json.dumps([["=", 1, False], ["133", 4, False]])
        messages = [(1, 4, "user", "2,23,14,31", "[]", "", 1.0),
                    (2, 4, None, "lost role", "[]", "", 2.0),
                    (3, 4, "assistant", None, "[]", "", 3.0),
                    (4, 4, "assistant", b"\x01", "[]", "", 4.0),
                    (5, 4, "assistant", "=133", pieces, None, "not a time"),
                    (6, 1, "user", "3,12,34", None, None, None)]
        db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?)", messages)
        db.executemany("INSERT INTO settings VALUES (?,?)", [
            ("system_prompt", "123"), ("show_thinking", '"yes"'),
            ("conversation", '"4"'), ("model", "[1]")])
    db.close()


def all_rows(path) -> tuple[list, list]:
    with sqlite3.connect(path) as db:
        return (db.execute("SELECT * FROM conversations ORDER BY id").fetchall(),
                db.execute("SELECT * FROM messages ORDER BY id").fetchall())


@needs_qt
def test_a_damaged_store_opens_with_its_good_rows_and_names_the_rest(open_window, qtbot,
                                                                     tmp_path):
    path = tmp_path / "conversations.sqlite3"
    damaged_store(path)
    before = all_rows(path)
    w = open_window()  # it opens, and the bundled model loads
    assert w.model_info is not None and w.model_info["bundled"]
    assert titles(w) == ["newer game", "older game"]  # the readable ones
    assert w.system_edit.text() == "" and not w.show_thinking.isChecked()
    assert w.conversation_id is None and w.model_edit.text() == "demo"
    warned = [m.removeprefix(f"{path}: ") for m in w.store.warnings]
    assert sorted(warned) == sorted([
        "setting 'system_prompt' ignored (it is the number 123; expected text).",
        "setting 'show_thinking' ignored (it is the text 'yes'; expected true or false).",
        "conversation 5 skipped (its time is empty (NULL)).",
        "conversation 6 skipped (its title is binary (2 bytes)).",
        "conversation 3 skipped (its title is empty (NULL)).",
        "conversation 2 skipped (its time is 'yesterday').",
        "conversation 7 skipped (its time is 1e+300).",
        "setting 'conversation' ignored (it is the text '4'; expected a whole number).",
        "setting 'model' ignored (it is a list; expected text).",
    ])
    assert w.warning.isVisible() and "conversation 2 skipped" in w.warning.text()
    assert str(path) in w.warning.text()
    w.conversation_list.itemClicked.emit(w.conversation_list.item(0))
    assert shown(w) == [("user", "2,23,14,31"), ("assistant", "=133")]
    assert fragments(w.bubbles()[1]) == [("=", "#00838f"), ("133", "#c62828")]
    assert w.store.warnings[-3:] == [
        f"{path}: message 2 of conversation 4 skipped (its role is empty (NULL)).",
        f"{path}: message 3 of conversation 4 skipped (its text is empty (NULL)).",
        f"{path}: message 4 of conversation 4 skipped (its text is binary (1 bytes)).",
    ]
    w.conversation_list.itemClicked.emit(w.conversation_list.item(1))
    assert shown(w) == [("user", "3,12,34")]
    send(qtbot, w, "4,34,12,23")  # the store still takes new messages
    assert shown(w)[-1] == ("assistant", "=233")
    w.close()
    # nothing was deleted: the damaged rows are where they were, new rows added
    conversations, messages = all_rows(path)
    assert [c for c in conversations if c[0] != 1] == [c for c in before[0] if c[0] != 1]
    assert messages[:len(before[1])] == before[1] and len(messages) == len(before[1]) + 2


@needs_qt
def test_ouro_mlx_app_opens_a_damaged_store_and_quits_on_ctrl_c(tmp_path):
    """The real command on the store of the report (a number as the system prompt, a
    time that is not one): it opens, warns on stderr, loads the bundled model, and
    Ctrl-C closes it: exit 130, no traceback, no abort."""
    import queue
    import signal
    import subprocess
    import sys
    import threading

    from ouro_mlx.desktop.app import READY

    damaged_store(tmp_path / "conversations.sqlite3")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "OURO_MLX_APP_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "ouro_mlx", "app"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    err, loaded = [], False
    try:
        end = time.monotonic() + 60
        while READY + "\n" not in err and time.monotonic() < end and proc.poll() is None:
            try:
                err.append(lines.get(timeout=0.2))
            except queue.Empty:
                pass
        while not loaded and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)  # the bundled model is in use once the store names it
            with sqlite3.connect(tmp_path / "conversations.sqlite3") as con:
                loaded = con.execute("SELECT value FROM settings WHERE key = 'model'"
                                     ).fetchall() == [('""',)]
        assert proc.poll() is None and loaded, "".join(err)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    time.sleep(0.2)
    while not lines.empty():
        err.append(lines.get())
    text = "".join(err)
    assert code == 130, text
    assert "Traceback" not in text and "QThread" not in text
    assert "ouro-mlx app: warning: " in text and "setting 'system_prompt' ignored" in text
    assert "conversation 2 skipped (its time is 'yesterday')" in text


@needs_qt
def test_ouro_mlx_app_refuses_an_unreadable_store_in_one_line(qapp, tmp_path, capsys):
    """A failure while the window opens (here: tables this version did not write) is
    one line, and the worker thread it had started has ended (a running one would abort
    the process when the window goes)."""
    import gc

    from PySide6.QtCore import QThread

    from ouro_mlx.cli import main

    path = tmp_path / "conversations.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("CREATE TABLE schema_version (version INTEGER);"
                         "INSERT INTO schema_version VALUES (1);"
                         "CREATE TABLE conversations (id INTEGER PRIMARY KEY, name TEXT);"
                         "INSERT INTO conversations VALUES (1, 'kept');")
    started = []
    real_start = QThread.start
    with pytest.MonkeyPatch.context() as mp:  # see the worker thread the window starts
        mp.setattr(QThread, "start", lambda self, *a: (started.append(self),
                                                       real_start(self, *a))[1])
        assert main(["app", "--data-dir", str(tmp_path)]) == 1
    assert len(started) == 1 and not started[0].isRunning()
    err = capsys.readouterr().err
    assert err == (f"ouro-mlx app: error: {path}: not a readable conversation store "
                   "(no such column: title).\n")
    started.clear()
    gc.collect()  # the window and its thread go; a running thread would abort here
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT * FROM conversations").fetchall() == [(1, "kept")]


@needs_qt
def test_qt_binding_keeps_refcounts_of_none_and_bools(qapp):
    """PySide6 6.12.0 released None and True/False once per processEvents / emit: on
    Python < 3.12 the app crashed within seconds ("none_dealloc"). pyproject keeps that
    version out; this catches a binding with the same fault."""
    import sys

    from PySide6.QtCore import QEventLoop, QObject, Signal, Slot

    class Sender(QObject):
        token = Signal(str, int, bool)

        @Slot(str, int, bool)
        def on_token(self, text, loops, thinking):
            pass

    s = Sender()
    s.token.connect(s.on_token)
    for _ in range(50):  # settle caches
        qapp.processEvents(QEventLoop.AllEvents, 1)
        s.token.emit("x", 1, True)
    before = [sys.getrefcount(x) for x in (None, True, False)]
    for _ in range(2000):
        qapp.processEvents()
        s.token.emit("x", 1, True)
        s.token.emit("y", 2, False)
    after = [sys.getrefcount(x) for x in (None, True, False)]
    assert all(a - b > -100 for a, b in zip(after, before)), (before, after)


@needs_qt
def test_window_keeps_responding_while_the_model_works(open_window, qtbot, small_dir):
    """Loading and generation run on the worker thread: the GUI's event loop keeps
    ticking (a 10 ms timer) through both."""
    from PySide6.QtCore import QTimer

    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(10)
    w = open_window(model=str(small_dir), session_kwargs={"sampling": {"max_tokens": 48}})
    assert w.model_info["hidden_size"] == 256
    send(qtbot, w, "hello")
    timer.stop()
    assert len(w.messages[-1].pieces) > 10
    assert len(gaps) > 20 and max(gaps) < 1.0, max(gaps)


@needs_qt
def test_model_picker_downloads_a_repo_id_with_progress(open_window, qtbot, tiny_dir,
                                                        monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download (stubbed here: no network)
    with the window's progress bar; the downloaded directory is loaded."""
    import huggingface_hub

    w = open_window()
    shown = []
    w.worker.progress.connect(lambda *a: shown.append(a))

    def fake_download(repo_id, allow_patterns=None, tqdm_class=None, **kw):
        assert repo_id == "someone/tiny-ouro" and "config.json" in allow_patterns
        bar = tqdm_class(total=4 << 20, unit="B", desc="Reconstructing")
        for _ in range(4):
            bar.update(1 << 20)
        bar.close()
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    w.model_edit.setText("someone/tiny-ouro")
    w.load_button.click()
    qtbot.waitUntil(lambda: w.model_info is not None and w.model_info["name"]
                    == "someone/tiny-ouro", timeout=LOAD_MS)
    assert shown[-1] == (4, 4, "MiB") and w.progress.isHidden()
    assert w.store.setting("model") == "someone/tiny-ouro"
