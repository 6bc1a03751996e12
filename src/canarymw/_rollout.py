"""Rollout: configuration, live percent, and the sans-IO cohort decision."""

from __future__ import annotations

import hmac
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from time import time as _time
from time import time as time_now
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import unquote_plus

from ._bucketing import BUCKETS, bucketer
from ._cookie import (
    MAX_VALUE_LENGTH,
    CookieCodec,
    decode_record,
    encode_record,
    find_values,
    new_ids,
    normalise_keys,
    render_set_cookie,
    validate_cookie_settings,
)
from ._runtime import BoundedCache, reset_after_fork

if TYPE_CHECKING:
    from .guard import Guard
    from .guard._controller import Controller
    from .store import RolloutState, Store
    from .store._identity import Identities

Variant = Literal["old", "new"]
Reason = Literal["bucket", "allowlist", "denylist", "forced", "sticky"]
Policy = Literal["monotone", "drain", "pin"]
POLICIES = ("monotone", "drain", "pin")
LOGIN = ("keep", "switch")
KeyFunc = Callable[[Any], "str | int | None"]

log = logging.getLogger("canarymw")

_CACHE_SIZE = 20_000
_CACHE_CHARS = 4 << 20
_HEADER_KEY_MAX = 4096
# Caches of what a client sends are bounded in entries and in key characters, so memory
# stays bounded whatever the header sizes: each of the three caches of a rollout holds at
# most _CACHE_CHARS key characters. Whole Cookie headers longer than _HEADER_KEY_MAX are
# not cached at all; their cohort value still is.
_MAX_CHECKS = 2
# Cohort values (and query force tokens) checked per request: a header stuffed with
# hundreds of forged values costs at most this many HMAC checks. Browsers send the most
# specific cookie first. See: RFC 6265 §5.4 (cookie order).
FORCE_HEADER = "x-canarymw-force"
"""The request header that forces a variant: ``X-Canarymw-Force: new:<token>``."""
FORCE_PARAM = "canarymw_force="
"""The query field that forces a variant when ``force_query`` is on (with its ``=``)."""
_FRESH_BATCH = 64
# First visits take ids made, hashed and signed ahead in batches: in one tight loop each
# costs a fraction of what it costs cold between two requests of a web app.
_tuple_new = tuple.__new__


class Decision(NamedTuple):
    """Where one request goes, and why. Immutable.

    Exposed as ``environ["canarymw.decision"]`` (WSGI) and ``scope["canarymw.decision"]``
    (ASGI) so handlers and log formatters can read it. A named tuple rather than a
    frozen dataclass because a first visit builds one, and a tuple is cheaper to make.
    """

    rollout: str
    """Name of the rollout that decided."""
    variant: Variant
    """``"old"`` or ``"new"``."""
    reason: Reason
    """``"bucket"`` (the percent split), ``"sticky"`` (a variant recorded earlier that
    the ``drain`` or ``pin`` policy keeps), ``"allowlist"``, ``"denylist"`` or ``"forced"``."""
    cohort: str
    """The stickiness key: the user key from ``key=``, else the cookie's random id."""
    bucket: int
    """The visitor's anchor bucket in ``[0, 10000)``: ``bucket(salt, key)`` of the first
    key they were assigned by (the cookie id, or the user key of a user first seen
    without one), which survives login."""
    set_cookie: str | None = None
    """``Set-Cookie`` value the response must carry, or None (cookie valid and fresh)."""
    first_visit: bool = False
    """True when this request created the cohort id (a new assignment)."""

    @property
    def is_new(self) -> bool:
        """True when the request goes to the new implementation."""
        return self.variant == "new"


class _Entry:
    # One verified cookie value: its id, anchor bucket and record.
    __slots__ = ("anchor", "bucket", "decision", "epoch", "gen", "id", "refresh_at", "variant")

    def __init__(
        self, cid: str, bkt: int, refresh_at: float, variant: str | None, epoch: int, anchor: int | None
    ) -> None:
        self.id = cid
        self.bucket = bkt
        self.refresh_at = refresh_at
        self.variant = variant
        self.epoch = epoch
        self.anchor = anchor
        self.gen = -1
        self.decision: Decision | None = None


class _User:
    # What this process knows of a key= user: the assignment, and whether the store has
    # confirmed it (then it wins over a cookie: one user, one variant on every device).
    __slots__ = ("agrees", "bucket", "epoch", "state", "variant")

    def __init__(self, bkt: int, variant: str | None, epoch: int, state: int) -> None:
        self.bucket = bkt
        self.variant = variant
        self.epoch = epoch
        self.state = state
        self.agrees: _Entry | None = None  # the cookie entry last seen to carry this assignment


_UNASKED, _ASKED, _CONFIRMED = 0, 1, 2


