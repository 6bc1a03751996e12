"""``RedisStore``: shared rollout state for many hosts, in Redis (needs redis-py)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.commands.core import Script
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - the redis extra is not installed
    raise ImportError(
        "RedisStore needs redis-py, which is not installed; install the extra: pip install 'canarymw[redis]'."
    ) from exc

from .._runtime import reset_after_fork
from ._model import (
    HISTORY,
    PROCESS_KEEP,
    RETENTION,
    WINDOW,
    Assignment,
    Change,
    Counts,
    Lease,
    ProcessReport,
    RolloutState,
    StoreUnavailable,
    check_assignment,
    check_fence,
    check_holder,
    check_name,
    check_report,
    check_ttl,
    check_write,
    conflict,
    lease_lost,
    user_digest,
)

__all__ = ["RedisStore"]

T = TypeVar("T")

_HISTORY = HISTORY  # a module attribute, so a test can lower it
"""Audit entries kept per rollout (as MemoryStore)."""
_COUNTS_TTL = RETENTION
"""Seconds a counter window outlives its last addition."""
_RESUBSCRIBE_EVERY = 1.0
"""Seconds between attempts to (re)subscribe after the subscription broke or was refused."""
_HEALTH_CHECK_INTERVAL = 10
"""Seconds a connection of ours may sit idle before redis-py pings it before use."""
_Call = tuple[Script, list[str], list[Any]]  # a script call: script, keys, args
_COUNT_FIELDS = ("requests", "errors", "exceptions", "disconnects")
_compact_json = json.JSONEncoder(separators=(",", ":")).encode  # made once: json.dumps() makes one per call

# KEYS[1] a counter hash, KEYS[2] its rollout's set of windows. ARGV: the integer fields to
# add (JSON), the latency sum to add, the window's member and start, the TTL in seconds.
_ADD_LUA = """
for field, n in pairs(cjson.decode(ARGV[1])) do
    redis.call('HINCRBY', KEYS[1], field, n)
end
if tonumber(ARGV[2]) ~= 0 then
    redis.call('HINCRBYFLOAT', KEYS[1], 'latency_sum', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[4]) - tonumber(ARGV[5])))
redis.call('EXPIRE', KEYS[2], ARGV[5])
"""

# The compare-and-set, after a line that sets ``names_key`` (the set of names; nil on a
# cluster). KEYS[1] the state hash, KEYS[2] the audit list. ARGV: expected version, new
# version, state JSON, change JSON, rollout name, channel, notification payload, audit
# entries kept. Returns {1, new version} once written, {0, the version held} on a conflict.
_CAS_BODY = """
local have = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
if have ~= tonumber(ARGV[1]) then
  return {0, have}
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'json', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[8]), -1)
if names_key then
  redis.call('SADD', names_key, ARGV[5])
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {1, tonumber(ARGV[2])}
"""

_CAS_LUA = "local names_key = KEYS[3]\n" + _CAS_BODY

# Every lease script reads the clock of the server that holds the lease, never a host's.
# Calling TIME before a write needs effects replication: the default from Redis 5 on,
# asked for explicitly in case a server was configured otherwise.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The lease hash (never expires, so its token outlives every holder): ``holder`` (absent
# once released), ``token``, ``until`` (server time in ms). After this, ``holder`` is the
# holder of the unexpired lease, or false.
_HELD = """
local held = redis.call('HMGET', KEY_LEASE, 'holder', 'token', 'until')
local holder = held[1]
if holder and (tonumber(held[3]) or 0) <= now then
  holder = false
end
"""

# KEYS[1] the lease hash. ARGV: holder, TTL in ms. Returns the token, or false while
# another holder's lease is unexpired. A new token is at least the server time in ms, so
# tokens keep growing even if Redis lost the hash (a restart without persistence, a
# failover to a replica that lagged): a plain counter would give an old token again.
_LEASE_LUA = (
    "local KEY_LEASE = KEYS[1]\n"
    + _NOW
    + _HELD
    + """
local expires = string.format('%d', now + tonumber(ARGV[2]))
if holder then
  if holder ~= ARGV[1] then
    return false
  end
  redis.call('HSET', KEY_LEASE, 'until', expires)
  return tonumber(held[2])
