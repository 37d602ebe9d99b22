"""Signed tokens: genuine ones verify, anything altered or foreign does not."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.list_unsubscribe import UNSUBSCRIBE, ListUnsubscribe
from relay.tokens import InvalidTokenError, TokenSigner

SECRET = "s" * 40
TODAY = date(2026, 11, 23)


def test_a_token_carries_its_fields() -> None:
    signer = TokenSigner(SECRET)
    token = signer.sign(UNSUBSCRIBE, ("acme", "jane@example.org", "Q1"), TODAY)
    assert signer.verify(UNSUBSCRIBE, token) == ("acme", "jane@example.org", "Q1")
    assert token.isascii() and "/" not in token and "+" not in token


def test_another_secret_or_purpose_is_refused() -> None:
    token = TokenSigner(SECRET).sign(UNSUBSCRIBE, ("acme", "j@x.example"), TODAY)
    with pytest.raises(InvalidTokenError, match="signature"):
        TokenSigner("t" * 40).verify(UNSUBSCRIBE, token)
    with pytest.raises(InvalidTokenError, match="purpose"):
        TokenSigner(SECRET).verify("verp", token)


def test_an_old_token_expires_when_asked() -> None:
    signer = TokenSigner(SECRET)
    token = signer.sign(UNSUBSCRIBE, ("acme",), TODAY)
    later = datetime(2027, 3, 1, tzinfo=UTC)
    assert signer.verify(UNSUBSCRIBE, token, now=later, max_age_days=365) == ("acme",)
    with pytest.raises(InvalidTokenError, match="expired"):
        signer.verify(UNSUBSCRIBE, token, now=later, max_age_days=30)


@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_altered_character_is_refused(position: int, delta: int) -> None:
    signer = TokenSigner(SECRET)
    token = signer.sign(UNSUBSCRIBE, ("acme", "jane@example.org", "Q1"), TODAY)
    index = position % len(token)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    replacement = alphabet[(alphabet.index(token[index]) + delta) % len(alphabet)]
    forged = token[:index] + replacement + token[index + 1 :]
    if forged == token:
        return
    with pytest.raises(InvalidTokenError):
        signer.verify(UNSUBSCRIBE, forged)


@given(st.text(max_size=300))
def test_junk_is_refused_without_crashing(junk: str) -> None:
    with pytest.raises(InvalidTokenError):
        TokenSigner(SECRET).verify(UNSUBSCRIBE, junk)


def test_list_unsubscribe_headers_carry_a_verifiable_token() -> None:
    stamper = ListUnsubscribe(
        TokenSigner(SECRET), "https://relay.example/", "unsub@relay.example"
    )
    lines = stamper.headers("acme", "jane@example.org", "Q1", TODAY).decode()
    first, second, post = lines.split("\r\n")[:3]
    assert first.startswith("List-Unsubscribe: <https://relay.example/unsubscribe/")
    assert second.startswith(" <mailto:unsub@relay.example?subject=unsubscribe%20")
    assert post == "List-Unsubscribe-Post: List-Unsubscribe=One-Click"
    token = first.split("/unsubscribe/")[1].rstrip(">,")
    assert TokenSigner(SECRET).verify(UNSUBSCRIBE, token) == (
        "acme",
        "jane@example.org",
        "Q1",
    )
