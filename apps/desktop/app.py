"""Start the desktop app: a QApplication, the conversation store and the window."""

from __future__ import annotations

import signal
import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from .store import Store
from .window import MainWindow

READY = "ouro-mlx app: the window is open (Ctrl-C here quits)."


def warn(text: str) -> None:
    print(f"ouro-mlx app: warning: {text}", file=sys.stderr, flush=True)


def run(store_path: str | None = None, **window_kwargs) -> int:
    """Open the window and run Qt's event loop until it is closed or Ctrl-C (then
    130, as a shell reports an interrupted command)."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("ouro-mlx")
    store = Store(store_path, on_warning=warn)
    window = None
    interrupted = []

    def on_sigint(*_) -> None:
        # a second Ctrl-C ends the process at once (e.g. while a model still loads)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        interrupted.append(True)
        window.close()  # stops the worker and keeps a partial answer
        app.quit()

    # Qt's loop runs in C++: a timer hands control back to Python now and then so
    # that the SIGINT handler gets to run
    tick = QTimer()
    tick.timeout.connect(lambda: None)
    previous = signal.getsignal(signal.SIGINT)
    try:
        window = MainWindow(store, **window_kwargs)  # stops its thread if it fails
        window.show()
        signal.signal(signal.SIGINT, on_sigint)
        tick.start(200)
        print(READY, file=sys.stderr, flush=True)
        code = app.exec()
        return 130 if interrupted else code
    finally:
        tick.stop()
        signal.signal(signal.SIGINT, previous)
        if window is not None:
            window.shutdown()
        store.close()