end
local token = math.max((tonumber(held[2]) or 0) + 1, now)
redis.call('HSET', KEY_LEASE, 'holder', ARGV[1], 'token', string.format('%d', token), 'until', expires)
return token
"""
)

# KEYS[1] the lease hash. ARGV: holder. Keeps the token for the next holder.
_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'holder')
  redis.call('HSET', KEYS[1], 'until', '0')
end
return 0
"""

# KEYS[1] the lease hash. Returns {holder, token, ms left} of the unexpired lease, or false.
_LEASE_INFO_LUA = (
    "local KEY_LEASE = KEYS[1]\n"
    + _NOW
    + _HELD
    + """
if not holder then
  return false
end
return {holder, held[2], tonumber(held[3]) - now}
"""
)

# A compare-and-set that also needs the lease: KEYS[1] state, KEYS[2] log, KEYS[3] the
# lease hash, KEYS[4] (absent on a cluster) the set of names; ARGV as _CAS_LUA, then the
# fence token. Returns {-1, the token of the unexpired lease, or 0} if the fence is stale.
# The fence is compared as text: as a Lua number, a wrong one could round to the token.
_FENCED_CAS_LUA = (
    "local KEY_LEASE = KEYS[3]\nlocal names_key = KEYS[4]\n"
    + _NOW
    + _HELD
    + """
if not holder then
  return {-1, 0}
end
if held[2] ~= ARGV[9] then
  return {-1, tonumber(held[2])}
end
"""
    + _CAS_BODY
)

# KEYS[1] the ledger hash (process id -> report JSON), KEYS[2] its sorted set (process id by
# the time of its last report). ARGV: process id, report JSON, its time, the oldest time
# kept, the TTL in seconds. Drops at most 100 silent entries per call (an index range,
# usually empty); both keys expire once no process has reported for the TTL.
_REPORT_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4], 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return #old
"""

_MAX_TTL = 1e9
"""Seconds (about 30 years): a longer ``ttl`` is cut to it, so the scripts' ms stay exact."""


