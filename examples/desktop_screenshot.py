"""Write a screenshot of the desktop app (``ouro-mlx app``) for the README.

Opens the real window offscreen on the bundled model, plays a few shell games through
it as a user would (type, Send, wait for the answer), and saves the window as a PNG.
Conversations go to a temporary directory, not to your own.

    python examples/desktop_screenshot.py            # writes docs/desktop.png
    python examples/desktop_screenshot.py --out shot.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

GAMES = ["2,23,14,31", "3,12,34", "4,41,12,23"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" /
                                        "desktop.png"))
    args = p.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    from ouro_mlx.desktop.store import Store
    from ouro_mlx.desktop.window import MainWindow

    app = QApplication([])

    def wait_until(done, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() > end:
                raise TimeoutError("the window did not finish in time")
            app.processEvents(QEventLoop.AllEvents, 50)

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "conversations.sqlite3")
        window = MainWindow(store)
        window.resize(920, 600)
        window.show()
        wait_until(lambda: window.model_info is not None)
        for game in GAMES:
            window.input.setText(game)
            window.send_button.click()
            wait_until(lambda: not window.generating)
        app.processEvents()
        if not window.grab().save(args.out):
            raise OSError(f"{args.out}: could not write the PNG")
        window.close()
        store.close()
    print(f"wrote {args.out}: {window.stats_label.text()}")


if __name__ == "__main__":
    main()
