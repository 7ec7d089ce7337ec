"""Ctrl-C honoured only where the run's state is whole.

Python raises `KeyboardInterrupt` wherever the main thread happens to be when SIGINT arrives:
inside a training step that can be after batch norm's running statistics took in a batch but
before the optimizer step, so the interrupt save would record a state no uninterrupted run
ever has, and `--resume` would differ from the run it continues. Inside a checkpoint save,
a second Ctrl-C would abort the save itself.

`InterruptGate` is the SIGINT handler for a stretch of code. While it holds (`hold()`, or
the whole stretch with `holding=True`), a Ctrl-C is only recorded; `release()` raises it as
`KeyboardInterrupt` at a point the caller chose (the end of a step). While it does not hold,
Ctrl-C raises at once, as usual. Once it has raised, it holds again: a Ctrl-C pressed while
the interrupt is being handled (the save) is recorded and dropped, so the save completes and
the run stops once.
Outside the main thread, where Python cannot install a signal handler, it holds nothing back.
"""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class InterruptGate:
    """SIGINT handler between `install()` and `restore()` (or as a context manager)."""

    def __init__(self, notice: str = "", *, holding: bool = True) -> None:
        #: Printed to stderr when a Ctrl-C is held back: what finishes first.
        self.notice = notice
        self.holding = holding
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if not self.holding:
            self.holding = True  # this interrupt is under way: a next Ctrl-C waits for its save
            raise KeyboardInterrupt
        self.pending = True
        if self.notice:  # os.write: the handler may run inside a print or a logging call
            os.write(2, f"\n{self.notice}\n".encode())

    def install(self) -> "InterruptGate":
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            # None: a handler installed outside Python; Python's own is the nearest to it.
            self._previous = signal.default_int_handler if previous is None else previous
            self._installed = True
        return self

    def restore(self) -> None:
        """Give SIGINT back to the handler that had it (a held Ctrl-C stays in `pending`)."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def hold(self) -> None:
        """From now on a Ctrl-C waits for `release()`."""
        self.holding = True

    def release(self) -> None:
        """Raise `KeyboardInterrupt` if Ctrl-C was pressed while held (and keep holding, so that
        a next Ctrl-C waits for the interrupt's save); else stop holding."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        self.holding = False

    def __enter__(self) -> "InterruptGate":
        return self.install()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.restore()


__all__ = ["InterruptGate"]
