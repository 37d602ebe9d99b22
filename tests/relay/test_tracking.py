"""VERP return paths and ``X-Relay-Id`` tokens: genuine ones trace back to their
message, account and recipient; altered, foreign, misused or stale ones do not."""

from __future__ import annotations

import base64
import itertools
import string
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from relay.queue import new_queue_id
from relay.tracking import (
    HEADER,
    MAX_AGE_DAYS,
    Reference,
    TokenError,
    Tracker,
    _b32,
    message_id_key,
    trackable,
)
from storage.addresses import MAX_LOCAL_PART, AddressError, canonical_address
from storage.base import SentMessage

SECRET = "s" * 40
OTHER_SECRET = "t" * 40
BOUNCES = "bounces.relay.example"
TODAY = date(2026, 3, 1)
QUEUE_ID = "0195A3C4D5E6F7A8B"
ACCOUNT = "acme"
JANE = "jane@example.org"
BOB = "bob@example.net"
B32 = "abcdefghijklmnopqrstuvwxyz234567"


def tracker(secret: str = SECRET) -> Tracker:
    return Tracker(secret, BOUNCES)


def sent(
    queue_id: str = QUEUE_ID,
    account: str = ACCOUNT,
    recipients: tuple[str, ...] = (JANE, BOB),
) -> SentMessage:
    return SentMessage(
        queue_id=queue_id,
        account=account,
        message_id="<m1@acme.example>",
        recipients=recipients,
        received_at=datetime(2026, 3, 1, 12, tzinfo=UTC),
    )


def verp_token(
    recipient: str = JANE,
    *,
    queue_id: str = QUEUE_ID,
    account: str = ACCOUNT,
    today: date = TODAY,
    secret: str = SECRET,
) -> str:
    address = tracker(secret).return_path(
        "news@acme.example", queue_id, account, recipient, today
    )
    token = tracker().token_in(address)
    assert token is not None
    return token


def header_token(
    *,
    queue_id: str = QUEUE_ID,
    account: str = ACCOUNT,
    today: date = TODAY,
    secret: str = SECRET,
) -> str:
    line = tracker(secret).header(queue_id, account, today).decode("ascii")
    name, _, value = line.partition(": ")
    assert name == HEADER
    assert value.endswith("\r\n")
    return value.removesuffix("\r\n")


def attributed_recipient(token: str, message: SentMessage) -> str | None:
    """The recipient ``token`` traces to in ``message``; ``None`` when it is
    refused or traces to nothing."""
    try:
        reference = tracker().read(token, TODAY)
    except TokenError:
        return None
    return tracker().recipient(reference, message)


def names(token: str, message: SentMessage) -> bool:
    """True if ``token`` is read as an ``X-Relay-Id`` of ``message``."""
    try:
        reference = tracker().read(token, TODAY)
    except TokenError:
        return False
    return tracker().names_message(reference, message)


def recipient_with_zero_hint() -> str:
    """A recipient whose VERP token carries hint 0, as an X-Relay-Id does: only
    the MAC can then tell the two purposes apart."""
    for n in itertools.count():
        address = f"r{n}@example.org"
        if tracker()._hint(address) == 0:
            return address
    raise AssertionError  # pragma: no cover - count() never ends


# -- strategies ------------------------------------------------------------------------

# The shape of relay.queue.new_queue_id(): 11 hex digits of milliseconds, 6 of sequence.
queue_ids = st.builds(
    lambda ms, rand: f"{ms:011X}{rand:06X}",
    st.integers(min_value=0, max_value=16**11 - 1),
    st.integers(min_value=0, max_value=16**6 - 1),
)
copies = st.one_of(
    st.just(""), st.integers(min_value=2, max_value=10_000).map(lambda n: f".{n}")
)
tracked_ids = st.builds(lambda base, copy: base + copy, queue_ids, copies)
accounts = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_atoms = st.text(
    st.one_of(st.sampled_from(_ATEXT), st.characters(min_codepoint=0x80)),
    min_size=1,
    max_size=12,
)
_locals = st.lists(_atoms, min_size=1, max_size=4).map(".".join)
_domains = st.sampled_from(
    ["example.org", "EXAMPLE.net", "mail.example.co.uk", "bücher.example"]
)


def _canonical_or_none(address: str) -> str | None:
    try:
        return canonical_address(address)
    except AddressError:
        return None


