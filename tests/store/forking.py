"""Run a piece of a test in a forked child, as a forking server (gunicorn) runs a worker."""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable


def fork(work: Callable[[], None]) -> int:
    """Run ``work()`` in a forked child; its pid (the child exits 0 if it returned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    """Wait for the child ``pid``: its exit code."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
