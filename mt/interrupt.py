"""Stopping on a signal without losing work, and the exit codes that say why a command stopped.

    with StopRequest() as stop:        # the training loop
        for update in ...:
            ...                        # one whole update
            if stop.signum:            # SIGINT (Ctrl-C) or SIGTERM (timeout, schedulers, torchrun)
                save(); raise Interrupted(stop.signum, "interrupted at step N; checkpoint saved; ...")

The first signal asks the loop to finish the update it is in and save; a second one exits at once
(saves are atomic, so the previous checkpoint is intact). Outside such a block, `on_sigterm`
turns SIGTERM into the same `Interrupted` exception that Ctrl-C's KeyboardInterrupt becomes, so
every stage stops with one line and the shell's code for the signal.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

# Exit codes of mt-train (README: "Exit codes"); signals follow the shell's 128 + signal number.
EXIT_ERROR = 1  # bad input: config, data, checkpoint; the message names it
EXIT_DIVERGED = 3  # the loss or gradients stayed non-finite (train.max_nonfinite)
EXIT_IO = 74  # a file could not be written (disk full, permissions): sysexits' EX_IOERR
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    return 128 + signum  # SIGINT 130, SIGTERM 143


class Interrupted(Exception):
    """A command stopped by a signal; str() is the one line to print."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Within the block, SIGINT and SIGTERM set `signum` instead of raising; a second one exits
    at once with the signal's code. Handlers can only be set in the main thread: elsewhere the
    block is a no-op (signals then keep their usual effect)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now; the previous checkpoint "
                        "is intact\n".encode())
            os._exit(exit_code(signum))
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this update (again to exit "
                    "at once)\n".encode())

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def on_sigterm() -> None:
    """Make SIGTERM raise Interrupted (as SIGINT raises KeyboardInterrupt), in the main thread."""
    def handler(signum, frame):
        raise Interrupted(signum, "terminated (SIGTERM)")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
