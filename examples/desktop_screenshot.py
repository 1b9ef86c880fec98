"""Write a screenshot of the desktop app (``ouro-mlx app``) to a PNG you name.

Opens the real window offscreen on the bundled model, plays a few shell games through
it as a user would (type, Send, wait for the answer), and saves the window as a PNG.
Conversations go to a temporary directory, not to your own.

    python examples/desktop_screenshot.py shot.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

GAMES = ["4,34,12,23", "2,23,14,31", "1,12,23,34"]
EARLIER = ["3,12,34", "what does a loop step do"]  # older chats, for the sidebar


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="The PNG to write (e.g. shot.png).")
    p.add_argument("--size", default="1040x660", help="Window size, WIDTHxHEIGHT.")
    args = p.parse_args()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size: expected WIDTHxHEIGHT such as 1040x660, got {args.size!r}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        p.error(f"{args.out}: the screenshot is a PNG; name a .png file")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    from ouro_mlx.desktop.store import Store
    from ouro_mlx.desktop.window import MainWindow, short_title

    app = QApplication([])

    def wait_until(done, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise TimeoutError("the window did not finish in time")
            app.processEvents(QEventLoop.AllEvents, 50)

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "conversations.sqlite3")
        for days, text in zip((1, 3), EARLIER):  # older conversations in the sidebar
            cid = store.new_conversation(short_title(text), "demo")
            with store.db:
                store.db.execute("UPDATE conversations SET updated = ? WHERE id = ?",
                                 (time.time() - days * 86400, cid))
        window = MainWindow(store)
        window.resize(width, height)
        window.show()
        wait_until(lambda: window.model_info is not None)
        for game in GAMES:
            window.input.setText(game)
            window.send_button.click()
            wait_until(lambda: not window.generating)
        for _ in range(5):
            app.processEvents(QEventLoop.AllEvents, 50)
        # written next to the target, then renamed: an interrupted run leaves no half PNG
        part = out.with_name(out.name + ".part.png")
        if not window.grab().save(str(part)):
            raise OSError(f"{args.out}: could not write the PNG")
        os.replace(part, out)
        window.close()
        store.close()
    print(f"wrote {args.out}: {window.stats_label.text()}")


if __name__ == "__main__":
    main()