recipients = (
    st.builds(lambda local, domain: f"{local}@{domain}", _locals, _domains)
    .map(_canonical_or_none)
    .filter(lambda address: address is not None)
    .map(str)
)
days = st.dates(min_value=date(2020, 1, 2), max_value=date(2150, 12, 31))
_quoted_locals = st.text(
    st.characters(exclude_characters='"\\\r\n'),
    max_size=80,
).map(lambda text: f'"{text}"')
sender_locals = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,24}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9._+-]{1,80}", fullmatch=True),
    _locals,
    _quoted_locals,
    st.text(max_size=100),
)
senders = st.builds(lambda local: f"{local}@acme.example", sender_locals)


# -- round trips -----------------------------------------------------------------------


@settings(max_examples=200)
@given(tracked_ids, accounts, st.lists(recipients, min_size=1, max_size=8), days)
def test_verp_round_trip_gives_back_the_recipient(
    queue_id: str, account: str, rcpts: list[str], today: date
) -> None:
    t = tracker()
    message = sent(queue_id, account, tuple(rcpts))
    for rcpt in rcpts:
        address = t.return_path("news@acme.example", queue_id, account, rcpt, today)
        token = t.token_in(address)
        assert token is not None
        reference = t.read(token, today)
        assert reference.queue_id == queue_id
        assert reference.issued == today
        assert t.recipient(reference, message) == rcpt


@settings(max_examples=200)
@given(tracked_ids, accounts, accounts, days)
def test_header_round_trip_names_the_message_for_its_account_only(
    queue_id: str, account: str, other: str, today: date
) -> None:
    assume(other != account)
    t = tracker()
    line = t.header(queue_id, account, today)
    assert line.startswith(b"X-Relay-Id: ")
    assert line.endswith(b"\r\n")
    token = line.decode("ascii").removeprefix("X-Relay-Id: ").removesuffix("\r\n")
    reference = t.read(token, today)
    assert reference.queue_id == queue_id
    assert t.names_message(reference, sent(queue_id, account))
    assert not t.names_message(reference, sent(queue_id, other))


def test_ids_the_queue_makes_are_trackable_with_every_copy() -> None:
    base = new_queue_id()
    for queue_id in (base, f"{base}.2", f"{base}.9999"):
        assert trackable(queue_id)
        token = verp_token(queue_id=queue_id)
        assert tracker().read(token, TODAY).queue_id == queue_id
        assert attributed_recipient(token, sent(queue_id)) == JANE
        assert names(header_token(queue_id=queue_id), sent(queue_id))


@pytest.mark.parametrize("copy", [10_000, 65_535])
def test_the_last_copy_of_a_message_to_max_recipients_is_trackable(copy: int) -> None:
    """[server] max_recipients goes up to 10,000, and a stamped message is queued
    as one copy per recipient: ``<id>.2`` up to ``<id>.10000``."""
    queue_id = f"{new_queue_id()}.{copy}"
    assert trackable(queue_id)
    token = header_token(queue_id=queue_id)
    assert tracker().read(token, TODAY).queue_id == queue_id
    assert names(token, sent(queue_id))


@pytest.mark.parametrize(
    "queue_id",
    [
        "",
        "Q1",
        "0195a3c4d5e6f7a8b",
        "0195A3C4D5E6F7A8",
        "0195A3C4D5E6F7A8B.01",
        "0195A3C4D5E6F7A8B.",
        "0195A3C4D5E6F7A8B.65536",
        "0195A3C4D5E6F7A8B\n",
    ],
)
def test_other_queue_ids_cannot_be_tracked(queue_id: str) -> None:
    assert not trackable(queue_id)
    with pytest.raises(ValueError, match="cannot be tracked"):
        tracker().header(queue_id, ACCOUNT, TODAY)
    with pytest.raises(ValueError, match="cannot be tracked"):
        tracker().return_path("news@acme.example", queue_id, ACCOUNT, JANE, TODAY)


def test_return_path_needs_a_bounce_domain() -> None:
    with pytest.raises(ValueError, match="bounce domain"):
        Tracker(SECRET, None).return_path(
            "news@acme.example", QUEUE_ID, ACCOUNT, JANE, TODAY
        )


def test_a_tracker_without_bounce_domain_still_stamps_and_reads_headers() -> None:
    t = Tracker(SECRET, None)
    token = t.header(QUEUE_ID, ACCOUNT, TODAY).decode().split(": ")[1].strip()
    assert t.names_message(t.read(token, TODAY), sent())
    assert t.token_in(f"bounce+{token}@{BOUNCES}") is None


# -- the VERP address ------------------------------------------------------------------


