"""OS names for the server's own threads.

Python 3.11 names a thread for Python only: the kernel still calls every thread by the
process's name, so per-thread CPU (``/proc/PID/task/TID/comm``, ``top -H``, ``midserve
bench``'s CPU budget) could not tell preparation from forward threads. Threads a named
thread starts (OpenMP teams) inherit its name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

PR_SET_NAME = 15  # linux/prctl.h
NAME_BYTES = 15  # the kernel keeps 16 bytes, the NUL included


@cache
def _prctl() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread an OS name: ``name``, or its Python name, cut to 15 bytes.
    Does nothing off Linux; a failed call only leaves the name as it was."""
    prctl = _prctl()
    if prctl is None:
        return
    raw = (name or threading.current_thread().name).encode("utf-8", "replace")[:NAME_BYTES]
    prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