@dataclass(frozen=True)
class _Scripts:
    """The Lua scripts, registered with one client (computed locally; loaded on first use)."""

    cas: Script
    fenced_cas: Script
    lease: Script
    release: Script
    lease_info: Script
    report: Script
    add: Script

    @classmethod
    def register(cls, client: redis.Redis | RedisCluster) -> _Scripts:
        return cls(
            client.register_script(_CAS_LUA),
            client.register_script(_FENCED_CAS_LUA),
            client.register_script(_LEASE_LUA),
            client.register_script(_RELEASE_LUA),
            client.register_script(_LEASE_INFO_LUA),
            client.register_script(_REPORT_LUA),
            client.register_script(_ADD_LUA),
        )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Rollout state, audit log and outcome counters in Redis, shared by every host.

    For apps served by many hosts: every process of every host reads the same state,
    operators change it from anywhere (compare-and-set on the version, in a Lua script,
    so two operators never overwrite each other) and every change reaches every process
    within moments. Needs redis-py (``pip install 'canarymw[redis]'``) and Redis 5 or later.

    Parameters:

    ``url_or_client``
        A URL, ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
        ``unix:///path/to/redis.sock?db=0``; any redis-py query option works
        (``?ssl_ca_certs=...``), and ``?prefix=...`` sets the key prefix (it wins over
        ``prefix``). Or a redis-py client you made: ``redis.Redis``, a Sentinel master
        client (``Sentinel(...).master_for("mymaster")``) or ``redis.cluster.RedisCluster``.
    ``prefix``
        Put before every key and the notification channel, so several apps (or test
        runs) share one Redis database without seeing each other's rollouts.
    ``connect_timeout``, ``timeout``
        Seconds to connect, and to wait for an answer, on the clients this store makes
        (redis-py waits 5 s by default and retries 10 times; this store does not retry:
        its callers keep the last state and try again). A client you pass in keeps its
        own timeouts and retries.

    Keys, per rollout ``NAME``: ``PREFIX{NAME}:state`` (a hash: ``version`` and ``json``),
    ``PREFIX{NAME}:log`` (the newest 1000 audit entries, JSON), ``PREFIX{NAME}:c:WINDOW:VARIANT``
    (a hash of counters and latency buckets ``b:INDEX``, expiring 8 days after its last
    addition), ``PREFIX{NAME}:windows`` (a sorted set of those windows) and
    ``PREFIX{NAME}:lease`` (the controller lease, a hash: ``holder``, absent once released;
    ``token``; ``until``, the Redis server's time in ms when it expires; the hash never
    expires, so the token keeps growing across holders). Shared by all: ``PREFIXnames``
    (the set of rollout names), and the ledger of the processes that add counters,
    ``PREFIX{ledger}:processes`` (a hash: process id -> its ``ProcessReport``, JSON) and
    ``PREFIX{ledger}:at`` (a sorted set: process id by the time of its last report, by the
    reporter's clock; entries silent for a day go as others report, and both keys expire
    a day after the last report). Every change is published on the channel ``PREFIXchanges`` as JSON
    ``{"rollout": NAME, "version": N}``.

    Leases: taken, renewed, released and checked by Lua scripts on the server that holds
    the rollout's keys, by that server's clock (``TIME``), so the hosts' clocks do not
    matter. A fenced :meth:`write` checks the lease in its compare-and-set script (the
    lease key carries the same hash tag, so this holds on a cluster too). A new token is
    at least the server's time in milliseconds: it still grows if Redis lost the lease
    (a restart without persistence, a failover to a replica that lagged), where a plain
    counter would hand an old token out again.

    How changes propagate: :meth:`wait` subscribes to the channel (its own connection,
    made on the first call, which returns True at once so the caller reads what it may
    have missed) and returns as soon as a notification arrives. If the subscription
    breaks, it falls back to polling (returns True after at most its timeout, so the
    caller reads again) and subscribes again a second later; a wait that cannot reach
    Redis at all raises :class:`StoreUnavailable`.

    Sentinel: pass ``sentinel.master_for(name, socket_timeout=..., socket_connect_timeout=...)``;
    after a failover the next call finds the new master (calls during it raise
    :class:`StoreUnavailable`; a notification published during it is caught up by the
    re-read that follows a broken subscription). Cluster: every key of one rollout
    carries the hash tag ``{NAME}``, so a write is still one atomic script on one node;
    only adding the name to ``PREFIXnames`` happens just after it, outside the script
    (a write that fails between the two leaves the rollout out of :meth:`names` until
    its next write). Counter additions on a cluster are atomic per rollout, not per call.
    The two ledger keys share the hash tag ``{ledger}``: a report is one script on one node.
    A prefix holding a hash tag of its own (``app{x}:``) puts every key in one slot.

    Every Redis error (unreachable, too slow, authentication, a server that refuses a
    command) is raised as :class:`StoreUnavailable`, naming the server but never the
    password. :meth:`close` closes the subscription and the connections of a client the
    store made (never a client you passed in); the store reconnects when used again,
    and a forked child makes its own connections.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis | RedisCluster,
        *,
        prefix: str = "canarymw:",
        connect_timeout: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        self._lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self._url: str | None = None
        self._client_kwargs: dict[str, Any] = {}
        self._secrets: list[str] = []
        if isinstance(url_or_client, str):
            url, url_prefix, secrets = _split_url(url_or_client)
            self._url = url
            self._secrets = secrets
            self._client_kwargs = {
                "socket_connect_timeout": connect_timeout,
                "socket_timeout": timeout,
                "health_check_interval": _HEALTH_CHECK_INTERVAL,
                "retry": Retry(NoBackoff(), 0),
            }
            if url_prefix is not None:
                prefix = url_prefix
            client: redis.Redis | RedisCluster = self._make_client()
            self._owned = True
            self._where = _url_where(url_or_client)
        elif isinstance(url_or_client, redis.Redis | RedisCluster):
            client = url_or_client
            self._owned = False
            self._where, secret = _client_where(client)
            if secret:
                self._secrets.append(secret)
        else:
            raise TypeError(
                f"RedisStore needs a redis:// URL or a redis-py client, not {type(url_or_client).__name__}."
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, not {type(prefix).__name__}.")
        self.prefix = prefix
        self._timeout = timeout
        self._cluster = isinstance(client, RedisCluster)
        self._client: redis.Redis | RedisCluster | None = client
        self._scripts: _Scripts | None = None
        self._pubsub: Any = None  # redis.client.PubSub, or ClusterPubSub
        self._subscribe_after = 0.0  # monotonic time of the next attempt to subscribe
        self._names_key = f"{prefix}names"
        self._channel = f"{prefix}changes"
        # One hash tag for both, so the report script runs on one node of a cluster.
        self._ledger_key = f"{prefix}{{ledger}}:processes"
        self._ledger_at_key = f"{prefix}{{ledger}}:at"
        reset_after_fork(self, RedisStore._after_fork)

    def __repr__(self) -> str:
        return f"RedisStore({self._where}, prefix={self.prefix!r})"

    # -- connections ----------------------------------------------------------------------

    def _make_client(self) -> redis.Redis:
        assert self._url is not None
        return redis.Redis.from_url(self._url, **self._client_kwargs)

    def _conn(self) -> tuple[redis.Redis | RedisCluster, _Scripts]:
        with self._lock:
            client = self._client
            if client is None:
                client = self._client = self._make_client()
                self._scripts = None
            scripts = self._scripts
            if scripts is None:
                scripts = self._scripts = _Scripts.register(client)
            return client, scripts

    def _after_fork(self) -> None:
        # In a child: new locks (another thread of the parent may have held ours), no
        # subscription (its socket is the parent's), and a client of our own is made anew.
        self._lock = threading.Lock()
        self._wait_lock = threading.Lock()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            pubsub.connection = None  # let it go without touching the parent's pool
        self._subscribe_after = 0.0
        if self._owned:
            self._client = None
            self._scripts = None

    def close(self) -> None:
        """Close the subscription, and the connections of a client this store made."""
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
            client = self._client if self._owned else None
            if self._owned:
                self._client = None
                self._scripts = None
        self._subscribe_after = 0.0
        # A subscription in use by wait() is closed by wait() when it returns (closing a
        # pool wakes it): closing it under its feet would let redis-py reconnect it.
        if self._wait_lock.acquire(blocking=False):
            try:
                _close_quietly(pubsub)
            finally:
                self._wait_lock.release()
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def _unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        cause = str(exc).strip() or type(exc).__name__
        for secret in self._secrets:
            cause = cause.replace(secret, "***")
        return StoreUnavailable(f"cannot {doing} on Redis at {self._where}: {cause.rstrip('.')}.")

    def _call(self, doing: str, fn: Callable[[redis.Redis | RedisCluster], T]) -> T:
        client, _ = self._conn()
        try:
            return fn(client)
        except (RedisError, OSError) as exc:
            raise self._unavailable(doing, exc) from exc

    # -- keys -----------------------------------------------------------------------------

    def _key(self, name: str, what: str) -> str:
        return f"{self.prefix}{{{name}}}:{what}"

    # -- state ----------------------------------------------------------------------------

    def read(self, names: list[str]) -> dict[str, RolloutState]:
        if not names:
            return {}

        def run(client: redis.Redis | RedisCluster) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.hget(self._key(name, "state"), "json")
            return cast(list[Any], pipe.execute())

        found = self._call("read rollout state", run)
        return {
            name: RolloutState.from_json(raw)
            for name, raw in zip(names, found, strict=True)
            if raw is not None
        }

    def write(
        self, name: str, expected_version: int, state: RolloutState, change: Change, fence: int | None = None
    ) -> None:
        """Store ``state`` and log ``change`` if the version is still ``expected_version``
        (and, with ``fence``, the lease still carries that token), in one script; see
        :class:`Store`."""
        check_write(name, expected_version, state, change)
        check_fence(fence)
        client, scripts = self._conn()
        keys = [self._key(name, "state"), self._key(name, "log")]
        if fence is not None:
            keys.append(self._key(name, "lease"))
        if not self._cluster:
            keys.append(self._names_key)
        note = json.dumps({"rollout": name, "version": state.version}, separators=(",", ":"))
        args: list[str | int | float] = [
            expected_version,
            state.version,
            state.to_json(),
            change.to_json(),
            name,
            self._channel,
            note,
            _HISTORY,
        ]
        script = scripts.cas
        if fence is not None:
            args.append(str(fence))
            script = scripts.fenced_cas
        try:
            done, have = cast(list[int], script(keys=keys, args=args, client=client))
            if done == 1 and self._cluster:
                client.sadd(self._names_key, name)
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"write rollout {name!r}", exc) from exc
        if done == -1:
            assert fence is not None
            raise lease_lost(name, int(have) or None, fence)
        if not done:
            raise conflict(name, int(have), expected_version)

    def claim(self, name: str, user: str, assignment: Assignment, ttl: float) -> Assignment:
        """Keep ``assignment`` for ``user`` unless an unexpired one is held; the one kept.
        One MULTI/EXEC on one key: set if absent, read, and extend the expiry (by the
        server's clock). See :class:`Store`."""
        check_name(name)
        check_assignment(assignment)
        ms = max(1, math.ceil(min(check_ttl(ttl), _MAX_TTL) * 1000))
        key = self._key(name, "user:" + user_digest(user))

        def run(client: redis.Redis | RedisCluster) -> Assignment:
            pipe = client.pipeline(transaction=True)
            pipe.set(key, assignment.to_json(), nx=True, px=ms)
            pipe.get(key)
            pipe.pexpire(key, ms)
            kept = pipe.execute()[1]
            return assignment if kept is None else Assignment.from_json(kept)

        return self._call(f"claim a user of rollout {name!r}", run)

    def remember(self, name: str, user: str, assignment: Assignment, ttl: float) -> None:
        """Replace ``user``'s assignment for ``ttl`` seconds. See :class:`Store`."""
        check_name(name)
        check_assignment(assignment)
        ms = max(1, math.ceil(min(check_ttl(ttl), _MAX_TTL) * 1000))
        key = self._key(name, "user:" + user_digest(user))
        self._call(f"remember a user of rollout {name!r}", lambda c: c.set(key, assignment.to_json(), px=ms))

    def lease(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the controller lease of ``name`` for ``ttl`` seconds; the fencing
        token, or None while another holder's lease is unexpired. See :class:`Store`.

        Expiry is by the Redis server's clock, so the hosts' clocks do not matter. A new
        token is at least the server's time in milliseconds (see the class docstring)."""
        check_name(name)
        check_holder(holder)
        ms = max(1, math.ceil(min(check_ttl(ttl), _MAX_TTL) * 1000))
        key = self._key(name, "lease")
        client, scripts = self._conn()
        try:
            token = scripts.lease(keys=[key], args=[holder, ms], client=client)
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"take the controller lease of rollout {name!r}", exc) from exc
        return None if token is None else int(token)

    def release(self, name: str, holder: str) -> None:
        """Give up ``holder``'s lease of ``name`` now (nothing if it holds none)."""
        check_name(name)
        check_holder(holder)
        key = self._key(name, "lease")
        client, scripts = self._conn()
        try:
            scripts.release(keys=[key], args=[holder], client=client)
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"release the controller lease of rollout {name!r}", exc) from exc

    def lease_info(self, name: str) -> Lease | None:
        """Who holds the unexpired lease of ``name``, its token and seconds left; or None."""
        check_name(name)
        key = self._key(name, "lease")
        client, scripts = self._conn()
        try:
            found = scripts.lease_info(keys=[key], args=[], client=client)
        except (RedisError, OSError) as exc:
            raise self._unavailable(f"read the controller lease of rollout {name!r}", exc) from exc
        if found is None:
            return None
        holder, token, left_ms = cast(list[Any], found)
        return Lease(_text(holder), int(_text(token)), int(left_ms) / 1000)

    def history(self, name: str, limit: int = 50) -> list[Change]:
        if limit <= 0:
            return []
        key = self._key(name, "log")
        entries = self._call(
            f"read the audit log of rollout {name!r}",
            lambda client: cast(list[Any], client.lrange(key, -limit, -1)),
        )
        return [Change.from_json(entry) for entry in entries]

    def names(self) -> list[str]:
        members = self._call("list rollouts", lambda client: cast(set[Any], client.smembers(self._names_key)))
        return sorted(_text(m) for m in members)

    # -- changes --------------------------------------------------------------------------

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._wait_lock:
            pubsub = self._pubsub
            if pubsub is None:
                if time.monotonic() < self._subscribe_after:
                    return self._poll(deadline)  # the subscription broke a moment ago
                if self._subscribe(raise_unavailable=True):
                    return True  # a change may have been missed while not subscribed
                return self._poll(deadline)
            try:
                got = self._listen(pubsub, deadline)
            except Exception:  # whatever broke the subscription, wait() must not raise
                if self._pubsub is not pubsub:
                    _close_quietly(pubsub)
                    return True  # close() was called meanwhile: the next call subscribes again
                self._drop_pubsub(pubsub)
                return self._poll(deadline)
            if self._pubsub is not pubsub:
                _close_quietly(pubsub)
                return True
            return got

    def _subscribe(self, *, raise_unavailable: bool) -> bool:
        """Subscribe to the changes channel and see the subscription confirmed; True if done.

        A Redis that cannot be reached raises :class:`StoreUnavailable` if asked to; any
        other failure (a server or proxy refusing pub/sub) means polling for a while.
        """
        self._subscribe_after = time.monotonic() + _RESUBSCRIBE_EVERY
        client, _ = self._conn()
        pubsub: Any = None
        try:
            pubsub = client.pubsub()
            pubsub.subscribe(self._channel)
            # Wait for the confirmation: only then is a change published after our return
            # sure to reach us (the caller reads next, on another connection).
            confirm_by = time.monotonic() + self._timeout
            while True:
                left = confirm_by - time.monotonic()
                if left <= 0:
                    raise RedisTimeoutError("the subscription to changes was not confirmed in time")
                message = pubsub.get_message(timeout=left)
                if message is not None and message.get("type") == "subscribe":
                    break
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            _close_quietly(pubsub)
            if raise_unavailable:
                raise self._unavailable("subscribe to rollout changes", exc) from exc
            return False
        except Exception:
            _close_quietly(pubsub)
            return False
        with self._lock:
            self._pubsub = pubsub
        self._subscribe_after = 0.0
        return True

    def _listen(self, pubsub: Any, deadline: float) -> bool:
        got = False
        while not got:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if getattr(pubsub, "health_check_response_counter", 0) > 1:
                # Two pings unanswered for a health-check interval: a half-open connection
                # (a host gone without a word) that TCP would take many minutes to notice.
                raise RedisConnectionError("the subscription stopped answering health checks")
            message = pubsub.get_message(timeout=min(left, _HEALTH_CHECK_INTERVAL))
            # None: nothing in time, or a health-check answer: keep waiting until the deadline
            got = message is not None and message.get("type") == "message"
        if got:
            while pubsub.get_message(timeout=0) is not None:
                pass  # drain: one read catches up with all of them
        return got

    def _poll(self, deadline: float) -> bool:
        # No subscription: come back True by the deadline so the caller reads again,
        # earlier if a new subscription takes (it may have missed a change too).
        while True:
            now = time.monotonic()
            if now >= deadline:
                return True
            if now >= self._subscribe_after and self._subscribe(raise_unavailable=False):
                return True
            time.sleep(max(0.0, min(deadline, self._subscribe_after) - time.monotonic()))

    def _drop_pubsub(self, pubsub: Any) -> None:
        with self._lock:
            if self._pubsub is pubsub:
                self._pubsub = None
        self._subscribe_after = time.monotonic() + _RESUBSCRIBE_EVERY
        _close_quietly(pubsub)

    # -- counters -------------------------------------------------------------------------

    def add_counts(self, counts: list[Counts], report: ProcessReport | None = None) -> bool:
        """Add the counters (one script call per counter) and, with ``report``, keep it in
        the ledger: one MULTI/EXEC, one round trip. See :class:`Store`."""
        if report is not None:
            check_report(report)
        if not counts:
            if report is not None:
                self.report_process(report)
            return True
        client, scripts = self._conn()
        adds: list[_Call] = [(scripts.add, *self._add_call(c)) for c in counts]
        ledger: _Call | None = None if report is None else (scripts.report, *self._report_call(report))
        try:
            if self._cluster:  # a counter's keys share its rollout's hash slot, not the ledger's
                return self._add_on_cluster(client, adds, ledger)
            results = _evalsha_all(client, adds if ledger is None else [*adds, ledger])
        except (RedisError, OSError) as exc:
            raise self._unavailable("add outcome counters", exc) from exc
        failed = [r for r in results[: len(adds)] if isinstance(r, Exception)]
        if failed:
            raise self._unavailable("add outcome counters", failed[0])
        return ledger is None or not isinstance(results[-1], Exception)

    def _add_on_cluster(
        self, client: redis.Redis | RedisCluster, adds: list[_Call], ledger: _Call | None
    ) -> bool:
        client.script_load(_ADD_LUA)  # a cluster pipeline does not load scripts itself
        pipe = client.pipeline(transaction=False)
        for script, keys, args in adds:
            script(keys=keys, args=args, client=pipe)
        pipe.execute()
        if ledger is None:
            return True
        script, keys, args = ledger
        try:
            script(keys=keys, args=args, client=client)
        except (RedisError, OSError):
            return False  # the counters are in: the caller sends the report again
        return True

    def _add_call(self, c: Counts) -> tuple[list[str], list[Any]]:
        fields = {f: int(getattr(c, f)) for f in _COUNT_FIELDS if getattr(c, f)}
        fields.update({f"b:{int(i)}": int(n) for i, n in c.buckets.items() if n})
        keys = [self._key(c.rollout, f"c:{int(c.window)}:{c.variant}"), self._key(c.rollout, "windows")]
        args: list[Any] = [
            _compact_json(fields),
            repr(float(c.latency_sum)),
            f"{int(c.window)}:{c.variant}",
            int(c.window),
            _COUNTS_TTL,
        ]
        return keys, args

    def _report_call(self, report: ProcessReport) -> tuple[list[str], list[Any]]:
        args: list[Any] = [
            report.process,
            report.to_json(),
            repr(float(report.last_flush_at)),
            repr(time.time() - PROCESS_KEEP),
            PROCESS_KEEP,
        ]
        return [self._ledger_key, self._ledger_at_key], args

    def read_counts(self, names: list[str], since: float) -> list[Counts]:
        if not names:
            return []

        def run(client: redis.Redis | RedisCluster) -> list[Counts]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.zrangebyscore(self._key(name, "windows"), f"({since - WINDOW!r}", "+inf")
            found = cast(list[list[Any]], pipe.execute())
            wanted: list[tuple[str, str, int, str]] = []
            for name, members in zip(names, found, strict=True):
                for member in members:
                    start, _, variant = _text(member).partition(":")
                    wanted.append((name, variant, int(start), _text(member)))
            if not wanted:
                return []
            pipe = client.pipeline(transaction=False)
            for name, variant, window, _member in wanted:
                pipe.hgetall(self._key(name, f"c:{window}:{variant}"))
            held = cast(list[Mapping[Any, Any]], pipe.execute())
            out: list[Counts] = []
            gone: list[tuple[str, str]] = []
            for (name, variant, window, member), fields in zip(wanted, held, strict=True):
                if not fields:
                    gone.append((name, member))  # expired: forget the window too
                    continue
                out.append(_counts(name, variant, window, fields))
            if gone:
                pipe = client.pipeline(transaction=False)
                for name, member in gone:
                    pipe.zrem(self._key(name, "windows"), member)
                pipe.execute()
            return out

        got = self._call("read outcome counters", run)
        return sorted(got, key=lambda c: (c.rollout, c.variant, c.window))

    # -- the ledger of processes ----------------------------------------------------------

    def report_process(self, report: ProcessReport) -> None:
        """Keep ``report`` as its process's ledger entry and drop entries silent for more
        than :data:`PROCESS_KEEP` seconds, in one script (one round trip). See :class:`Store`."""
        check_report(report)
        client, scripts = self._conn()
        keys, args = self._report_call(report)
        try:
            scripts.report(keys=keys, args=args, client=client)
        except (RedisError, OSError) as exc:
            raise self._unavailable("report a process to the ledger", exc) from exc

    def processes(self, since: float = 0.0) -> list[ProcessReport]:
        def run(client: redis.Redis | RedisCluster) -> list[Any]:
            ids = cast(list[Any], client.zrangebyscore(self._ledger_at_key, repr(float(since)), "+inf"))
            if not ids:
                return []
            return cast(list[Any], client.hmget(self._ledger_key, ids))

        found = self._call("read the ledger of processes", run)
        reports = [ProcessReport.from_json(raw) for raw in found if raw is not None]
        return sorted((r for r in reports if r.last_flush_at >= since), key=lambda r: r.process)


