"""Tests for relay.auth: argon2 verification, per-client lockout, the login cache."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import argon2

from config.models import AccountConfig
from relay.auth import Authenticator, hash_password
from tests.conftest import PASSWORD, PASSWORD_HASH

CLIENT = "192.0.2.10"
OTHER_CLIENT = "192.0.2.99"


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self._mono = 1000.0
        self._start = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._mono - 1000.0)

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._mono += seconds


def make_auth(
    accounts: Mapping[str, AccountConfig] | None = None,
    *,
    clock: FakeClock | None = None,
    max_failures: int = 3,
    window: float = 600.0,
    lockout: float = 900.0,
) -> Authenticator:
    if accounts is None:
        accounts = {"acme": AccountConfig(password_hash=PASSWORD_HASH)}
    return Authenticator(
        accounts,
        clock=clock or FakeClock(),
        max_failures=max_failures,
        failure_window_seconds=window,
        lockout_seconds=lockout,
    )


async def test_right_password() -> None:
    auth = make_auth()
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) == "acme"
    assert auth.lockout_remaining(CLIENT) == 0.0


async def test_wrong_password() -> None:
    auth = make_auth()
    assert await auth.verify("acme", b"wrong", CLIENT) is None
    assert await auth.verify("acme", b"", CLIENT) is None


async def test_unknown_user() -> None:
    auth = make_auth()
    assert await auth.verify("nobody", PASSWORD.encode(), CLIENT) is None
    assert await auth.verify("ACME", PASSWORD.encode(), CLIENT) is None


async def test_disabled_account() -> None:
    auth = make_auth(
        {"acme": AccountConfig(password_hash=PASSWORD_HASH, enabled=False)}
    )
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) is None


async def test_several_accounts() -> None:
    auth = make_auth(
        {
            "acme": AccountConfig(password_hash=PASSWORD_HASH),
            "beta": AccountConfig(password_hash=hash_password("beta-pw")),
        }
    )
    assert await auth.verify("beta", b"beta-pw", CLIENT) == "beta"
    assert await auth.verify("acme", b"beta-pw", CLIENT) is None
    assert await auth.verify("beta", PASSWORD.encode(), CLIENT) is None


def test_hash_password_is_argon2id() -> None:
    hashed = hash_password("s3cret")
    assert hashed.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(hashed, "s3cret")


async def test_lockout_after_max_failures() -> None:
    auth = make_auth(max_failures=3, lockout=900.0)
    for _ in range(2):
        assert await auth.verify("acme", b"wrong", CLIENT) is None
        assert auth.lockout_remaining(CLIENT) == 0.0
    assert await auth.verify("nobody", b"wrong", CLIENT) is None  # unknown users count
    assert auth.lockout_remaining(CLIENT) == 900.0
    assert auth.lockout_remaining(OTHER_CLIENT) == 0.0
    assert await auth.verify("acme", PASSWORD.encode(), OTHER_CLIENT) == "acme"


async def test_lockout_expires() -> None:
    clock = FakeClock()
    auth = make_auth(clock=clock, max_failures=2, lockout=900.0)
    for _ in range(2):
        await auth.verify("acme", b"wrong", CLIENT)
    assert auth.lockout_remaining(CLIENT) == 900.0
    clock.advance(600.0)
    assert auth.lockout_remaining(CLIENT) == 300.0
    clock.advance(299.0)
    assert auth.lockout_remaining(CLIENT) == 1.0
    clock.advance(1.0)
    assert auth.lockout_remaining(CLIENT) == 0.0
    clock.advance(3600.0)
    assert auth.lockout_remaining(CLIENT) == 0.0


async def test_failures_outside_window_do_not_lock() -> None:
    clock = FakeClock()
    auth = make_auth(clock=clock, max_failures=3, window=60.0)
    for _ in range(5):
        await auth.verify("acme", b"wrong", CLIENT)
        clock.advance(61.0)
    assert auth.lockout_remaining(CLIENT) == 0.0


async def test_success_clears_failures() -> None:
    auth = make_auth(max_failures=3)
    for _ in range(2):
        await auth.verify("acme", b"wrong", CLIENT)
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) == "acme"
    for _ in range(2):
        await auth.verify("acme", b"wrong", CLIENT)
    assert auth.lockout_remaining(CLIENT) == 0.0


async def test_second_login_served_from_cache() -> None:
    auth = make_auth()
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) == "acme"

    async def no_hash_check(stored: str, password: bytes) -> bool:
        raise AssertionError("the cached login must not reach the hash check")

    auth._check = no_hash_check  # type: ignore[method-assign]
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) == "acme"
    assert await auth.verify("acme", PASSWORD.encode(), OTHER_CLIENT) == "acme"


async def test_cached_user_with_other_password_goes_to_hash_check() -> None:
    auth = make_auth()
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) == "acme"
    real_check = auth._check
    checked: list[bytes] = []

    async def recording_check(stored: str, password: bytes) -> bool:
        checked.append(password)
        return await real_check(stored, password)

    auth._check = recording_check  # type: ignore[method-assign]
    assert await auth.verify("acme", b"not the password", CLIENT) is None
    assert checked == [b"not the password"]
    # The cache still serves the right password without a hash check.
    assert await auth.verify("acme", PASSWORD.encode(), CLIENT) == "acme"
    assert checked == [b"not the password"]
