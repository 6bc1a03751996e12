"""Blue is the current view, green the new one; ``split`` picks one per visitor."""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse

from .canary import split


def hello(request: HttpRequest, colour: str) -> HttpResponse:
    decision = request.META.get("canarymw.decision")
    response = HttpResponse(f"Hello, {colour} World!\n", content_type="text/plain")
    response["X-Canary-Variant"] = decision.variant if decision is not None else "-"
    response["X-Worker-Pid"] = str(os.getpid())  # which worker answered: the colour must not depend on it
    return response


def green(request: HttpRequest) -> HttpResponse:
    return hello(request, "Green")


@split(new=green)
def blue(request: HttpRequest) -> HttpResponse:
    return hello(request, "Blue")


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")