class _PathMatcher:
    __slots__ = ("_exact", "_prefixes", "_regexes")

    def __init__(self, rules: Iterable[str | re.Pattern[str]], owner: str) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        regexes: list[re.Pattern[str]] = []
        for rule in rules:
            if isinstance(rule, re.Pattern):
                regexes.append(rule)
            elif isinstance(rule, str) and rule.startswith("/"):
                base = rule.rstrip("/")
                exact.add(base or "/")
                if base:
                    prefixes.append(base + "/")
            else:
                raise ValueError(
                    f"{owner} got exclude rule {rule!r}; use a path starting with '/' "
                    "(it also covers everything below it) or a compiled regular expression."
                )
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)
        self._regexes = tuple(regexes)

    def __bool__(self) -> bool:
        return bool(self._exact or self._regexes)

    def __call__(self, path: str) -> bool:
        return (
            path in self._exact
            or (bool(self._prefixes) and path.startswith(self._prefixes))
            or any(r.match(path) for r in self._regexes)
        )


def split_force_query(query: str) -> tuple[list[str], str]:
    """Split the ``canarymw_force`` fields off a query string: ``(values, the rest)``.

    The rest keeps every other field byte for byte, so the adapters can hand the app
    (and an upstream) the query without the token. Only the literal field name counts,
    for forcing and for removal alike.
    """
    values: list[str] = []
    kept: list[str] = []
    for field in query.split("&"):
        if field.startswith(FORCE_PARAM):
            values.append(unquote_plus(field[len(FORCE_PARAM) :]))
        else:
            kept.append(field)
    return values, "&".join(kept)


def _open_store(store: object, interval: object, owner: str) -> Store:
    from .store import Store as StoreProtocol
    from .store import open_store

    if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0.05 <= interval <= 60:
        raise ValueError(f"{owner} got store_interval={interval!r}; use a number of seconds from 0.05 to 60.")
    if isinstance(store, str):
        return open_store(store)
    if not isinstance(store, StoreProtocol):
        raise TypeError(
            f"{owner} got store={store!r}; pass a store (MemoryStore, SQLiteStore, RedisStore) or its URL."
        )
    return store


def _check_percent(value: object, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{owner} got percent {value!r} of type {type(value).__name__}; use a number from 0 to 100."
        )
    pct = float(value)
    if math.isnan(pct) or not 0.0 <= pct <= 100.0:
        raise ValueError(f"{owner} got percent {value!r}; use a number from 0 to 100.")
    return pct


_CONFIG = frozenset(
    (
        "name",
        "salt",
        "key",
        "allow",
        "deny",
        "force_token",
        "force_query",
        "is_excluded",
        "cookie_name",
        "cookie_max_age",
        "cookie_path",
        "cookie_domain",
        "cookie_secure",
        "cookie_samesite",
        "cookie_httponly",
        "on_exposure",
        "counters",
        "cookie_only",
        "store",
        "guard",
        "controller",
        "policy",
        "on_login",
        "user_memory",
    )
)


