"""SMTP AUTH credentials: argon2id hashes per account, failure lockout, a login cache.

Verification runs in a worker thread (argon2 is CPU- and memory-hard by design) and
compares in constant time. A successful login is remembered as an HMAC of the
password under a per-process key, so a mailer that logs in on every connection pays
the hash once, not per session; the cache never holds a password.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from config.models import AccountConfig
from relay.clock import Clock

# ~20-40 ms on one core of the reference machine: OWASP's argon2id minimum
# (19 MiB, t=2, p=1). Verification cost follows the parameters stored in each hash.
_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
_MAX_TRACKED_CLIENTS = 10_000
_MAX_CONCURRENT_VERIFICATIONS = 4


def hash_password(password: str) -> str:
    """Return the argon2id hash to put in ``accounts.<name>.password_hash``."""
    return _HASHER.hash(password)


@dataclass(slots=True)
class _Failures:
    times: deque[float]
    locked_until: float = 0.0


class Authenticator:
    """Checks AUTH user names and passwords against the configured accounts."""

    def __init__(
        self,
        accounts: Mapping[str, AccountConfig],
        *,
        clock: Clock,
        max_failures: int,
        failure_window_seconds: float,
        lockout_seconds: float,
    ) -> None:
        self._accounts = dict(accounts)
        self._clock = clock
        self._max_failures = max_failures
        self._window = failure_window_seconds
        self._lockout = lockout_seconds
        self._failures: dict[str, _Failures] = {}
        self._cache_key = secrets.token_bytes(32)
        self._cache: dict[str, tuple[str, bytes]] = {}
        self._slots = asyncio.Semaphore(_MAX_CONCURRENT_VERIFICATIONS)
        self._pending: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        self._dummy_hash = _HASHER.hash(secrets.token_hex(16))

    def set_accounts(self, accounts: Mapping[str, AccountConfig]) -> None:
        """Use ``accounts`` from now on (a reload); cached logins are forgotten,
        so a changed or removed password takes effect at the next AUTH."""
        self._accounts = dict(accounts)
        self._cache.clear()

    def lockout_remaining(self, client: str) -> float:
        """Seconds ``client`` must still wait before trying again (0 if not locked)."""
        entry = self._failures.get(client)
        if entry is None:
            return 0.0
        return max(0.0, entry.locked_until - self._clock.monotonic())

    def _digest(self, password: bytes) -> bytes:
        return hmac.new(self._cache_key, password, hashlib.sha256).digest()

    async def verify(self, username: str, password: bytes, client: str) -> str | None:
        """Return the account name if the credentials are valid, else ``None``.

        Failures are counted per ``client`` (the peer IP); crossing the limit within
        the window locks the client out (see :meth:`lockout_remaining`).
        """
        account = self._accounts.get(username)
        stored = account.password_hash.get_secret_value() if account else None
        if account is not None and stored is not None and account.enabled:
            cached = self._cache.get(username)
            if (
                cached is not None
                and cached[0] == stored
                and hmac.compare_digest(cached[1], self._digest(password))
            ):
                self._failures.pop(client, None)
                return username
        ok = await self._check_once(username, stored or self._dummy_hash, password)
        if ok and account is not None and stored is not None and account.enabled:
            self._cache[username] = (stored, self._digest(password))
            self._failures.pop(client, None)
            return username
        self._record_failure(client)
        return None

    async def _check_once(self, username: str, stored: str, password: bytes) -> bool:
        """Verify, sharing one hash computation among identical concurrent logins.

        A mailer opening many sessions at once logs in on each with the same
        credentials; they wait for one verification instead of paying for each.
        """
        key = (username, self._digest(password))
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            ok = await self._check(stored, password)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters re-raise it themselves
            raise
        else:
            future.set_result(ok)
            return ok
        finally:
            del self._pending[key]

    async def _check(self, stored: str, password: bytes) -> bool:
        async with self._slots:
            return await asyncio.to_thread(_verify, stored, password)

    def _record_failure(self, client: str) -> None:
        now = self._clock.monotonic()
        entry = self._failures.get(client)
        if entry is None:
            if len(self._failures) >= _MAX_TRACKED_CLIENTS:
                # Forget the client whose last failure is oldest.
                oldest = min(self._failures, key=lambda k: self._failures[k].times[-1])
                del self._failures[oldest]
            entry = self._failures[client] = _Failures(deque())
        entry.times.append(now)
        while entry.times and entry.times[0] < now - self._window:
            entry.times.popleft()
        if len(entry.times) >= self._max_failures:
            entry.locked_until = now + self._lockout
            entry.times.clear()
            entry.times.append(now)


def _verify(stored: str, password: bytes) -> bool:
    try:
        return bool(_HASHER.verify(stored, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
