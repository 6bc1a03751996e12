"""The upstream exceptions; see the tree in ``canarymw.upstream``'s manual."""

from __future__ import annotations


class UpstreamError(Exception):
    """An upstream failed; :attr:`status` is the answer a client gets when nothing else can."""

    status: int = 502


class UpstreamUnavailable(UpstreamError):
    """No connection could be used, so nothing was sent: any request may go elsewhere."""


class UpstreamConnectError(UpstreamUnavailable):
    """The connection was refused, the name did not resolve, or the host is unreachable."""


class UpstreamConnectTimeout(UpstreamUnavailable):
    """Connecting took longer than ``connect_timeout``."""

    status = 504


class UpstreamPoolTimeout(UpstreamUnavailable):
    """Every pooled connection stayed busy for ``pool_timeout`` seconds."""

    status = 504


class UpstreamProtocolError(UpstreamError):
    """After the request was (perhaps partly) sent: connection lost or answer malformed."""


class UpstreamTimeout(UpstreamError):
    """After the request was (perhaps partly) sent: a read or a write timed out."""

    status = 504


class UpstreamAborted(UpstreamError):
    """The response broke off after it had started; raised so the server aborts the connection."""


class _IncompleteBody(Exception):
    """The client sent fewer body bytes than announced (it went away)."""


class _HeadTimedOut(Exception):
    """ASGI: the upstream's response head took longer than ``head_timeout``."""