def _evalsha_all(client: redis.Redis | RedisCluster, calls: list[_Call]) -> list[Any]:
    """Run the script calls in one MULTI/EXEC; each one's result or error. A script the
    server does not hold (a restart, SCRIPT FLUSH) fails alone without running: it is
    loaded and only the calls that failed so run again, so nothing is applied twice."""
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        pipe = client.pipeline(transaction=True)
        for i in todo:
            script, keys, args = calls[i]
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        missing = []
        for i, got in zip(todo, pipe.execute(raise_on_error=False), strict=True):
            results[i] = got
            if isinstance(got, NoScriptError):
                missing.append(i)
        if not missing or attempt:
            break
        for script in {calls[i][0] for i in missing}:
            client.script_load(script.script)
        todo = missing
    return results


def _counts(name: str, variant: str, window: int, fields: Mapping[Any, Any]) -> Counts:
    c = Counts(name, variant, window)
    for raw_key, raw_value in fields.items():
        key, value = _text(raw_key), _text(raw_value)
        if key.startswith("b:"):
            c.buckets[int(key[2:])] = int(value)
        elif key == "latency_sum":
            c.latency_sum = float(value)
        elif key in _COUNT_FIELDS:
            setattr(c, key, int(value))
    return c


def _close_quietly(pubsub: Any) -> None:
    if pubsub is not None:
        try:
            pubsub.close()
        except Exception:
            pass


