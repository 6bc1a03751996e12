"""The process-wide plumbing: after-fork resets and the log rate limit."""

from __future__ import annotations

import gc
import os
import time

import pytest

from canarymw import Rollout, Upstream
from canarymw._runtime import RateLimit, reset_after_fork

KEY = "runtime-secret-key-0123456789abcdef"


class Owner:
    def __init__(self) -> None:
        self.state = "parent"

    def reset(self) -> None:
        self.state = "child"


def in_child(check: object) -> int:
    """Fork; in the child evaluate ``check()`` (an exit status); return the child's status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's result comes back as its exit status
        try:
            os._exit(int(check()))  # type: ignore[operator]
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_a_child_resets_what_is_alive_and_forgets_what_is_gone() -> None:
    alive, gone = Owner(), Owner()
    reset_after_fork(alive, Owner.reset)
    reset_after_fork(gone, Owner.reset)
    log = []
    reset_after_fork(Owner(), lambda owner: log.append(owner))  # freed at once
    del gone
    gc.collect()
    assert in_child(lambda: 0 if alive.state == "child" and not log else 1) == 0
    assert alive.state == "parent"  # the parent keeps its state


@needs_fork
def test_a_forked_worker_forgets_the_upstream_pool_and_the_rollout_ids() -> None:
    upstream = Upstream("http://127.0.0.1:9")
    pool = upstream._sync_pool()
    rollout = Rollout("runtime", percent=50, secret_key=KEY)
    rollout.decide(None)  # fills the pool of ids made ahead
    assert rollout._fresh

    def check() -> int:
        return 0 if upstream._pool is None and upstream._sync_pool() is not pool and not rollout._fresh else 1

    assert in_child(check) == 0
    assert upstream._pool is pool and rollout._fresh


def test_the_rate_limit_lets_one_through_per_interval() -> None:
    limit = RateLimit(0.2)
    assert limit.due() and not limit.due() and not limit.due()
    time.sleep(0.25)
    assert limit.due() and not limit.due()
    assert RateLimit(0.0).due() and RateLimit(0.0).due()