class Rollout:
    """One canary rollout: its name, live percentage, cohort cookie and overrides.

    ``Rollout`` is sans-IO: the WSGI and ASGI middlewares and the framework
    integrations all call :meth:`decide`, so every adapter assigns a visitor the same
    way. It is safe to share between threads and to change :attr:`percent` at run time.
    Everything else is fixed at construction (the adapters read it once): assigning
    ``key``, ``force_token``, a ``cookie_*`` attribute and the like raises
    ``AttributeError``; make a new ``Rollout`` instead.

    Args:
        name: Identifies the rollout in outcomes and metrics; also the default hash salt.
        percent: Share of cohorts, 0 to 100 (resolution 0.01), sent to ``new``.
            Raising it only moves cohorts from old to new; ``0`` is the kill switch
            (everyone old at once, whatever their cookie), ``100`` the blue/green switch.
            What lowering it does depends on ``policy``.
        policy: Who moves when the percent changes (see docs/policies.md).
            ``"monotone"`` (default): the variant follows the bucket and the live
            percent, so lowering the percent moves the most recently added cohorts back
            to ``old``. ``"drain"``: a visitor who got ``new`` keeps it when the percent
            is lowered (only where new visitors go changes), so no half-migrated
            session is switched back; raising still moves visitors to ``new``.
            ``"pin"``: every visitor keeps the first variant they got, both ways. Under
            every policy ``0`` sends everyone to ``old`` and ``100`` everyone to
            ``new``; a drop to ``0`` (a rollback) and :meth:`reset` start a new
            assignment epoch, in which nothing recorded before counts. ``drain`` and
            ``pin`` record the variant in the cohort cookie (format 2, under 120
            characters; older cookies stay valid and are recorded on their next visit).
        on_login: With ``key=``, what a visitor who logs in gets. ``"keep"``
            (default): the assignment they already had (their cookie's) survives login,
            so nobody's variant flips when they sign in; with a ``store``, a user's first
            assignment is kept there for ``user_memory`` seconds and followed on every
            device. ``"switch"``: the user key's own bucket decides, as if first seen.
        user_memory: Seconds a store remembers a user's assignment after their last
            request (default 90 days); needs ``key=`` and ``store=``.
        secret_key: Key for the cohort cookie signature, or a list oldest to newest
            for rotation: the newest signs, all verify, and a cookie that verifies only
            with an older key is re-issued with the newest (same id, same variant).
        salt: Bucketing salt; defaults to ``name``, so two rollouts split independently.
            Keep it when renaming a rollout, or everyone is reshuffled.
        key: Optional callable given the WSGI environ or ASGI scope that returns a
            stable user key (a logged-in user id), or None for anonymous visitors. A
            user then gets one variant on every device and no cohort cookie is needed.
        allow: Cohort keys (user keys or cookie ids) always sent to ``new`` while
            ``0 < percent``.
        deny: Cohort keys always kept on ``old`` while ``percent < 100``.
        force_token: Secret enabling a per-request override: header
            ``X-Canarymw-Force: new:<token>`` (``old`` works too). Without the token
            nobody can choose a variant. The adapters remove the header (and any
            ``canarymw_force`` query field) before the app or an upstream sees the
            request, so the token never reaches their logs.
        force_query: Also accept the token in the query, ``?canarymw_force=new:<token>``.
            Off by default: a token in a URL lands in browser history, in the access
            logs of every server in front of this one and in ``Referer`` headers.
        exclude: Paths that are never routed, never get a cookie and never count
            (health checks, static files, metrics). ``"/static"`` covers ``/static``
            and everything below it; a compiled regex is matched against the path.
        cookie_name: The cohort cookie's name; ``cookie_max_age``, ``cookie_path``,
            ``cookie_domain``, ``cookie_samesite`` and ``cookie_httponly`` set its
            attributes. The cookie is refreshed (same id) once half of
            ``cookie_max_age`` has passed, so active visitors never expire.
        cookie_secure: ``None`` sets ``Secure`` on https requests only; True/False force it.
        on_exposure: Called with the :class:`Decision` when a visitor is first placed:
            once per new cohort id, and for ``key=`` users once per process (until the
            bounded key cache is cleared). For exposure logging to analytics. It runs on
            the request path, so it must be quick (hand slow work to a queue); if it
            raises, the error is counted in ``counters["exposure_errors"]`` and logged,
            and the request goes on.
        store: Share the live state (percent, pause) with every process and host: a
            :class:`~canarymw.store.Store` or its URL (``memory://``,
            ``sqlite:///state.db``, ``redis://host:6379/0``). ``percent`` then seeds the
            store if it holds nothing for this rollout; after that the store is the
            truth (a deploy with another ``percent`` in code applies it unless an
            operator paused or rolled back since), and setting :attr:`percent` writes
            to the store. Requests never wait for the store: a background thread
            follows it, and if it cannot be reached the last known state (at start,
            ``percent``) stays in force. See docs/stores.md.
        store_interval: Longest time, in seconds, between two reads of the store
            (changes usually arrive sooner: Redis pushes them, SQLite is polled cheaply).
        guard: Ramp, judge and roll back by itself: a :class:`~canarymw.guard.Guard`
            (steps, bake time, statistics). Needs the outcome counters of the whole
            service in the store: the middlewares add a
            :class:`~canarymw.sinks.store.StoreSink` on this rollout's store unless
            given one. Without ``store=``, a :class:`~canarymw.store.MemoryStore` (one
            process). See docs/guard.md.
    """

    def __init__(
        self,
        name: str,
        *,
        percent: float,
        secret_key: str | bytes | list[str] | list[bytes] | tuple[str | bytes, ...],
        salt: str | None = None,
        key: KeyFunc | None = None,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        force_token: str | None = None,
        force_query: bool = False,
        exclude: Iterable[str | re.Pattern[str]] = (),
        cookie_name: str = "canarymw",
        cookie_max_age: int | None = 30 * 24 * 3600,
        cookie_path: str = "/",
        cookie_domain: str | None = None,
        cookie_secure: bool | None = None,
        cookie_samesite: str | None = "Lax",
        cookie_httponly: bool = True,
        on_exposure: Callable[[Decision], object] | None = None,
        store: Store | str | None = None,
        store_interval: float = 1.0,
        guard: Guard | None = None,
        policy: Policy = "monotone",
        on_login: Literal["keep", "switch"] = "keep",
        user_memory: float = 90 * 24 * 3600,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("Rollout needs a non-empty name, such as 'checkout-v2'.")
        owner = f"Rollout {name!r}"
        self.name = name
        self.salt = name if salt is None else salt
        if not isinstance(self.salt, str) or "\x00" in self.salt:
            raise ValueError(f"{owner} got salt {salt!r}; use a string without NUL characters.")
        if on_exposure is not None and not callable(on_exposure):
            raise TypeError(f"{owner} got on_exposure={on_exposure!r}; pass a callable or None.")
        self.on_exposure = on_exposure
        if key is not None and not callable(key):
            raise TypeError(f"{owner} got key={key!r}; pass a callable or None.")
        if force_token is not None and (not isinstance(force_token, str) or len(force_token) < 16):
            raise ValueError(
                f"{owner} needs force_token to be a string of at least 16 characters, "
                "so that nobody can guess their way into a variant."
            )
        if not isinstance(force_query, bool):
            raise TypeError(f"{owner} got force_query={force_query!r}; pass True or False.")
        if force_query and force_token is None:
            raise ValueError(f"{owner} sets force_query without a force_token; set both or neither.")
        validate_cookie_settings(owner, cookie_name, cookie_samesite, cookie_secure, cookie_max_age)
        if not isinstance(cookie_path, str) or not cookie_path.startswith("/"):
            raise ValueError(f"{owner} got cookie_path {cookie_path!r}; it must start with '/'.")
        if policy not in POLICIES:
            raise ValueError(f"{owner} got policy={policy!r}; use 'monotone', 'drain' or 'pin'.")
        if on_login not in LOGIN:
            raise ValueError(f"{owner} got on_login={on_login!r}; use 'keep' or 'switch'.")
        if (
            isinstance(user_memory, bool)
            or not isinstance(user_memory, int | float)
            or not math.isfinite(user_memory)
            or user_memory <= 0
        ):
            raise ValueError(f"{owner} got user_memory={user_memory!r}; use a positive number of seconds.")
        self.policy = policy
        self.on_login = on_login
        self.user_memory = float(user_memory)
        self._codec = CookieCodec(normalise_keys(secret_key, owner))
        self._cookie_templates: dict[bool, tuple[str, str, str]] = {}
        self._bucket = bucketer(self.salt)
        self._state = (0.0, 0.0, 0)
        self._gen = 0
        self._lock = threading.Lock()
        self._set_local(_check_percent(percent, owner))
        self._code_percent = self.percent
        self._override: float | None = None
        self._store_state: RolloutState | None = None
        self._store_started = False
        self._synced_at: float | None = None
        self._applied_at: float | None = None
        self._store_error: str | None = None
        self._store_lock = threading.Lock()
        self.key = key
        self.allow = frozenset(str(k) for k in allow)
        self.deny = frozenset(str(k) for k in deny)
        self.force_token = force_token
        self.force_query = force_query
        self.cookie_only = key is None and force_token is None
        """True when a decision depends on the cohort cookie alone (no ``key`` callable, no
        force token): a returning visitor's decision may then come from :meth:`cached`."""
        self.is_excluded = _PathMatcher(exclude, owner)
        self.cookie_name = cookie_name
        self._needle = cookie_name + "="  # a Cookie header without it holds no value of ours
        self.cookie_max_age = cookie_max_age
        self.cookie_path = cookie_path
        self.cookie_domain = cookie_domain
        self.cookie_secure = cookie_secure
        self.cookie_samesite = cookie_samesite
        self.cookie_httponly = cookie_httponly
        self._refresh_after = math.inf if cookie_max_age is None else cookie_max_age / 2
        # (id, bucket, signed value) made ahead; used only while their issue time is recent.
        self._fresh: list[tuple[str, int, str]] = []
        self._fresh_until = 0.0
        self._fresh_ttl = min(60.0, self._refresh_after / 8)
        reset_after_fork(self, Rollout._forget_fresh)
        # Cohort value -> entry (verified once); whole Cookie header -> entry (the
        # returning visitor's one dict lookup); user key -> bucket.
        self._seen: BoundedCache[_Entry] = BoundedCache(_CACHE_SIZE, _CACHE_CHARS, MAX_VALUE_LENGTH)
        self._by_header: BoundedCache[_Entry] = BoundedCache(_CACHE_SIZE, _CACHE_CHARS, _HEADER_KEY_MAX)
        self._users: BoundedCache[_User] = BoundedCache(_CACHE_SIZE, _CACHE_CHARS, _HEADER_KEY_MAX)
        self._identities: Identities | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "assigned",
                "cookie_rejected",
                "cookie_reissued",
                "key_errors",
                "forced",
                "exposure_errors",
                "store_errors",
                "recorded",
                "users_dropped",
            ),
            0,
        )
        """Health counters: new ids assigned, cookies rejected (tampered, foreign
        key, malformed), cookies re-issued (refresh or key rotation), failures of the
        ``key`` callable, forced requests, failed reads of the store, variants recorded
        anew in a cookie (``drain``, ``pin``), and users' assignments not sent to the
        store because its queue was full."""
        if guard is not None:
            from .guard import Guard as GuardType

            if not isinstance(guard, GuardType):
                raise TypeError(f"{owner} got guard={guard!r}; pass a canarymw.guard.Guard or None.")
            if store is None:
                from .store import MemoryStore

                store = MemoryStore()
        self.guard = guard
        """The rollout's :class:`~canarymw.guard.Guard` (``guard=``), or None."""
        self.store: Store | None = None if store is None else _open_store(store, store_interval, owner)
        """The store this rollout follows (``store=``), or None."""
        controller = None
        if guard is not None and self.store is not None:
            from .guard._controller import Controller

            controller = Controller(self, self.store, guard)
        self.controller: Controller | None = controller
        """This process's controller of the guard (None without ``guard=``)."""
        if self.store is not None:
            from .store._follow import follow

            follow(self, self.store, store_interval)
            if key is not None:
                from .store._identity import Identities

                self._identities = Identities(self, self.store)
        if controller is not None:
            controller.ensure_thread()

    def __repr__(self) -> str:
        return f"Rollout({self.name!r}, percent={self.percent!r})"

    def _forget_fresh(self) -> None:
        # A forked worker must never hand out an id its parent or a sibling also holds.
        self._fresh = []
        self._fresh_until = 0.0

    def __setattr__(self, name: str, value: Any) -> None:
        # Configuration is read once by the adapters: a later change would look live and
        # not be. Reads stay plain attribute reads; only writes pay for this check.
        if name in _CONFIG and name in self.__dict__:
            raise AttributeError(
                f"Rollout {self.name!r} has {name} fixed at construction (the middlewares read it "
                f"once); only percent changes at run time, so make a new Rollout for another {name}."
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _CONFIG:
            raise AttributeError(f"Rollout {self.name!r} cannot lose its {name}.")
        object.__delattr__(self, name)

    # -- percent ---------------------------------------------------------------
    @property
    def percent(self) -> float:
        """Share of cohorts sent to ``new``, 0 to 100. Settable from any thread."""
        return self._state[0]

    @percent.setter
    def percent(self, value: float) -> None:
        pct = _check_percent(value, f"Rollout {self.name!r}")
        if self.store is None:
            self._set_local(pct)
            return
        # With a store, the store is the truth: write there (an audited change by
        # "code"), then apply at once here; every other process follows.
        from .store._follow import change

        self._apply_state(
            change(self.store, self.name, "set", percent=pct, by="code", reason="percent set in code")
        )

    def _set_local(self, pct: float, epoch: int | None = None) -> None:
        with self._lock:
            old_pct, _, old_epoch = self._state
            if epoch is None:
                # Without a store, this process keeps the assignment epoch: one up on a drop to 0.
                epoch = old_epoch + 1 if pct <= 0.0 < old_pct else old_epoch
            # One tuple, so readers never see a percent with another's threshold or
            # epoch; the generation bump afterwards retires cached decisions.
            # Whole buckets: 0.07% is 7 buckets, not 7.000000000000001 (which would let an 8th in).
            self._state = (pct, round(pct * (BUCKETS / 100), 6), epoch)
            self._gen += 1

    @property
    def epoch(self) -> int:
        """The assignment epoch: one up at each :meth:`reset` and each drop to 0 percent.
        What ``drain`` and ``pin`` recorded for a visitor counts only within its epoch."""
        return self._state[2]

    def reset(self, *, by: str = "code", reason: str = "") -> None:
        """Start a new assignment epoch: every visitor's recorded variant (``drain``,
        ``pin``) is void, and each is assigned afresh by the percent on their next
        request. With a store, an audited change (``reset``) that every process follows."""
        if self.store is None:
            self._set_local(self.percent, self.epoch + 1)
            return
        from .store._follow import change

        self._apply_state(change(self.store, self.name, "reset", by=by, reason=reason or "reset in code"))

    def switch_off(self) -> None:
        """Send everyone to ``old`` in this process, whatever the store says, for good.

        What the ASGI middleware does when the new app fails its startup here. Unlike
        ``percent = 0`` it changes nothing in the store (other processes may be fine).
        """
        self._override = 0.0
        self._set_local(0.0)

    # -- the store ---------------------------------------------------------------
    def _apply_state(self, state: RolloutState, now: float | None = None) -> None:
        at = time_now() if now is None else now
        with self._store_lock:
            held = self._store_state
            # Never back to an older state of one epoch; a new epoch (the store lost the
            # rollout and it was seeded or restored anew) counts again from its start.
            if held is None or state.version > held.version or state.epoch != held.epoch:
                # Percent first: whoever sees the new version also sees its percent.
                if self._override is None and (state.percent, state.assignment) != (self.percent, self.epoch):
                    self._set_local(state.percent, state.assignment)
                self._store_state = state
                self._applied_at = at
            self._synced_at = at
            self._store_error = None

    def _store_failed(self, exc: BaseException) -> None:
        self._count("store_errors")
        self._store_error = str(exc) or type(exc).__name__

    def store_status(self) -> dict[str, Any]:
        """How this process's view of the store stands: ``version``, ``percent`` and
        ``paused`` of the last state applied (None before the first), ``applied_at``
        (Unix time this process applied it), ``age`` in seconds since the store last
        answered (None if never), ``error``, the last failure while the store does
        not answer (None when it does), and ``assignment``, the assignment epoch in force."""
        with self._store_lock:
            state, synced, applied, percent = (
                self._store_state,
                self._synced_at,
                self._applied_at,
                self.percent,
            )
        return {
            "store": None if self.store is None else repr(self.store),
            "version": None if state is None else state.version,
            "percent": percent,
            "applied_at": applied,
            "paused": None if state is None else state.paused,
            "age": None if synced is None else max(0.0, time_now() - synced),
            "error": self._store_error,
            "switched_off": self._override is not None,
            "assignment": self.epoch,
        }

    # -- pure helpers ------------------------------------------------------------
    def bucket_of(self, key: str) -> int:
        """The frozen bucket of ``key`` under this rollout's salt (see docs/cohorts.md)."""
        return self._bucket(key)

    def variant_for(self, key: str) -> Variant:
        """The variant a cohort key gets right now (overrides included, forcing and
        anything a ramp policy recorded not)."""
        return self._choose(key, self.bucket_of(key))[0]

    def _choose(
        self, cohort: str, bkt: int, recorded: str | None = None, recorded_epoch: int = -1
    ) -> tuple[Variant, Reason, int | None]:
        # (variant, reason, epoch to record the variant in, or None: nothing to record).
        pct, threshold, epoch = self._state
        if pct <= 0.0:
            return "old", "bucket", None
        policy = self.policy
        if recorded_epoch != epoch:
            recorded = None
        if pct >= 100.0:
            variant: Variant = "new"
            reason: Reason = "bucket"
        elif cohort in self.deny:
            return "old", "denylist", None
        elif cohort in self.allow:
            return "new", "allowlist", None
        elif recorded is not None and (policy == "pin" or (policy == "drain" and recorded == "new")):
            return recorded, "sticky", None  # type: ignore[return-value]
        else:
            variant, reason = ("new" if bkt < threshold else "old"), "bucket"
        if policy == "monotone" or (policy == "drain" and variant == "old"):
            return variant, reason, None
        if recorded is not None and (policy == "pin" or recorded == variant):
            return variant, reason, None  # pinned to old, shown new at 100%: the pin stays
        return variant, reason, epoch

    def _count(self, name: str) -> None:
        lock = self._lock
        lock.acquire()
        self.counters[name] += 1
        lock.release()

    # -- the decision ----------------------------------------------------------
    def decide(
        self,
        cookie_header: str | None,
        https: bool = False,
        force: str | None = None,
        query: str = "",
        request: Any = None,
    ) -> Decision:
        """Decide one request. Never raises for anything a client sent.

        Args:
            cookie_header: The request's ``Cookie`` header (several joined by ``"; "``).
            https: Whether the request came over https (sets ``Secure`` when auto).
            force: The ``X-Canarymw-Force`` header value, if any.
            query: The raw query string, searched for ``canarymw_force`` only when
                ``force_token`` and ``force_query`` are configured.
            request: The WSGI environ or ASGI scope, handed to the ``key`` callable.
        """
        if cookie_header and self.key is None and (self.force_token is None or not (force or query)):
            cached = self.cached(cookie_header)
            if cached is not None:
                return cached
        return self._decide_uncached(cookie_header, https, force, query, request)

    def _decide_uncached(
        self, cookie_header: str | None, https: bool, force: str | None, query: str, request: Any
    ) -> Decision:
        # decide() without its cache lookup, for adapters that have just looked themselves.
        decision = None
        if self.key is not None:
            decision = self._decide_by_key(request, cookie_header, https)
        if decision is None:
            gen = self._gen
            entry = self._lookup(cookie_header) if cookie_header and self._needle in cookie_header else None
            if entry is None:
                decision = self._assign(https)
            elif entry.refresh_at <= _time():
                decision = self._reissue(entry, https)
            else:
                if entry.gen == gen and entry.decision is not None:
                    decision = entry.decision
                else:
                    variant, reason, record = self._choose(entry.id, entry.bucket, entry.variant, entry.epoch)
                    if record is None:
                        decision = Decision(self.name, variant, reason, entry.id, entry.bucket)
                        entry.decision, entry.gen = decision, gen
                    else:
                        # Not cached: the browser sends the recorded value from its next request.
                        self._count("recorded")
                        value = self._cookie(entry.id, https, encode_record(variant, record, entry.anchor))
                        decision = Decision(self.name, variant, reason, entry.id, entry.bucket, value)
                if self.key is None:
                    self._by_header.put(cookie_header, entry)  # type: ignore[arg-type]
        if self.force_token is not None and (force or (self.force_query and FORCE_PARAM in query)):
            forced = self._forced(force, query)
            if forced is not None:
                self._count("forced")
                decision = decision._replace(variant=forced, reason="forced")
        return decision

    def deciders(self) -> tuple[Callable[[str], Decision | None] | None, Callable[..., Decision]]:
        """What an adapter calls per request, read once at its construction: the
        returning visitor's cache check (:meth:`cached`; None when ``key`` or
        ``force_token`` is configured, which it ignores) and the decision to call when
        that check gives None or there is no cookie (:meth:`decide`'s arguments)."""
        if self.cookie_only:
            return self.cached, self._decide_uncached
        return None, self.decide

    def cached(self, cookie_header: str) -> Decision | None:
        """The decision for an exact ``Cookie`` header seen before, if still current.

        The adapters' fast path for returning visitors: one dict lookup, no parsing and
        no HMAC. Returns None when :meth:`decide` must run (unknown header, a changed
        percent, a cookie due for refresh or for a new record). Ignores ``key`` and
        forcing: callers use it only when neither is configured.
        """
        entry = self._by_header.get(cookie_header)
        if entry is not None and entry.gen == self._gen and entry.refresh_at > _time():
            return entry.decision
        return None

    def _decide_by_key(self, request: Any, cookie_header: str | None, https: bool) -> Decision | None:
        try:
            raw = self.key(request)  # type: ignore[misc]
        except Exception:
            self._count("key_errors")
            log.exception("canarymw: key callable of rollout %r failed; using the cookie", self.name)
            return None
        if raw is None or raw == "":
            return None
        user = str(raw)
        entry = None
        if cookie_header:
            entry = self._by_header.get(cookie_header)
            if entry is None:
                entry = self._lookup(cookie_header)
                if entry is not None:
                    self._by_header.put(cookie_header, entry)
        held = self._users.get(user)
        if held is not None and entry is not None and held.agrees is entry and entry.refresh_at > _time():
            # A returning user whose cookie already says what this process knows.
            variant, reason, record = self._choose(user, held.bucket, held.variant, held.epoch)
            if record is None:
                return _tuple_new(Decision, (self.name, variant, reason, user, held.bucket, None, False))
        first = held is None
        if held is None or (held.state != _CONFIRMED and entry is not None):
            # Unknown here, or not confirmed by the store: the assignment the visitor
            # already holds (their cookie's) wins, so logging in never flips a variant.
            if entry is not None and self.on_login == "keep":
                if (
                    held is None
                    or held.bucket != entry.bucket
                    or _recorded(held.variant, held.epoch) != _recorded(entry.variant, entry.epoch)
                ):
                    held = _User(
                        entry.bucket, entry.variant, entry.epoch, _UNASKED if held is None else held.state
                    )
                    self._users.put(user, held)
            elif held is None:
                held = _User(self.bucket_of(user), None, 0, _UNASKED)
                self._users.put(user, held)
        identities = self._identities
        if identities is not None and held.state == _UNASKED:
            held.state = _ASKED
            identities.claim(user, held.bucket, held.variant, held.epoch)
        variant, reason, record = self._choose(user, held.bucket, held.variant, held.epoch)
        if record is not None:
            self._count("recorded")
            held.variant, held.epoch, held.agrees = variant, record, None
            if identities is not None:
                identities.remember(user, held.bucket, variant, record)
        value = None
        if entry is None:
            if record is not None:
                # Somewhere to keep the record for a user without a cookie: a new one.
                cid = self._take_fresh()[0]
                own = self._bucket(cid)
                anchor = None if own == held.bucket else held.bucket
                value = self._cookie(cid, https, encode_record(variant, record, anchor))
        elif (
            entry.bucket != held.bucket
            or _recorded(entry.variant, entry.epoch) != _recorded(held.variant, held.epoch)
            or entry.refresh_at <= _time()
        ):
            # The cookie follows the user's assignment, so logging out changes nothing either.
            own = entry.bucket if entry.anchor is None else self._bucket(entry.id)
            anchor = None if own == held.bucket else held.bucket
            text = (
                ""
                if anchor is None and held.variant is None
                else encode_record(held.variant, held.epoch, anchor)
            )
            value = self._cookie(entry.id, https, text)
        else:
            held.agrees = entry
        decision = Decision(self.name, variant, reason, user, held.bucket, value)
        if first and self.on_exposure is not None:
            self._expose(decision)
        return decision

    def _confirm(self, user: str, bkt: int, variant: str | None, epoch: int) -> None:
        # The store's answer to a claim: from now on it wins over any cookie.
        self._users.put(user, _User(bkt, variant, epoch, _CONFIRMED))

    def _unconfirm(self, user: str) -> None:
        held = self._users.get(user)
        if held is not None and held.state == _ASKED:
            held.state = _UNASKED  # ask again on the user's next request

    def _lookup(self, header: str) -> _Entry | None:
        # The first verifying value of the first _MAX_CHECKS wins; one rejection
        # is counted per request, however many forged values it carried.
        rejected = False
        entry = None
        for value in find_values(header, self.cookie_name, _MAX_CHECKS):
            entry = self._seen.get(value)
            if entry is None:
                verified = self._codec.verify(value)
                if verified is None:
                    rejected = True
                    continue
                cid, issued, newest, text = verified
                variant, epoch, anchor = decode_record(text) if text else (None, 0, None)  # type: ignore[misc]
                entry = _Entry(
                    cid,
                    self.bucket_of(cid) if anchor is None else anchor,
                    issued + self._refresh_after if newest else 0.0,
                    variant,
                    epoch,
                    anchor,
                )
            # Put back last (also on a hit): a visitor who keeps coming back outlives a flood.
            self._seen.put(value, entry)
            break
        if rejected:
            self._count("cookie_rejected")
        return entry

    def _attributes(self, https: bool) -> tuple[str, str, str]:
        secure = https if self.cookie_secure is None else self.cookie_secure
        # Attributes depend on configuration and scheme only: rendered once per pair.
        template = self._cookie_templates.get(secure)
        if template is None:
            template = self._cookie_templates[secure] = render_set_cookie(
                self.cookie_name,
                "\0",
                max_age=self.cookie_max_age,
                path=self.cookie_path,
                domain=self.cookie_domain,
                secure=secure,
                httponly=self.cookie_httponly,
                samesite=self.cookie_samesite,
            ).partition("\0")
        return template

    def _cookie(self, cid: str, https: bool, record: str = "") -> str:
        template = self._attributes(https)
        return template[0] + self._codec.issue(cid, int(_time()), record) + template[2]

    def _take_fresh(self) -> tuple[str, int, str]:
        if self._fresh_until > _time():
            try:
                # list.pop is atomic: no two threads ever take the same id.
                return self._fresh.pop()
            except IndexError:
                pass
        issued = int(_time())
        ids = new_ids(_FRESH_BATCH)
        batch = list(zip(ids, map(self._bucket, ids), self._codec.issue_many(ids, issued), strict=True))
        mine = batch.pop()
        # A thread refilling at the same time replaces this list; the ids it drops are
        # never used, so none is handed out twice.
        self._fresh = batch
        self._fresh_until = issued + self._fresh_ttl
        return mine

    def _assign(self, https: bool) -> Decision:
        cid, bkt, value = self._take_fresh()
        variant, reason, record = self._choose(cid, bkt)
        self._count("assigned")
        template = self._cookie_templates.get(https if self.cookie_secure is None else self.cookie_secure)
        if template is None:
            template = self._attributes(https)
        if record is not None:
            value = self._codec.issue(cid, int(_time()), encode_record(variant, record, None))
        decision: Decision = _tuple_new(
            Decision,
            (self.name, variant, reason, cid, bkt, template[0] + value + template[2], True),
        )
        if self.on_exposure is not None:
            self._expose(decision)
        return decision

    def _expose(self, decision: Decision) -> None:
        try:
            self.on_exposure(decision)  # type: ignore[misc]
        except Exception:
            self._count("exposure_errors")
            log.exception("canarymw: on_exposure hook of rollout %r failed; request unaffected", self.name)

    def _reissue(self, entry: _Entry, https: bool) -> Decision:
        variant, reason, record = self._choose(entry.id, entry.bucket, entry.variant, entry.epoch)
        self._count("cookie_reissued")
        if record is not None:
            self._count("recorded")
            text = encode_record(variant, record, entry.anchor)
        elif entry.variant is not None or entry.anchor is not None:
            text = encode_record(entry.variant, entry.epoch, entry.anchor)
        else:
            text = ""
        return Decision(
            self.name, variant, reason, entry.id, entry.bucket, self._cookie(entry.id, https, text)
        )

    def _forced(self, header: str | None, query: str) -> Variant | None:
        candidates = [header] if header else []
        if self.force_query and FORCE_PARAM in query:
            candidates += split_force_query(query)[0][:_MAX_CHECKS]
        token = self.force_token
        assert token is not None
        for raw in candidates:
            variant, _, given = raw.strip().partition(":")
            if variant in ("old", "new") and hmac.compare_digest(given.encode(), token.encode()):
                return variant  # type: ignore[return-value]
        return None


def _recorded(variant: str | None, epoch: int) -> tuple[str | None, int]:
    # A record compared for what it says: without a variant, its epoch means nothing.
    return (variant, epoch) if variant is not None else (None, 0)