@settings(max_examples=300)
@given(senders, tracked_ids, accounts, recipients)
def test_verp_address_is_a_valid_canonical_address_whatever_the_sender(
    sender: str, queue_id: str, account: str, rcpt: str
) -> None:
    address = tracker().return_path(sender, queue_id, account, rcpt, TODAY)
    assert canonical_address(address) == address
    local, _, domain = address.rpartition("@")
    assert domain == BOUNCES
    assert len(local.encode("utf-8")) <= MAX_LOCAL_PART
    assert address.isascii()
    assert tracker().token_in(address) == local.rpartition("+")[2]


@pytest.mark.parametrize(
    ("sender", "local"),
    [
        ("news@acme.example", "news"),
        ("News.Letter-2_x@acme.example", "News.Letter-2_x"),
        (f"{'a' * 25}@acme.example", "a" * 25),
        (f"{'a' * 26}@acme.example", "bounce"),
        ("news+tag@acme.example", "bounce"),
        ("first..last@acme.example", "bounce"),
        (".news@acme.example", "bounce"),
        ('"quoted@local"@acme.example', "bounce"),
        ("jürgen@acme.example", "bounce"),
        ("noatsign", "bounce"),
    ],
)
def test_verp_local_part_keeps_a_short_plain_sender(sender: str, local: str) -> None:
    address = tracker().return_path(sender, QUEUE_ID, ACCOUNT, JANE, TODAY)
    kept, plus, token = address.rpartition("@")[0].rpartition("+")
    assert plus == "+"
    assert kept == local
    assert len(token) == 37


# -- case ------------------------------------------------------------------------------


@given(st.lists(st.booleans(), min_size=37, max_size=37))
def test_a_token_in_any_case_still_reads_and_verifies(upper: list[bool]) -> None:
    verp = verp_token()
    track = header_token()
    for token, check in ((verp, "verp"), (track, "track")):
        mixed = "".join(
            c.upper() if flag else c for c, flag in zip(token, upper, strict=True)
        )
        if check == "verp":
            assert attributed_recipient(mixed, sent()) == JANE
        else:
            assert names(mixed, sent())


def test_an_upper_or_lower_cased_verp_address_still_traces() -> None:
    address = tracker().return_path("news@acme.example", QUEUE_ID, ACCOUNT, JANE, TODAY)
    for variant in (address.upper(), address.lower()):
        token = tracker().token_in(variant)
        assert token is not None
        assert attributed_recipient(token, sent()) == JANE
    assert names(header_token().upper(), sent())


# -- forgery ---------------------------------------------------------------------------


def test_a_token_made_with_another_secret_attributes_nothing() -> None:
    assert attributed_recipient(verp_token(secret=OTHER_SECRET), sent()) is None
    assert not names(header_token(secret=OTHER_SECRET), sent())


def test_a_verp_token_names_only_its_own_recipient() -> None:
    token = verp_token(JANE)
    assert attributed_recipient(token, sent(recipients=(JANE, BOB))) == JANE
    assert attributed_recipient(token, sent(recipients=(BOB, JANE))) == JANE
    assert attributed_recipient(token, sent(recipients=(BOB,))) is None
    assert attributed_recipient(verp_token(BOB), sent(recipients=(JANE,))) is None


def test_a_token_names_only_its_own_account() -> None:
    assert attributed_recipient(verp_token(), sent(account="other")) is None
    assert not names(header_token(), sent(account="other"))
    assert attributed_recipient(verp_token(account="other"), sent()) is None
    assert not names(header_token(account="other"), sent())


def test_a_verp_token_is_no_x_relay_id_and_back() -> None:
    """Even when the VERP token's hint is 0, as an X-Relay-Id's always is."""
    zero = recipient_with_zero_hint()
    message = sent(recipients=(zero, JANE))
    verp = verp_token(zero)
    assert tracker().read(verp, TODAY).hint == 0
    assert attributed_recipient(verp, message) == zero
    assert not names(verp, message)
    assert not names(verp_token(JANE), message)
    assert attributed_recipient(header_token(), message) is None


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=36),
    st.characters(),
    st.sampled_from(["verp", "track"]),
)
def test_any_changed_character_attributes_nothing(
    position: int, replacement: str, kind: str
) -> None:
    token = verp_token() if kind == "verp" else header_token()
    forged = token[:position] + replacement + token[position + 1 :]
    assume(forged.lower() != token.lower())
    assert attributed_recipient(forged, sent()) is None
    assert not names(forged, sent())


