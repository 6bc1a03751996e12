"""How a middleware's ``shadow=`` becomes the wrapper it calls per request."""

from __future__ import annotations

from typing import Any, Literal

from ._config import Shadow


def shadow_tap(shadow: object, mw: Any, protocol: Literal["wsgi", "asgi"]) -> tuple[Any, Any]:
    """``(Shadow or None, the per-request wrapper or None)`` for a middleware's ``shadow=``
    (a Shadow, or an app or Upstream to shadow with the defaults).

    The first middleware given a Shadow picks its protocol; later ones must speak the same.
    """
    if shadow is None:
        return None, None
    if not isinstance(shadow, Shadow):
        shadow = Shadow(shadow)
    if shadow._protocol not in (None, protocol):
        raise ValueError(
            f"this Shadow already serves a {shadow._protocol.upper()} middleware; "
            f"make another Shadow(...) for the {protocol.upper()} one."
        )
    shadow._protocol = protocol
    if protocol == "wsgi":
        from ._wsgi import WSGITap

        return shadow, WSGITap(shadow, mw).wrap
    from ._asgi import ASGITap

    return shadow, ASGITap(shadow, mw).wrap
