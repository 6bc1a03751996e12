"""Shadow traffic: send a copy of requests to a second app and compare the answers.

::

    from canarymw import Rollout, Shadow, WSGICanaryMiddleware

    rollout = Rollout("search-v2", percent=0, secret_key=KEY)   # everyone on old
    app.wsgi_app = WSGICanaryMiddleware(
        app.wsgi_app, new=search_v2, rollout=rollout,
        shadow=Shadow(search_v2, normalize=mask_timestamps),
    )
    ...
    middleware.shadow.report().routes["/search"].mismatch_rate

Every GET and HEAD request that old served is copied to the shadow once old's response
has finished: off the request path, through a bounded queue and a fixed number of
workers, so a slow, failing or overloaded shadow costs the user nothing (copies that do
not fit are dropped and counted). The two responses are compared (status, a few headers
that matter, the body, each after an optional normaliser) and every copy ends as one
:class:`Comparison` whose ``result`` is one of :data:`Result`: counted per route, the
newest mismatches kept as samples (:meth:`Shadow.report`), and handed to every sink of
the middleware that takes comparisons (``record_comparison``): the store's counters
(``canarymw status`` shows the mismatch rate), Prometheus and OpenTelemetry.

What the shadow never gets: the cohort cookie (unless ``send_cohort_cookie=True``), the
force token, the client's connection, requests with bodies (unless ``methods`` allows
them), and any say in the response. The copy's WSGI environ or ASGI scope carries
``canarymw.shadow = True``, so an app that serves both roles can skip side effects.
See docs/shadow.md.
"""

from __future__ import annotations

from ._compare import RESULTS, Comparison, Normaliser, Result, ShadowResponse
from ._config import DEFAULT_HEADERS, Primary, Shadow, ShadowRequest
from ._record import RouteReport, ShadowReport

__all__ = [
    "DEFAULT_HEADERS",
    "RESULTS",
    "Comparison",
    "Normaliser",
    "Primary",
    "Result",
    "RouteReport",
    "Shadow",
    "ShadowReport",
    "ShadowRequest",
    "ShadowResponse",
]