@pytest.mark.parametrize("kind", ["verp", "track"])
@pytest.mark.parametrize("position", range(37))
def test_every_other_base32_character_at_any_position_attributes_nothing(
    kind: str, position: int
) -> None:
    token = verp_token() if kind == "verp" else header_token()
    for replacement in B32.replace(token[position], ""):
        forged = token[:position] + replacement + token[position + 1 :]
        assert attributed_recipient(forged, sent()) is None, forged
        assert not names(forged, sent()), forged


@pytest.mark.parametrize(
    ("ascii_letter", "look_alike"),
    [("i", "\u0131"), ("s", "\u017f"), ("k", "\u212a")],
)
def test_non_ascii_look_alikes_are_no_token(ascii_letter: str, look_alike: str) -> None:
    """Unicode case folding maps these to ASCII letters; a token is ASCII only."""
    for n in itertools.count():
        candidate_day = TODAY - timedelta(days=n)
        token = header_token(today=candidate_day)
        if ascii_letter in token:
            break
    forged = token.replace(ascii_letter, look_alike)
    with pytest.raises(TokenError):
        tracker().read(forged, TODAY)
    assert tracker().token_in(f"bounce+{forged}@{BOUNCES}") is None


@settings(max_examples=500)
@given(st.text(max_size=60))
def test_read_raises_nothing_but_token_error(junk: str) -> None:
    try:
        reference = tracker().read(junk, TODAY)
    except TokenError:
        return
    assert isinstance(reference, Reference)


@settings(max_examples=500)
@given(st.from_regex(r"[A-Za-z2-7]{37}", fullmatch=True), days)
def test_random_tokens_read_without_crash_and_attribute_nothing(
    token: str, today: date
) -> None:
    t = tracker()
    try:
        reference = t.read(token, today)
    except TokenError:
        return
    message = sent(reference.queue_id)
    assert t.recipient(reference, message) is None
    assert not t.names_message(reference, message)


# -- expiry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_days", "accepted"),
    [
        (0, True),
        (1, True),
        (MAX_AGE_DAYS - 1, True),
        (MAX_AGE_DAYS, True),
        (MAX_AGE_DAYS + 1, False),
        (1_000, False),
        (-1, True),
        (-2, False),
        (-400, False),
    ],
)
def test_read_refuses_tokens_too_old_or_from_the_future(
    age_days: int, accepted: bool
) -> None:
    issued = TODAY - timedelta(days=age_days)
    for token in (verp_token(today=issued), header_token(today=issued)):
        if accepted:
            assert tracker().read(token, TODAY).issued == issued
        else:
            with pytest.raises(TokenError, match="expired"):
                tracker().read(token, TODAY)


# -- token_in --------------------------------------------------------------------------


def test_token_in_finds_the_token_in_any_spelling_of_the_bounce_domain() -> None:
    token = verp_token()
    for address in (
        f"news+{token}@{BOUNCES}",
        f"<news+{token}@{BOUNCES}>",
        f"  <news+{token}@{BOUNCES}>  ",
        f"news+{token}@{BOUNCES}.",
        f"news+{token}@{BOUNCES.upper()}",
        f"news+{token}@Bounces.Relay.Example.",
        f"{token}@{BOUNCES}",
        f"a+b+{token}@{BOUNCES}",
        f"bounce+{token.upper()}@{BOUNCES}",
    ):
        found = tracker().token_in(address)
        assert found is not None, address
        assert found.lower() == token


@pytest.mark.parametrize(
    "address",
    [
        None,
        "",
        "<>",
        "news@acme.example",
        f"news+{'a' * 37}@acme.example",
        f"news+{'a' * 37}@sub.{BOUNCES}",
        f"news+{'a' * 37}@{BOUNCES}.evil.example",
        f"news+{'a' * 37}",
        f"news+{'a' * 36}@{BOUNCES}",
        f"news+{'a' * 38}@{BOUNCES}",
        f"news+{'a' * 36}1@{BOUNCES}",
        f"news+{'a' * 36}8@{BOUNCES}",
        f"news+{'a' * 36}=@{BOUNCES}",
        f"news@{BOUNCES}",
        f"news+@{BOUNCES}",
        f"news+{'a' * 37}x@{BOUNCES}",
        f"@{BOUNCES}",
    ],
)
def test_token_in_ignores_other_addresses(address: str | None) -> None:
    assert tracker().token_in(address) is None