def _split_url(url: str) -> tuple[str, str | None, list[str]]:
    """The URL for redis-py without ``prefix`` in its query, that prefix, and its secrets."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = None
    rest = []
    secrets = []
    for key, value in query:
        if key == "prefix":
            prefix = value
        else:
            rest.append((key, value))
            if key in ("password", "ssl_password") and value:
                secrets.append(value)
    if parts.password:
        secrets.extend({parts.password, unquote(parts.password)})
    base = url.partition("?")[0]  # as written: urlunsplit would drop unix://'s empty host
    return (f"{base}?{urlencode(rest)}" if rest else base), prefix, secrets


def _url_where(url: str) -> str:
    """Where a URL points, for messages: ``redis://host:port/db``, never a password."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return f"unix://{parts.path}"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    db = parts.path.lstrip("/") or "0"
    for key, value in parse_qsl(parts.query):
        if key == "db":
            db = value
    return f"{scheme}://{host}:{port}/{db}"


def _client_where(client: redis.Redis | RedisCluster) -> tuple[str, str | None]:
    """Where a client points, for messages, and its password (to keep out of them)."""
    if isinstance(client, RedisCluster):
        try:
            node = client.get_default_node()  # type: ignore[no-untyped-call]
            return f"cluster {node.name}" if node is not None else "cluster", None
        except Exception:
            return "cluster", None
    pool = client.connection_pool
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}))
    secret = kwargs.get("password")
    secret = secret if isinstance(secret, str) and secret else None
    service = getattr(pool, "service_name", None)
    if service is not None:
        return f"sentinel service {service!r}", secret
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}", secret
    host = kwargs.get("host", "localhost")
    scheme = "rediss" if "ssl" in type(pool.connection_class).__name__.lower() else "redis"
    return f"{scheme}://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}", secret
