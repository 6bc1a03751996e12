"""A small client of the admin's JSON API: what the ``canarymw`` store commands use when
``--store`` is an ``http(s)://`` admin URL instead of a store.

Its answers are the store's: ``report`` returns what ``store._report.report`` returns,
``history`` :class:`~canarymw.store.Change` entries, ``change`` the new
:class:`~canarymw.store.RolloutState`; and its errors are the store's too
(:class:`~canarymw.store.UnknownRollout` for 404, :class:`~canarymw.store.VersionConflict`
for 409, :class:`~canarymw.store.StoreUnavailable` when the admin or its store cannot be
reached), so the commands print the same and exit with the same codes either way.
Needs httpx (imported when a client is made).
"""

from __future__ import annotations

import json
from typing import Any

from .._version import __version__
from ..store._model import (
    Change,
    RolloutState,
    StoreError,
    StoreUnavailable,
    UnknownRollout,
    VersionConflict,
)

TIMEOUT = 10.0
"""Seconds the client waits for the admin (to connect, and for each read)."""


class AdminError(StoreError):
    """The admin refused a request, or something else answered: ``status`` is the HTTP
    status (401 and 403: the credentials; 400: the input; 404: no such page, a wrong
    URL), the message one sentence saying so."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_admin_url(url: str) -> bool:
    """Whether ``url`` names an admin (``http://`` or ``https://``) rather than a store."""
    scheme, sep, _ = url.strip().partition("://")
    return bool(sep) and scheme.lower() in ("http", "https")


def shown(url: str) -> str:
    """``url`` for a message: without credentials, query or fragment."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return url.split("?")[0].split("#")[0]
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class AdminClient:
    """The JSON API of the admin at ``url`` (where it is mounted: ``https://host/canary``),
    with a bearer ``token``.

    Raises ValueError for a URL that is not one, ImportError (one sentence) without httpx.
    """

    def __init__(self, url: str, token: str, *, timeout: float = TIMEOUT, transport: Any = None) -> None:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url.strip())
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError(f"admin URL {shown(url)!r} is not a valid URL.") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"admin URL {shown(url)!r} is not a valid URL; use https://host/path.")
        if parts.username is not None or parts.query or parts.fragment:
            raise ValueError(
                f"admin URL {shown(url)!r} may have no user, query or fragment; give the token "
                "with --token or CANARYMW_TOKEN."
            )
        if not token or not token.isprintable() or not token.isascii() or " " in token.strip():
            raise ValueError("the admin token must be printable ASCII text without spaces.")
        try:
            import httpx
        except ImportError:
            raise ImportError(
                "talking to an admin URL needs httpx, which is not installed; install it: pip install httpx"
            ) from None
        self.url = url.strip().rstrip("/")
        self._httpx = httpx
        self._client = httpx.Client(
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
            headers={
                "Authorization": f"Bearer {token.strip()}",
                "Accept": "application/json",
                "User-Agent": f"canarymw/{__version__}",
            },
        )

    def __repr__(self) -> str:
        return f"AdminClient({shown(self.url)!r})"

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- the API -------------------------------------------------------------------
    def report(self, name: str | None = None, window: float | None = None) -> dict[str, Any]:
        """The report of every rollout, or of ``name`` (what ``canarymw status --json`` prints)."""
        params: dict[str, Any] = {} if window is None else {"window": _decimal(window)}
        if name is None:
            data: dict[str, Any] = self._call("GET", "/api/rollouts", params=params)
        else:
            data = self._call("GET", "/api/rollout", params={"name": name, **params})
        return data

    def history(self, name: str, limit: int = 50) -> list[Change]:
        """The newest ``limit`` entries of ``name``'s audit log, oldest first."""
        data = self._call("GET", "/api/history", params={"name": name, "limit": str(limit)})
        fields = Change.__dataclass_fields__
        return [Change(**{k: v for k, v in c.items() if k in fields}) for c in data["changes"]]

    def state(self, name: str) -> RolloutState:
        """``name``'s state now."""
        data = self.report(name)
        return _state(data["rollouts"][name]["state"])

    def change(
        self,
        name: str,
        action: str,
        *,
        reason: str = "",
        percent: float | None = None,
        expected_version: int | None = None,
    ) -> RolloutState:
        """Apply an operator's action (as :func:`canarymw.store.change`; the admin records
        the token's name as who made it). Without ``expected_version``, against the version
        read just before, as the store commands do."""
        if expected_version is None:
            expected_version = self.state(name).version
        body: dict[str, Any] = {
            "name": name,
            "action": action,
            "reason": reason,
            "expected_version": expected_version,
        }
        if action == "set":
            body["percent"] = percent
        data = self._call("POST", "/api/action", json_body=body)
        return _state(data["state"])

    # -- plumbing --------------------------------------------------------------------
    def _call(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None
    ) -> Any:
        httpx = self._httpx
        where = shown(self.url)
        try:
            if json_body is None:
                response = self._client.request(method, self.url + path, params=params)
            else:
                response = self._client.request(
                    method,
                    self.url + path,
                    content=json.dumps(json_body, allow_nan=False).encode(),
                    headers={"Content-Type": "application/json"},
                )
        except httpx.TimeoutException:
            raise StoreUnavailable(f"the admin at {where} did not answer within {TIMEOUT:g} s.") from None
        except httpx.HTTPError as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreUnavailable(
                f"the admin at {where} cannot be reached ({detail.rstrip('.')})."
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        status = response.status_code
        if status == 200 and isinstance(data, dict):
            return data
        sentence = data.get("error") if isinstance(data, dict) else None
        if not isinstance(sentence, str) or not sentence.strip():
            # Not the admin's JSON API: a proxy, another app, a wrong path.
            text = f"the admin at {where} answered {status} {response.reason_phrase}, not with its JSON API"
            text += "; is the URL where the admin is mounted?" if status < 400 or status == 404 else "."
            if status in (502, 503, 504):
                raise StoreUnavailable(text)
            raise AdminError(status, text)
        sentence = " ".join(sentence.split())
        if status == 404 and isinstance(data, dict) and "rollout" in data:
            raise UnknownRollout(sentence)
        if status == 409:
            raise VersionConflict(sentence)
        if status == 503:
            raise StoreUnavailable(sentence)
        if status == 401:
            why = sentence.rstrip(".")
            raise AdminError(status, f"the admin at {where} did not accept the token ({why}).")
        if status == 403:
            raise AdminError(status, f"the admin at {where} refused: {sentence}")
        if status == 400:
            raise AdminError(status, sentence)  # the input: said as the store commands would
        raise AdminError(status, f"the admin at {where} answered {status}: {sentence}")


def _decimal(value: float) -> str:
    # The API takes digits with an optional fraction: never 1e-05 or inf.
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _state(data: dict[str, Any]) -> RolloutState:
    fields = RolloutState.__dataclass_fields__
    return RolloutState(**{k: v for k, v in data.items() if k in fields})
