"""Tests for storage.addresses: canonical forms and the addresses refused."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import AddressError, canonical_address, canonical_domain, domain_of


@pytest.mark.parametrize(
    ("given_address", "canonical"),
    [
        ("jane@example.org", "jane@example.org"),
        ("Jane.Doe@Example.ORG", "Jane.Doe@example.org"),
        ("JANE@EXAMPLE.ORG", "JANE@example.org"),
        ("jane@bücher.example", "jane@xn--bcher-kva.example"),
        ("jane@BÜCHER.example", "jane@xn--bcher-kva.example"),
        ("jane@xn--bcher-kva.example", "jane@xn--bcher-kva.example"),
        ("jane@example.org.", "jane@example.org"),
        ('"john doe"@example.org', '"john doe"@example.org'),
        ('"a@b"@example.org', '"a@b"@example.org'),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ("o'brien@example.ie", "o'brien@example.ie"),
        ("ü@example.org", "ü@example.org"),
        ("a" * 64 + "@example.org", "a" * 64 + "@example.org"),
    ],
)
def test_canonical_address(given_address: str, canonical: str) -> None:
    assert canonical_address(given_address) == canonical
    assert domain_of(canonical) == canonical.rpartition("@")[2]


LONG_DOMAIN = ".".join(["b" * 60] * 4) + ".org"  # 248 octets: a valid domain


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("ja\x00ne@example.org", "control"),
        ("jane@exa\x00mple.org", "control"),
        ("ja\tne@example.org", "control"),
        ("jane@example.org\r\n", "control"),
        ("ja\x7fne@example.org", "control"),
        ("a" * 65 + "@example.org", "64"),
        ("a" * 10 + "@" + LONG_DOMAIN, "254"),
        ("jane@[192.0.2.1]", "literal"),
        ("jane@[IPv6:2001:db8::1]", "literal"),
        ("@a.example:jane@example.org", "source route"),
        ("@a:b@c", "source route"),
        ("jane@localhost", "qualified"),
        ("jane@example", "qualified"),
        ("", "local part"),
        ("jane", "local part"),
        ("@example.org", ""),
        ("jane@", "domain"),
        ("\udcff@x.org", "UTF-8"),
        ("jane@x\udcff.org", "UTF-8"),
        ("a..b@example.org", "local part"),
        (".jane@example.org", "local part"),
        ("jane.@example.org", "local part"),
        ("ja ne@example.org", "local part"),
        ("a@b@example.org", "local part"),
        ('"jane@example.org', "quoted"),
        ("jane@-example.org", "label"),
        ("jane@example-.org", "label"),
        ("jane@exa_mple.org", "label"),
        ("jane@" + "a" * 64 + ".org", ""),
    ],
)
def test_canonical_address_refuses(bad: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        canonical_address(bad)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "bad",
    [
        "ü x@example.org",  # space
        "ü>x@example.org",  # would close the SMTP path: RCPT TO:<ü>x@...>
        "ü<x@example.org",
        'ü"@example.org',
        "ü..x@example.org",  # consecutive dots; aiosmtpd passes this one through
        "ü,x@example.org",
    ],
)
def test_non_ascii_local_part_still_needs_valid_syntax(bad: str) -> None:
    # RFC 6531 3.3 adds UTF8-non-ascii to atext; ASCII specials stay forbidden.
    with pytest.raises(AddressError):
        canonical_address(bad)


@pytest.mark.parametrize(
    ("domain", "canonical"),
    [
        ("Example.ORG", "example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("example.org.", "example.org"),
        ("straße.de", "strasse.de"),
    ],
)
def test_canonical_domain(domain: str, canonical: str) -> None:
    assert canonical_domain(domain) == canonical


@pytest.mark.parametrize("bad", ["", ".", "org", "[1.2.3.4]", "a..b", "x\x00.org"])
def test_canonical_domain_refuses(bad: str) -> None:
    with pytest.raises(AddressError):
        canonical_domain(bad)


# -- properties ----------------------------------------------------------------

ATEXT = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
)
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=12)
dot_atom = st.lists(atoms, min_size=1, max_size=4).map(".".join)
quoted = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'
    ),
    max_size=12,
).map(lambda s: f'"{s}"')
local_parts = (dot_atom | quoted).filter(lambda s: len(s) <= 64)
ascii_labels = st.from_regex(r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?\Z")
unicode_labels = st.text(
    alphabet=st.sampled_from("abcxyzäöüßéèçñøåλπжд"), min_size=1, max_size=10
)
domains = st.builds(
    lambda labels, tld, dot: ".".join([*labels, tld]) + dot,
    st.lists(ascii_labels | unicode_labels, min_size=1, max_size=3),
    st.sampled_from(["org", "example", "COM", "de", "xn--p1ai"]),
    st.sampled_from(["", "."]),
)


@settings(max_examples=150)
@given(local_parts, domains)
def test_canonical_address_is_idempotent(local: str, domain: str) -> None:
    try:
        canonical = canonical_address(f"{local}@{domain}")
    except AddressError:
        return
    assert canonical_address(canonical) == canonical
    assert canonical.startswith(f"{local}@")
    assert canonical.rpartition("@")[2].isascii()
    assert canonical == canonical.rpartition("@")[0] + "@" + domain_of(canonical)


@settings(max_examples=100)
@given(
    dot_atom.filter(lambda s: len(s) <= 64),
    st.lists(ascii_labels, min_size=2, max_size=4),
)
def test_valid_ascii_addresses_accepted(local: str, labels: list[str]) -> None:
    domain = ".".join(labels)
    canonical = canonical_address(f"{local}@{domain}")
    assert canonical == f"{local}@{domain.lower()}"


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_arbitrary_text_raises_only_address_error(text: str) -> None:
    try:
        canonical = canonical_address(text)
    except AddressError:
        return
    assert "@" in canonical
    assert canonical_address(canonical) == canonical


@settings(max_examples=200)
@given(st.text(alphabet=st.sampled_from('a@."\\[]:-ü\x00 xn-Z'), max_size=30))
def test_address_like_text_raises_only_address_error(text: str) -> None:
    with contextlib.suppress(AddressError):
        canonical_address(text)
