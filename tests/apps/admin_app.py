"""A guarded old/new pair with the admin mounted at ``/canary``, for the admin's browser test.

Configured by the environment (every gunicorn worker imports it, follows the store and
runs a controller of its own): ``CANARYMW_TEST_STORE`` (a store URL),
``CANARYMW_TEST_NAME`` and ``CANARYMW_TEST_ADMIN_PASSWORD`` (the password of ``alice``,
role ``operate``).

The guard's first step is 50% and it never moves on by itself (an hour of bake time,
more canary requests than the test sends), so the rollout holds at 50% until an
operator acts. Routed answers say their variant (``X-Variant``); everything under
``/canary`` is the admin's, never routed.
"""

from __future__ import annotations

import os
from typing import Any

from canarymw import Rollout, WSGICanaryMiddleware
from canarymw.admin import Admin, BasicAuth
from canarymw.guard import Analysis, Guard
from canarymw.sinks.store import StoreSink

ROLLOUT = Rollout(
    os.environ.get("CANARYMW_TEST_NAME", "admin-v2"),
    percent=0,
    secret_key="admin-app-secret-key-0123456789abcdef",
    store=os.environ["CANARYMW_TEST_STORE"],
    store_interval=0.2,
    guard=Guard(
        steps=(50, 100),
        bake=3600,
        min_requests=1_000_000,
        analysis=Analysis(min_requests=50),
        interval=0.25,
        lease=1.0,
    ),
)
assert ROLLOUT.store is not None
# Flushed often, so the admin's charts have the test's traffic within a second.
SINK = StoreSink(ROLLOUT.store, interval=0.2)
ADMIN = Admin(
    ROLLOUT.store,
    auth=BasicAuth({"alice": (os.environ["CANARYMW_TEST_ADMIN_PASSWORD"], "operate")}),
    secret_key="admin-app-csrf-key-0123456789abcdef",
)


def make(label: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = f"{label}\n".encode()
        start_response(
            "200 OK",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("X-Variant", label)],
        )
        return [body]

    return app


app = ADMIN.mount_wsgi(
    WSGICanaryMiddleware(make("old"), new=make("new"), rollout=ROLLOUT, sink=SINK), "/canary"
)
