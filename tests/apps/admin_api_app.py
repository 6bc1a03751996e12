"""An old/new pair following a shared store, with the operator page mounted at ``/canary``,
for the real-server admin tests (``tests/real_servers/test_admin_servers.py``).

Configured by the environment (every worker imports it and follows the store on its
own): ``CANARYMW_TEST_STORE`` (a store URL), ``CANARYMW_TEST_NAME``,
``CANARYMW_TEST_TOKEN`` (an ``operate`` bearer token), ``CANARYMW_TEST_READ_TOKEN`` (a
``read`` one), ``CANARYMW_TEST_BASIC_PASSWORD`` (user ``alice``, ``operate``) and
``CANARYMW_TEST_ADMIN_KEY`` (the CSRF key, the same in every worker).

``app`` is WSGI (``admin.mount_wsgi``: the admin answers ``/canary/...`` before the
canary middleware sees the request); ``asgi_app`` is Starlette with
``Mount("/canary", app=admin.asgi)`` beside a split route ``/``. Routed responses say
their variant, the worker's pid and the version of the rollout's state that worker
applied (``X-Variant``, ``X-Pid``, ``X-Version``).
"""

from __future__ import annotations

import os
from typing import Any

from canarymw import Rollout, WSGICanaryMiddleware
from canarymw.admin import Admin, BasicAuth, BearerAuth

NAME = os.environ.get("CANARYMW_TEST_NAME", "checkout-v2")

ROLLOUT = Rollout(
    NAME,
    percent=0,
    secret_key="admin-api-app-secret-key-0123456789abcdef",
    store=os.environ["CANARYMW_TEST_STORE"],
    store_interval=0.2,
)
assert ROLLOUT.store is not None

ADMIN = Admin(
    ROLLOUT.store,
    auth=[
        BearerAuth(
            {
                os.environ["CANARYMW_TEST_TOKEN"]: ("deploy-bot", "operate"),
                os.environ["CANARYMW_TEST_READ_TOKEN"]: ("dashboard", "read"),
            }
        ),
        BasicAuth({"alice": (os.environ["CANARYMW_TEST_BASIC_PASSWORD"], "operate")}),
    ],
    secret_key=os.environ["CANARYMW_TEST_ADMIN_KEY"],
)


def _headers(label: str) -> list[tuple[str, str]]:
    version = ROLLOUT.store_status()["version"]
    return [
        ("X-Variant", label),
        ("X-Pid", str(os.getpid())),
        ("X-Version", "" if version is None else str(version)),
    ]


def make(label: str) -> Any:
    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = f"{label}\n".encode()
        start_response(
            "200 OK",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *_headers(label)],
        )
        return [body]

    return wsgi


app = ADMIN.mount_wsgi(WSGICanaryMiddleware(make("old"), new=make("new"), rollout=ROLLOUT), "/canary")


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount

    from canarymw.starlette import CanaryRoute

    def endpoint(label: str) -> Any:
        async def answer(request: Request) -> PlainTextResponse:
            return PlainTextResponse(f"{label}\n", headers=dict(_headers(label)))

        return answer

    return Starlette(
        routes=[
            Mount("/canary", app=ADMIN.asgi),
            CanaryRoute("/", endpoint("old"), endpoint("new"), rollout=ROLLOUT),
        ]
    )


asgi_app = _starlette()
