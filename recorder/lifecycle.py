"""Closing recorders the script did not close: at a normal interpreter exit, and on SIGTERM
(how clusters preempt jobs), so every step trained so far reaches disk and the run says why
it ended.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Any, Protocol


class Closable(Protocol):
    def close_unfinished(self, warning: str, failure: str) -> None: ...


_OPEN: dict[Closable, bool] = {}  # recorders not closed yet → whether SIGTERM closes it
_HOOKED = False
_previous_sigterm: Any = signal.SIG_DFL


def track(recorder: Closable, on_sigterm: bool = True) -> None:
    """Close `recorder` at exit (and on SIGTERM, unless `on_sigterm` is False: a distributed
    run's ranks would wait on each other) unless the script closes it first."""
    global _HOOKED
    if not _HOOKED:
        _HOOKED = True
        _hook_exit()
        _hook_sigterm()
    _OPEN[recorder] = on_sigterm


def untrack(recorder: Closable) -> None:
    _OPEN.pop(recorder, None)


def _close_all(warning: str, failure: str, sigterm: bool = False) -> None:
    for recorder, on_sigterm in list(_OPEN.items()):
        if on_sigterm or not sigterm:
            recorder.close_unfinished(warning, failure)


def _hook_exit() -> None:
    """The close must run before concurrent.futures shuts its thread pools down (at
    threading's shutdown, before atexit handlers), or the writer can't write the last blocks:
    threading's own exit hooks run last-registered first, so one registered after those
    pools' runs before them."""
    def at_exit() -> None:
        _close_all("was never closed", "Recorder.close() was never called")
    try:
        getattr(threading, "_register_atexit", atexit.register)(at_exit)
    except RuntimeError:  # the interpreter is already shutting down
        atexit.register(at_exit)


def _hook_sigterm() -> None:
    """On SIGTERM: close every open recorder, then do what the process would have done
    (the handler it had, or the default: terminate with the signal). Only from the main
    thread, and not where SIGTERM is ignored."""
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is signal.SIG_IGN or current is None:
        return
    _previous_sigterm = current
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    _close_all("was stopped by SIGTERM", "stopped by SIGTERM before Recorder.close()",
               sigterm=True)
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
