"""What both middlewares do at construction: check their arguments, resolve upstreams."""

from __future__ import annotations

import sys
from typing import Any, Literal


def check_adapter_args(
    owner: str, kind: str, old_app: object, new: object, rollout: object, cache_control: object
) -> None:
    """Validate what both middlewares take, with the same full-sentence errors."""
    from ._rollout import Rollout  # _rollout does not import this module back

    if not callable(old_app):
        raise TypeError(f"{owner} needs {kind} app to wrap, got {old_app!r}.")
    if new is not None and not callable(new):
        raise TypeError(f"{owner} needs new= to be {kind} app, got {new!r}.")
    if not isinstance(rollout, Rollout):
        raise TypeError(f"{owner} needs rollout= to be a canarymw.Rollout, got {rollout!r}.")
    if cache_control is not None and (not isinstance(cache_control, str) or not cache_control.isascii()):
        raise ValueError(
            f"{owner} got cache_control={cache_control!r}; use an ASCII directive such as 'private', or None."
        )


def resolve_upstreams(old: Any, new: Any, protocol: Literal["wsgi", "asgi"]) -> tuple[Any, Any]:
    """``old`` and ``new`` with each :class:`~canarymw.Upstream` turned into its proxy app.

    An Upstream can exist only once ``canarymw.upstream`` was imported, so the adapters
    never import it themselves: ``import canarymw`` loads no proxy.
    """
    module = sys.modules.get("canarymw.upstream")
    if module is not None:
        if isinstance(old, module.Upstream):
            old = getattr(old, f"{protocol}_app")()
        if isinstance(new, module.Upstream):
            new = getattr(new, f"{protocol}_app")(fallback=old)
    return old, new


_GUARD_SINKS: dict[int, tuple[Any, Any]] = {}  # id(store) -> (store, its StoreSink)


def with_guard_sink(sink: Any, rollout: Any) -> Any:
    """``sink``, plus a StoreSink on the rollout's store when the rollout has a guard
    (which judges the whole service's counters in the store) and no sink given feeds
    that store already. One StoreSink per store and process, shared by every middleware."""
    store = getattr(rollout, "store", None)
    if getattr(rollout, "guard", None) is None or store is None:
        return sink
    given = [] if sink is None else list(sink) if isinstance(sink, list | tuple) else [sink]
    if any(_feeds(s, store) for s in given):
        return sink
    held = _GUARD_SINKS.get(id(store))
    if held is None or held[0] is not store:
        from .sinks.store import StoreSink

        held = _GUARD_SINKS[id(store)] = (store, StoreSink(store))
    return [*given, held[1]]


def _feeds(sink: Any, store: Any) -> bool:
    if getattr(sink, "store", None) is store:
        return True
    return any(_feeds(s, store) for s in getattr(sink, "sinks", ()))
