"""Start the desktop app: a QApplication, the conversation store and the window."""

from __future__ import annotations

import sys

from PySide6.QtWidgets import QApplication

from .store import Store
from .window import MainWindow


def run(store_path: str | None = None, **window_kwargs) -> int:
    """Open the window and run Qt's event loop until it is closed."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("ouro-mlx")
    store = Store(store_path)
    try:
        window = MainWindow(store, **window_kwargs)
        window.show()
        return app.exec()
    finally:
        store.close()
