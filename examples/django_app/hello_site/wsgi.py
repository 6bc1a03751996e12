"""The WSGI entry point: Django's application, wrapped by canarymw.

Run (see README.md)::

    export CANARY_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    gunicorn -w 2 -b 127.0.0.1:8000 hello_site.wsgi
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hello_site.settings")

CANARY_KEY = os.environ.get("CANARY_KEY", "")
if not CANARY_KEY:
    # Not a random default: each worker would get its own key, reject the cookies the
    # others signed, and reshuffle visitors whenever a different worker answered.
    raise RuntimeError("Set CANARY_KEY to one secret shared by every worker (see README.md).")

rollout = Rollout(
    "hello-v2",
    percent=float(os.environ.get("CANARY_PERCENT", "10")),
    secret_key=CANARY_KEY,
    exclude=["/healthz"],  # never routed, never counted
)
sink = MemorySink()  # counts this worker's requests only

application = WSGICanaryMiddleware(get_wsgi_application(), new=None, rollout=rollout, sink=sink)
