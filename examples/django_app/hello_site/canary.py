"""``split``: one URL, two views; which one serves a request is canarymw's decision.

The decision comes from :class:`canarymw.WSGICanaryMiddleware`, which wraps the whole
Django application in ``wsgi.py`` and puts it in ``request.META["canarymw.decision"]``
(Django's ``request.META`` is the WSGI environ). A request without one (an excluded path,
or a test client that does not go through ``wsgi.py``) gets the old view.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

View = Callable[..., HttpResponse]


def split(new: View) -> Callable[[View], View]:
    """Serve the canary cohort from ``new``, everyone else from the decorated view."""

    def decorate(old: View) -> View:
        @functools.wraps(old)
        def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            decision = request.META.get("canarymw.decision")
            if request.resolver_match is not None:
                # The outcome's route: the URL pattern, never the raw path (bounded labels).
                request.META["canarymw.route"] = "/" + request.resolver_match.route
            chosen = new if decision is not None and decision.variant == "new" else old
            return chosen(request, *args, **kwargs)

        return view

    return decorate
