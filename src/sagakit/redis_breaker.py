"""A circuit breaker whose state lives in Redis, shared by every process of a service.

Same state machine as :class:`sagakit.CircuitBreaker` (see :mod:`sagakit.breaker`). Each circuit
is one Redis hash, ``<key_prefix><name>``, with the fields ``state`` (``closed``/``open``/
``half_open``), ``failures``, ``opened_at`` and ``trial_at`` (milliseconds of the Redis server's
clock). A missing hash is a closed circuit with no failures.

- Every transition is one Lua script, so it is atomic across processes: two processes cannot
  both take the half-open trial, and failures counted concurrently are all counted.
- Timing uses the Redis server's ``TIME``, never a local clock, so processes whose clocks
  disagree still agree on when a circuit may be tried again.
- It uses an async client (``redis.asyncio.Redis``); nothing blocks the event loop.

**Redis unreachable: fail-open.** When a Redis call fails (connection refused, timeout, any
``RedisError``/``OSError``) or takes longer than ``redis_timeout``, ``check`` lets the call
through as if the circuit were closed and ``record_*`` drop their update; each logs a warning on
the ``sagakit`` logger. A breaker exists to protect a service, not to add a point of failure:
with Redis down the primary step runs as it would without a breaker, and its own errors still
trigger the fallback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sagakit import settings
from sagakit.breaker import (
    CircuitOpenError,
    CircuitState,
    check_settings,
    exception_types,
)

__all__ = ["RedisCircuitBreaker"]

logger = logging.getLogger("sagakit")

# Redis >= 5 replicates a script's effects, so writing after TIME is allowed; on older servers
# replicate_commands() turns that on (it is a no-op from Redis 7 on).
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] circuit; ARGV[1] reset_timeout ms -> {allowed 0/1, state, wait ms}
_CHECK = _NOW + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return {1, 'closed', 0} end
local field = 'trial_at'
if state == 'open' then field = 'opened_at' end
local since = tonumber(redis.call('HGET', KEYS[1], field) or '0')
local wait = since + tonumber(ARGV[1]) - now
if wait > 0 then return {0, state, wait} end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'trial_at', now)
return {1, 'half_open', 0}
"""

# KEYS[1] circuit -> state after
_SUCCESS = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' then return 'open' end
if state then redis.call('DEL', KEYS[1]) end
return 'closed'
"""

# KEYS[1] circuit; ARGV[1] failure_threshold -> state after
_FAILURE = _NOW + """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' then return 'open' end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 'half_open' or failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  return 'open'
end
redis.call('HSET', KEYS[1], 'state', 'closed')
return 'closed'
"""

_UNREACHABLE = (RedisError, OSError, asyncio.TimeoutError)


class RedisCircuitBreaker:
    """A circuit breaker shared through Redis; pass an ``redis.asyncio.Redis`` client.

    ``failure_threshold``, ``reset_timeout`` and ``exclude`` mean what they mean for
    :class:`sagakit.CircuitBreaker`. Circuits are keyed ``key_prefix + name``: breakers of
    different services sharing one Redis need different prefixes. ``redis_timeout`` bounds each
    Redis call (None: the client's own timeouts only); past it the breaker fails open. The
    numbers are checked as :class:`sagakit.CircuitBreaker` checks them, and ``redis_timeout``
    is None or finite seconds > 0 (ValueError naming the option).
    """

    def __init__(
        self,
        redis_client: Redis,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        exclude: Iterable[type[BaseException]] | type[BaseException] = (),
        key_prefix: str = "sagakit:breaker:",
        *,
        redis_timeout: float | None = 2.0,
    ) -> None:
        self.reset_timeout = check_settings(failure_threshold, reset_timeout)
        self.redis_timeout = settings.seconds("redis_timeout", redis_timeout, exclusive=True,
                                              allow_none=True)
        self.redis = redis_client
        self.failure_threshold = failure_threshold
        self.exclude = exception_types(exclude, "exclude")
        self.key_prefix = key_prefix
        self._check = redis_client.register_script(_CHECK)
        self._success = redis_client.register_script(_SUCCESS)
        self._failure = redis_client.register_script(_FAILURE)

    def __repr__(self) -> str:
        return (f"RedisCircuitBreaker(failure_threshold={self.failure_threshold}, "
                f"reset_timeout={self.reset_timeout}, key_prefix={self.key_prefix!r})")

    def key(self, name: str) -> str:
        return self.key_prefix + name

    async def check(self, name: str) -> None:
        """Let the call through, or raise CircuitOpenError (see :meth:`CircuitBreaker.check`).
        Fails open: with Redis unreachable the call goes through."""
        timeout_ms = max(1, round(self.reset_timeout * 1000))
        try:
            reply = await self._call(self._check(keys=[self.key(name)], args=[timeout_ms]))
        except _UNREACHABLE as exc:
            self._unreachable("check", name, exc, "letting the call through (fail-open)")
            return
        allowed, state, wait_ms = reply
        if not int(allowed):
            raise CircuitOpenError.refusing(name, CircuitState(_text(state)), int(wait_ms) / 1000)

    async def record_success(self, name: str) -> None:
        try:
            await self._call(self._success(keys=[self.key(name)]))
        except _UNREACHABLE as exc:
            self._unreachable("record_success", name, exc, "success not recorded")

    async def record_failure(self, name: str, error: BaseException) -> None:
        if isinstance(error, self.exclude):
            await self.record_success(name)
            return
        try:
            await self._call(self._failure(keys=[self.key(name)], args=[self.failure_threshold]))
        except _UNREACHABLE as exc:
            self._unreachable("record_failure", name, exc, "failure not recorded")

    async def state(self, name: str) -> CircuitState:
        """The circuit's state as stored in Redis (an open circuit past its timeout stays OPEN
        until the next ``check`` makes it half-open). Raises the client's error when Redis is
        unreachable: this is an inspection call, not a guarded one."""
        value = await self._call(self.redis.hget(self.key(name), "state"))
        return CircuitState.CLOSED if value is None else CircuitState(_text(value))

    async def reset(self, name: str) -> None:
        """Close the circuit and forget its failures, for every process."""
        await self._call(self.redis.delete(self.key(name)))

    async def _call(self, awaitable: Any) -> Any:
        if self.redis_timeout is None:
            return await awaitable
        return await asyncio.wait_for(awaitable, self.redis_timeout)

    def _unreachable(self, what: str, name: str, exc: BaseException, outcome: str) -> None:
        logger.warning("circuit breaker %s for %r: Redis unreachable (%s: %s); %s",
                       what, name, type(exc).__name__, exc, outcome)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