@given(st.text(max_size=80))
def test_token_in_returns_a_well_formed_token_or_none(address: str) -> None:
    token = tracker().token_in(address)
    if token is not None:
        assert len(token) == 37
        assert set(token.lower()) <= set(B32)


def test_token_in_is_none_without_a_bounce_domain() -> None:
    assert Tracker(SECRET, None).token_in(f"news+{'a' * 37}@{BOUNCES}") is None


# -- message_id_key --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("<m1@acme.example>", "<m1@acme.example>"),
        ("  <m1@acme.example>\r\n", "<m1@acme.example>"),
        ("\t<m1@acme.example> (comment)", "<m1@acme.example>"),
        ("Message-ID is <m1@acme.example> <m2@acme.example>", "<m1@acme.example>"),
        ("m1@acme.example", "m1@acme.example"),
        ("  m1@acme.example  ", "m1@acme.example"),
        ("<m1@acme.example", "<m1@acme.example"),
        ("m1@acme.example>", "m1@acme.example>"),
        ("< m1 >", "< m1 >"),
        (None, None),
        ("", None),
        ("   \r\n\t", None),
        ("<m1\x00@acme.example>", None),
        ("m1\x07@acme.example", None),
        ("x" * 999, None),
        ("x" * 998, "x" * 998),
    ],
)
def test_message_id_key(value: str | None, key: str | None) -> None:
    assert message_id_key(value) == key


@given(st.one_of(st.none(), st.text(max_size=120)))
def test_message_id_key_is_printable_bounded_and_idempotent(
    value: str | None,
) -> None:
    key = message_id_key(value)
    if key is None:
        return
    assert key
    assert key.isprintable()
    assert len(key) <= 998
    assert key == key.strip()
    assert message_id_key(key) == key


# -- recipient hints -------------------------------------------------------------------


def test_many_recipients_with_colliding_hints_resolve_exactly() -> None:
    rcpts = tuple(f"user{n}@example.org" for n in range(2000))
    message = sent(recipients=rcpts)
    by_hint: dict[int, list[str]] = {}
    for rcpt in rcpts:
        by_hint.setdefault(tracker()._hint(rcpt), []).append(rcpt)
    colliding = [rcpt for group in by_hint.values() if len(group) > 1 for rcpt in group]
    assert len(colliding) >= 4  # 2000 addresses in 65,536 hints collide
    t = tracker()
    for rcpt in [*colliding, *rcpts[::97]]:
        token = t.token_in(
            t.return_path("news@acme.example", QUEUE_ID, ACCOUNT, rcpt, TODAY)
        )
        assert token is not None
        assert t.recipient(t.read(token, TODAY), message) == rcpt


def test_reference_carries_the_token_bytes() -> None:
    token = verp_token()
    reference = tracker().read(token, TODAY)
    assert reference.token == base64.b32decode(token.upper() + "===")
    assert reference.hint == tracker()._hint(JANE)


def test_the_recipient_hint_depends_on_the_secret() -> None:
    rcpts = [f"user{n}@example.org" for n in range(50)]
    mine = [tracker()._hint(r) for r in rcpts]
    theirs = [Tracker("t" * 40, BOUNCES)._hint(r) for r in rcpts]
    assert mine != theirs


# -- the format does not drift --------------------------------------------------------


def test_tokens_keep_their_format_across_versions() -> None:
    # Mail already sent carries tokens of this exact spelling; bounces and reports
    # quoting them arrive for weeks, through upgrades of the relay.
    t = Tracker("golden-secret-0123456789abcdef", "bounces.example")
    day = date(2026, 11, 23)
    assert (
        t.return_path(
            "news@acme.example", "0193F2A4C1DA1B3C4", "acme", "jane@example.org", day
        )
        == "news+bhlaagj7fjgb3intyqaaatyqvwpw266wi3fcw@bounces.example"
    )
    assert (
        t.return_path(
            "news@acme.example", "0193F2A4C1DA1B3C4.7", "acme", "jane@example.org", day
        )
        == "news+bhlaagj7fjgb3intyqaaotyqsmhxaevdhivcm@bounces.example"
    )
    assert t.header("0193F2A4C1DA1B3C4", "acme", day) == (
        b"X-Relay-Id: bhlaagj7fjgb3intyqaaaaaab3b3b7pg2bjgk\r\n"
    )


@given(st.binary(max_size=64))
def test_base32_digits_are_rfc_4648s(raw: bytes) -> None:
    assert _b32(raw) == base64.b32encode(raw).decode().rstrip("=").lower()
