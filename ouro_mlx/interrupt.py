"""Ctrl-C in a training loop: finish the step, save, then stop.

The first Ctrl-C (SIGINT) only asks the loop to stop; the loop checks at the end of
each step, writes a checkpoint of that step and raises :class:`TrainingInterrupted`.
A second Ctrl-C interrupts at once (the checkpoint before it stays, since every save
is atomic).
"""

from __future__ import annotations

import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving: ``step`` is the last step trained and
    ``checkpoint`` where it was saved (None when nothing could be saved)."""

    def __init__(self, message: str, step: int, checkpoint=None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """A context in which Ctrl-C sets ``requested`` instead of raising, the first
    time. Outside the main thread, or where someone else handles SIGINT, it leaves
    the handler alone (Ctrl-C raises as usual)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> "StopRequest":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def everywhere(self, size: int = 1) -> bool:
        """Whether any process asked to stop (a collective when ``size`` > 1, so
        every process stops at the same step)."""
        if size <= 1:
            return self.requested
        import mlx.core as mx

        flag = mx.array(int(self.requested))
        return mx.distributed.all_sum(flag, stream=mx.cpu).item() > 0
